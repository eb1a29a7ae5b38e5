"""What every evaluation task shares: loading a model, encoding images with skipped-file reporting, writing results."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from chexficient.data.images import make_image_loader
from chexficient.runtime import resolve_device
from eval.arguments import EvalArguments


logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for evaluation: CheXficient (image + text towers) or any HF image encoder."""

    model: torch.nn.Module
    image_processor: Any
    tokenizer: Any | None
    is_chexficient: bool
    path: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_features(self, pixel_values: torch.Tensor, kind: str = "embedding") -> torch.Tensor:
        """Image features [B, D]: CheXficient's normalised embedding (`kind="embedding"`) or the backbone's pooled
        output (`kind="backbone"`; the only kind for a plain HF encoder)."""
        if self.is_chexficient and kind == "embedding":
            return self.model.get_image_features(pixel_values)
        if kind not in ("embedding", "backbone"):
            raise ValueError(f"feature kind must be 'embedding' or 'backbone', got {kind!r}.")
        encoder = self.model.vision_model if self.is_chexficient else self.model
        output = encoder(pixel_values=pixel_values)
        pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else output.last_hidden_state[:, 0]

    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states of the image tower ([B, 1 + tokens, H] each, embeddings first)."""
        encoder = self.model.vision_model if self.is_chexficient else self.model
        return encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def load_model_and_processor(
    path: str | os.PathLike, device: str = "auto", revision: str | None = None
) -> LoadedModel:
    """Load a saved CheXficient folder (model, image processor, tokenizer) or any HF image encoder, in eval mode."""
    from transformers import AutoImageProcessor, AutoModel

    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; pass a folder written by save_pretrained.")
    target = resolve_device(device)
    if _is_chexficient(path):
        model = CheXficientModel.from_pretrained(path, revision=revision)
        processor = CheXficientProcessor.from_pretrained(path, revision=revision)
        image_processor, tokenizer, is_chexficient = processor.image_processor, processor.tokenizer, True
    else:
        model = AutoModel.from_pretrained(path, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(path, revision=revision)
        tokenizer, is_chexficient = None, False
    return LoadedModel(model.to(target).eval(), image_processor, tokenizer, is_chexficient, path)


def _is_chexficient(path: str) -> bool:
    """True for a CheXficient folder; a Hub id or a folder of another model type is loaded with the Auto classes."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return True  # a Hub repo id: CheXficient's own loader gives the clearest error
    with open(config_file) as handle:
        return json.load(handle).get("model_type") == "chexficient"


# ----- images ---------------------------------------------------------------------------------------------------------


@dataclass
class EncodedImages:
    """Per-image outputs of a batched pass, the dataset rows they belong to, and the files that were skipped."""

    features: torch.Tensor  # [N_ok, ...] on the CPU
    indices: np.ndarray  # [N_ok] rows of the dataset
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"}


@torch.no_grad()
def encode_images(
    paths: Sequence[str],
    image_processor: Any,
    encode: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    reader: Callable[[int], Any] | None = None,
    desc: str = "encoding images",
) -> EncodedImages:
    """Run `encode(pixel_values)` over the images in batches; unreadable files are logged and skipped.

    `paths` name the images (read from disk, or with `reader`, `reader(i)` gives the source of image i).
    """
    loader = make_image_loader(paths, image_processor, batch_size, num_workers, reader=reader)
    features, indices, skipped = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        skipped += [{"path": str(paths[index]), "error": error} for index, error in batch.failed]
        if batch.pixel_values is None:
            continue
        outputs = encode(batch.pixel_values.to(device, non_blocking=True))
        features.append(outputs.float().cpu())
        indices.append(torch.as_tensor(batch.indices, dtype=torch.long))
    for item in skipped:
        logger.warning("skipped %s (%s)", item["path"], item["error"])
    if not features:
        raise RuntimeError(f"none of the {len(paths)} images could be read; first error: {skipped[:1]}")
    return EncodedImages(torch.cat(features), torch.cat(indices).numpy(), skipped)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 256, max_length: int = 256
) -> torch.Tensor:
    """Normalised text embeddings [T, D] of `texts` in batches (CPU float32)."""
    device = next(model.parameters()).device
    outputs = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding texts", unit="batch", leave=False):
        tokens = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        outputs.append(model.get_text_features(**tokens).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


# ----- results --------------------------------------------------------------------------------------------------------


def write_results(result: dict[str, Any], markdown: str, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write `<stem>.json` and `<stem>.md` under `out_dir`; returns their paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    paths["markdown"].write_text(markdown.rstrip() + "\n")
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def run_task_cli(
    arguments_class: type[EvalArguments], run: Callable[[Any], dict[str, Any]], argv: Sequence[str] | None
) -> dict:
    """The command line of an evaluation task: logging, its `EvalArguments` dataclass, then `run(args)`."""
    import sys

    from transformers import HfArgumentParser

    setup_logging()
    (args,) = HfArgumentParser(arguments_class).parse_args_into_dataclasses(
        args=list(sys.argv[1:] if argv is None else argv)
    )
    return run(args)


def publish_result(result: dict[str, Any], markdown: str, out_dir: str | os.PathLike, stem: str) -> dict[str, Any]:
    """Write a task's JSON and markdown under `out_dir`, print the markdown, and return the result."""
    write_results(result, markdown, out_dir, stem)
    print(markdown)
    return result
