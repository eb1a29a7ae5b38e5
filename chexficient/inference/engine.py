"""The inference engine: a CheXficient model and processor loaded once, placed and typed for the hardware.

CUDA: bfloat16 weights and SDPA attention, pinned host memory and asynchronous copies, results read back one batch late
so that the GPU never waits on Python. CPU: float32, bfloat16 (fast where the CPU has AVX512-BF16 or AMX), or int8
dynamic quantisation of every `nn.Linear`. `torch.compile` is optional on both.

Preprocessing runs in the DataLoader workers (`preprocess="cpu"`, the default: the image processor's PIL pipeline),
or on the engine's device (`preprocess="gpu"`): the workers only decode, to uint8/16-bit arrays, and
`CheXficientImageProcessor.preprocess_tensor` resizes, crops and normalises whole same-size groups at once
(`chexficient.inference.gpu_preprocess`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import ImageBatch, InputItem, make_image_loader
from ..runtime import DTYPES, resolve_device
from .gpu_preprocess import PREPROCESS_MODES, RawImageBatch, make_raw_image_loader, preprocess_raw_batch
from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel, zero_shot_scores
from processing_chexficient import CheXficientProcessor


logger = logging.getLogger(__name__)

# `--dtype`: the project's dtype names (chexficient.runtime.DTYPES), "auto", and "int8" (dynamic quantisation, CPU).
ENGINE_DTYPES = ("auto", *DTYPES, "int8")
# `--preprocess`: in the DataLoader workers (cpu) or on the engine's device after decoding (gpu).
ENGINE_PREPROCESS = PREPROCESS_MODES


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """ "auto" is bfloat16 on CUDA and float32 on CPU; int8 (dynamic quantisation) runs on the CPU only."""
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"--dtype must be one of {ENGINE_DTYPES}, got {dtype!r}.")
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "int8" and device.type != "cpu":
        raise ValueError("--dtype int8 (dynamic quantisation) runs on the CPU only; use bfloat16 on a GPU.")
    return dtype


def warn_if_slow_cpu_dtype(dtype: str, device: torch.device) -> bool:
    """Log a warning when bfloat16/float16 runs on a CPU without native support for it (it still works, emulated,
    usually slower than float32). Returns True when it warned."""
    if device.type != "cpu" or dtype not in ("bfloat16", "float16"):
        return False
    from ..runtime.machine import cpu_flags, cpu_has_native_bf16

    native = cpu_has_native_bf16() if dtype == "bfloat16" else cpu_flags()["avx512_fp16"]
    if not native:
        needs = "AVX512-BF16 or AMX-BF16" if dtype == "bfloat16" else "AVX512-FP16"
        logger.warning(
            "--dtype %s on this CPU: it has no %s, so %s matmuls are emulated and usually slower than float32; "
            "use float32 or int8 here.",
            dtype,
            needs,
            dtype,
        )
    return not native


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation, in place, of every `nn.Linear` (weights int8, activations quantised per batch)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)  # no second fp32 copy in memory


def load_processor(model_dir: str | os.PathLike) -> tuple[CheXficientImageProcessor, Any]:
    """The folder's image processor and, when saved there, its tokenizer (None otherwise)."""
    try:
        processor = CheXficientProcessor.from_pretrained(model_dir)
        return processor.image_processor, processor.tokenizer
    except (OSError, ValueError, TypeError) as error:
        logger.info("%s: no full processor (%s); loading the image processor alone.", model_dir, error)
        return CheXficientImageProcessor.from_pretrained(model_dir), None


@dataclass
class EngineInfo:
    device: str
    dtype: str
    compiled: bool
    image_size: int
    projection_dim: int
    preprocess: str = "cpu"


