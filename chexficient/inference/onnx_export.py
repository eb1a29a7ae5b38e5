"""`chexficient export-onnx`: the image tower + projection as ONNX (pixel_values [B, 3, S, S] -> normalised embeds).

The graph has a dynamic batch and the model's fixed image size. After export the file is run with ONNX Runtime and
compared with PyTorch (max abs diff, minimum cosine); a cosine below `min_cosine` (0.999) fails the export. With
`int8`, ONNX Runtime's dynamic int8 quantisation writes `OUT.int8.onnx` next to it and its agreement is reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeling_chexficient import CheXficientModel


logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")


class ImageEmbedder(nn.Module):
    """pixel_values [B, 3, S, S] -> L2-normalised image embeddings [B, D]: exactly `get_image_features`."""

    def __init__(self, model: CheXficientModel):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)


class OnnxEmbedder:
    """An ONNX Runtime session on the CPU for an exported image embedder."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def embed(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.numpy()
        feed = {self.input_name: np.ascontiguousarray(pixel_values, dtype=np.float32)}
        return self.session.run(None, feed)[0]


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs difference and minimum / mean row cosine of two [B, D] embedding arrays."""
    a = reference.astype(np.float64)
    b = candidate.astype(np.float64)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


@dataclass
class ExportReport:
    path: str
    int8_path: str | None
    exporter: str
    image_size: int
    seconds: float
    parity: dict[str, float]
    int8_parity: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _export(module: nn.Module, example: torch.Tensor, out: Path, exporter: str, opset: int) -> None:
    # Exporter chatter (progress lines, tracer warnings) goes to stderr: stdout stays for the command's report.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        common = dict(input_names=["pixel_values"], output_names=["image_embeds"], opset_version=opset)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            options = dict(dynamic_shapes={"pixel_values": {0: batch}}, external_data=False, verbose=False)
        else:
            options = dict(dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
        torch.onnx.export(module, (example,), str(out), dynamo=exporter == "dynamo", **common, **options)


def export_onnx(
    model: str | os.PathLike | CheXficientModel,
    out: str | os.PathLike,
    *,
    int8: bool = False,
    exporter: str = "dynamo",
    opset: int = 18,
    min_cosine: float = 0.999,
    check_inputs: torch.Tensor | None = None,
) -> ExportReport:
    """Export, then check ONNX Runtime against PyTorch on `check_inputs` (default: 4 random images).

    Raises `RuntimeError` when the fp32 graph's minimum cosine to PyTorch is below `min_cosine`.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"--exporter must be one of {EXPORTERS}, got {exporter!r}.")
    if not isinstance(model, CheXficientModel):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"--model {model}: no such folder.")
        model = CheXficientModel.from_pretrained(model, attn_implementation="eager", local_files_only=True)
    model = model.float().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = int(model.config.vision_config.image_size)
    embedder = ImageEmbedder(model).eval()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _export(embedder, torch.randn(2, 3, size, size, generator=generator), out, exporter, opset)
    seconds = time.perf_counter() - start

    inputs = check_inputs if check_inputs is not None else torch.randn(4, 3, size, size, generator=generator)
    with torch.no_grad():
        reference = embedder(inputs.float()).numpy()
    parity = compare(reference, OnnxEmbedder(out).embed(inputs))
    logger.info("ONNX fp32 vs PyTorch: %s", parity)
    if not parity["min_cosine"] >= min_cosine:
        raise RuntimeError(
            f"{out}: ONNX Runtime disagrees with PyTorch (min cosine {parity['min_cosine']:.6f} < {min_cosine}, "
            f"max abs diff {parity['max_abs_diff']:.3g}); the export is not usable."
        )

    int8_path, int8_parity = None, None
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = out.with_name(out.stem + ".int8.onnx")
        quantize_dynamic(str(out), str(int8_path), weight_type=QuantType.QInt8)
        int8_parity = compare(reference, OnnxEmbedder(int8_path).embed(inputs))
        logger.info("ONNX int8 vs PyTorch fp32: %s", int8_parity)
    return ExportReport(str(out), str(int8_path) if int8_path else None, exporter, size, seconds, parity, int8_parity)


__all__ = ["EXPORTERS", "ExportReport", "ImageEmbedder", "OnnxEmbedder", "compare", "export_onnx"]
