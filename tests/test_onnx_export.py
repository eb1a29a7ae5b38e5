"""`chexficient export-onnx`: ONNX Runtime reproduces `get_image_features`; int8 stays close; disagreement fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import save_tiny_model
from test_inference_cli import write_inputs

from chexficient.cli import main
from chexficient.inference.onnx_export import OnnxEmbedder, compare, export_onnx

from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


def test_export_cli_parity_dynamic_batch_and_int8(tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir)
    good, _ = write_inputs(tmp_path / "images")
    out = tmp_path / "onnx" / "chexficient.onnx"
    assert main(["export-onnx", "--model", str(model_dir), "--out", str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{\n") :])  # an installed deepspeed may log a line to stdout first
    assert report["parity"]["min_cosine"] >= 0.999 and report["image_size"] == 28
    assert report["int8_path"] == str(tmp_path / "onnx" / "chexficient.int8.onnx")

    model = CheXficientModel.from_pretrained(model_dir).eval()
    processor = CheXficientProcessor.from_pretrained(model_dir)
    pixels = torch.from_numpy(np.stack([processor.image_processor.process_one(p) for p in good]))
    with torch.no_grad():
        expected = model.get_image_features(pixels).numpy()
    session = OnnxEmbedder(out)
    np.testing.assert_allclose(session.embed(pixels), expected, atol=1e-4)  # batch 6, exported with batch 2
    np.testing.assert_allclose(session.embed(pixels[:1]), expected[:1], atol=1e-4)

    int8 = compare(expected, OnnxEmbedder(report["int8_path"]).embed(pixels))
    assert int8["min_cosine"] > 0.98, int8
    assert int8["max_abs_diff"] > 1e-6  # the quantised graph is really a different graph


def test_export_fails_loudly_when_onnx_disagrees(tmp_path, config):
    model = CheXficientModel(config).eval()
    with pytest.raises(RuntimeError, match="disagrees with PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", min_cosine=1.5)
    report = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript")  # the legacy exporter works too
    assert report.parity["min_cosine"] >= 0.999 and report.int8_path is None