class InferenceEngine:
    """Batched image embedding and zero-shot classification with one loaded model.

    `dtype`: "auto" (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 (also on the CPU, where it is fast with
    AVX512-BF16 or AMX and logs a warning without them), float16, or int8 (CPU). `preprocess`: "cpu" (the DataLoader
    workers run the image processor) or "gpu" (the workers only decode; the engine's device resizes, crops and
    normalises, see `chexficient.inference.gpu_preprocess`; on a CPU engine this runs the same tensor pipeline there).
    `forward_calls` counts image-tower forwards (the server's micro-batching is tested with it).
    """

    def __init__(
        self,
        model: CheXficientModel,
        image_processor: CheXficientImageProcessor,
        tokenizer: Any = None,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        compile: bool = False,
        preprocess: str = "cpu",
    ):
        if preprocess not in ENGINE_PREPROCESS:
            raise ValueError(f"--preprocess must be one of {ENGINE_PREPROCESS}, got {preprocess!r}.")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        warn_if_slow_cpu_dtype(self.dtype, self.device)
        self.preprocess = preprocess
        model = model.eval().requires_grad_(False)
        if self.dtype == "int8":
            model = quantize_int8(model.float())
        else:
            model = model.to(self.device, DTYPES[self.dtype])
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.input_dtype = torch.float32 if self.dtype == "int8" else DTYPES[self.dtype]
        self.compiled = compile
        self._image_fn = torch.compile(model.get_image_features, dynamic=False) if compile else None
        self._compiled_batch: int | None = None
        self.forward_calls = 0
        self.model_dir: str | None = None  # the folder it was loaded from, recorded beside what it embeds
        self._text_lock = threading.Lock()  # the prompt cache is shared by request threads
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        self.projection_dim = int(model.config.projection_dim)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        compile: bool = False,
        preprocess: str = "cpu",
    ) -> InferenceEngine:
        """Load the model, image processor and tokenizer from a local folder (never from the Hub)."""
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--model {model_dir}: no such folder.")
        resolved = resolve_device(device)
        attn = "sdpa"  # both towers support it; on CUDA it dispatches to flash / memory-efficient kernels
        model = CheXficientModel.from_pretrained(model_dir, attn_implementation=attn, local_files_only=True)
        image_processor, tokenizer = load_processor(model_dir)
        engine = cls(
            model, image_processor, tokenizer, device=resolved, dtype=dtype, compile=compile, preprocess=preprocess
        )
        engine.model_dir = os.fspath(model_dir)
        return engine

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            str(self.device), self.dtype, self.compiled, self.image_size, self.projection_dim, self.preprocess
        )

    # ----- embedding --------------------------------------------------------------------------------------------

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._image_fn is None:
            return self.model.get_image_features(pixel_values)
        # A compiled graph is specialised to one batch size: pad short batches instead of recompiling.
        count = pixel_values.shape[0]
        if self._compiled_batch is None:
            self._compiled_batch = count
        if count > self._compiled_batch:
            chunks = pixel_values.split(self._compiled_batch)
            return torch.cat([self._forward(chunk) for chunk in chunks])
        if count < self._compiled_batch:
            padding = pixel_values.new_zeros((self._compiled_batch - count, *pixel_values.shape[1:]))
            pixel_values = torch.cat([pixel_values, padding])
        return self._image_fn(pixel_values)[:count]

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings [B, D] (float32, on the engine's device) of preprocessed `pixel_values`."""
        pixel_values = pixel_values.to(self.device, self.input_dtype, non_blocking=True)
        self.forward_calls += 1
        return self._forward(pixel_values).float()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], max_length: int = 256, batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings [N, D] (float32, on the host) of report `texts`, truncated at `max_length`
        tokens as in pretraining."""
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer, so report texts cannot be embedded.")
        rows = []
        for begin in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[begin : begin + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
            rows.append(self.model.get_text_features(**tokens).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.projection_dim), np.float32)

    def embed_numpy(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embeddings [B, D] as a float32 numpy array on the host."""
        if isinstance(pixel_values, np.ndarray):
            pixel_values = torch.from_numpy(pixel_values)
        return self.embed_pixels(pixel_values).cpu().numpy()

    def make_loader(
        self,
        items: Sequence[InputItem | str | os.PathLike],
        batch_size: int,
        num_workers: int = 0,
        reader: Any = None,
    ) -> DataLoader:
        """The DataLoader this engine's `preprocess` mode wants: `ImageBatch`es of pixel values (cpu) or
        `RawImageBatch`es of decoded images (gpu); pinned memory on CUDA."""
        pin = self.device.type == "cuda"
        if self.preprocess == "gpu":
            return make_raw_image_loader(items, self.image_processor, batch_size, num_workers, pin, reader)
        return make_image_loader(items, self.image_processor, batch_size, num_workers, pin, reader)

    def batch_pixels(self, batch: ImageBatch | RawImageBatch) -> torch.Tensor | None:
        """A batch's pixel values on the engine's device: as collated (cpu mode), or preprocessed there from the
        decoded images (a `RawImageBatch`); None when nothing in the batch decoded."""
        if isinstance(batch, RawImageBatch):
            return preprocess_raw_batch(self.image_processor, batch, self.device, self.input_dtype)
        return batch.pixel_values

    def iter_embeddings(
        self, batches: Iterable[ImageBatch | RawImageBatch]
    ) -> Iterator[tuple[ImageBatch | RawImageBatch, np.ndarray | None]]:
        """(batch, embeddings [len(batch.indices), D] or None) for each batch, in order.

        On CUDA the copy back to the host is asynchronous into pinned memory and a batch's result is waited for only
        after the next batch has been queued, so decode, transfer and compute overlap without per-batch stalls.
        Batches may be `ImageBatch`es (preprocessed in the workers) or `RawImageBatch`es (preprocessed here), as
        `make_loader` builds them for the engine's `preprocess` mode.
        """
        pending: tuple[Any, torch.Tensor | None, torch.cuda.Event | None] | None = None
        cuda = self.device.type == "cuda"
        for batch in batches:
            host, event = None, None
            pixel_values = self.batch_pixels(batch)
            if pixel_values is not None:
                embeds = self.embed_pixels(pixel_values)
                if cuda:
                    host = torch.empty(embeds.shape, dtype=embeds.dtype, pin_memory=True)
                    host.copy_(embeds, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host = embeds
            if not cuda:
                yield batch, None if host is None else host.numpy()
                continue
            if pending is not None:
                yield self._finish(pending)
            pending = (batch, host, event)
        if pending is not None:
            yield self._finish(pending)

    @staticmethod
    def _finish(pending: tuple[Any, torch.Tensor | None, Any]) -> tuple[Any, np.ndarray | None]:
        batch, host, event = pending
        if event is not None:
            event.synchronize()
        return batch, None if host is None else host.numpy()

    # ----- zero-shot ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def label_embeds(self, labels: Sequence[str], prompts: str | Sequence[Sequence[str]] = "paper") -> torch.Tensor:
        """Prompt embeddings [C, 2, D] of `labels` (tokenised and embedded once, then served from the model's LRU
        cache). Thread-safe: the server computes them in request threads, outside the batching thread."""
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer, so zero-shot classification is unavailable.")
        with self._text_lock:
            return self.model.get_zero_shot_text_embeds(list(labels), self.tokenizer, prompts).float()

    @torch.inference_mode()
    def classify_embeds(
        self,
        image_embeds: torch.Tensor | np.ndarray,
        labels: Sequence[str] | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Zero-shot probabilities [B, C] from image embeddings: the model's protocol (`zero_shot_scores`), with
        the prompt embeddings of `labels` or given as `text_embeds` [C, 2, D] (from `label_embeds`)."""
        if (labels is None) == (text_embeds is None):
            raise ValueError("pass exactly one of `labels` or `text_embeds`.")
        if text_embeds is None:
            text_embeds = self.label_embeds(labels)
        if isinstance(image_embeds, np.ndarray):
            image_embeds = torch.from_numpy(image_embeds)
        return zero_shot_scores(image_embeds.to(self.device), text_embeds).cpu().numpy()


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """'Pneumothorax,Cardiomegaly' or a list -> a clean, de-duplicated label list (order kept)."""
    parts = labels.split(",") if isinstance(labels, str) else list(labels)
    cleaned = list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))
    if not cleaned:
        raise ValueError("labels: give at least one finding, e.g. 'Pneumothorax,Cardiomegaly'.")
    return cleaned


__all__ = [
    "ENGINE_DTYPES",
    "ENGINE_PREPROCESS",
    "EngineInfo",
    "InferenceEngine",
    "load_processor",
    "parse_labels",
    "quantize_int8",
    "warn_if_slow_cpu_dtype",
]
