"""The GPU suite and what it measures, on the CPU: `benchmarks/gpu_suite.py --tiny` end to end (every section, positive
numbers, the machine recorded), device-side preprocessing (`InferenceEngine(preprocess="gpu")`, `chexficient embed
--preprocess gpu`) against the workers' PIL pipeline, and bfloat16 on the CPU against float32."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny CheXficient (56 px, patch 14) with its image processor."""
    from llava_rad.demo import save_tiny_chexficient

    folder = tmp_path_factory.mktemp("gpu_suite") / "model"
    torch.manual_seed(0)
    save_tiny_chexficient(folder, image_size=56, hidden_size=32)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """8-bit and 16-bit PNGs and DICOMs of three sizes, plus three unreadable files."""
    from chexficient.inference.synthetic import phantom_images, write_corrupt_files, write_dicom, write_png

    folder = tmp_path_factory.mktemp("gpu_suite_images")
    for i, image in enumerate(phantom_images(3, image_size=96, bit_depth=8)):
        write_png(folder / f"a{i}.png", image)
    for i, image in enumerate(phantom_images(3, image_size=80, bit_depth=16, seed=1)):
        write_png(folder / f"b{i}.png", image)
        write_dicom(folder / f"c{i}.dcm", image[:, 8:])  # 80 x 72: a third size, cropped off-centre
    write_corrupt_files(folder / "bad", (folder / "a0.png").read_bytes())
    return folder


# ----- the suite ------------------------------------------------------------------------------------------------


def numbers(value) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


def test_tiny_suite_writes_every_section_with_positive_numbers(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_suite import REPORTED_SECTIONS

    out = tmp_path / "suite.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--device", "cpu", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == set(REPORTED_SECTIONS)
    for name in REPORTED_SECTIONS:
        assert "error" not in sections[name], (name, sections[name])
        assert sections[name]["peak_memory_mb"] > 0
    e = sections["embedding"]
    for key in ("end_to_end_images_per_s", "model_only_images_per_s"):
        assert e["stock"][key] > 0
    for part in ("model_only_bf16", "end_to_end_gpu_preprocess", "end_to_end_cpu_preprocess"):
        assert e[part]["images_per_s"] > 0 and e[part]["peak_memory_mb"] > 0
    assert e["end_to_end_gpu_preprocess"]["images"] == e["num_images"] and e["model_only_bf16"]["dtype"] == "bfloat16"
    assert all(v > 0 for v in e["ratios"].values())
    assert min(e["min_cosine_vs_stock"].values()) > 0.99  # bf16 and the device resize against the fp32 PIL path
    for mode in ("superbatch", "accumulate"):
        p = sections[f"pretrain_{mode}"]
        assert p["mode"] == mode and p["samples_per_s_per_gpu"] > 0 and p["seconds_per_step"] > 0
        assert 0 < p["kept_fraction"] <= 1 and p["ratio_vs_reference"] > 0
        assert p["samples_per_s_per_gpu"] == pytest.approx(p["candidates_per_step"] / p["seconds_per_step"])
        # the paper's compute statement, 24.7M samples in 220 H100-hours: 31.2 samples/s per GPU
        assert p["reference_samples_per_s_per_gpu"] == pytest.approx(31.19, abs=0.005)
        assert p["ratio_vs_reference"] == pytest.approx(p["samples_per_s_per_gpu"] / 31.187, rel=1e-3)
    stage2 = sections["llava_stage2"]
    assert stage2["seconds_per_step"] > 0 and stage2["tokens_per_s"] > 0 and stage2["trainable_parameters"] > 0
    assert all(math.isfinite(v) for v in stage2["losses"])
    generate = sections["llava_generate"]
    batches = [v for v in generate.values() if isinstance(v, dict)]
    assert len(batches) == 2 and all(b["tokens_per_s"] > 0 and b["prefill_s"] > 0 for b in batches)
    for name in REPORTED_SECTIONS:  # no zero or negative number anywhere
        assert all(n > 0 for n in numbers(sections[name])), (name, sections[name])

    machine = report["machine"]
    assert machine["cpu_model"] and machine["logical_cpus"] >= 1
    assert {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16"} <= set(machine["cpu_flags"])
    import accelerate
    import safetensors
    import transformers

    for module in (torch, transformers, accelerate, np, safetensors):  # the versions the suite ran with
        assert machine["libraries"][module.__name__] == module.__version__, module.__name__
    assert machine["libraries"]["deepspeed"] == metadata.version("deepspeed")
    assert machine["python"] == platform.python_version() and "gpu_model" in machine


# ----- device-side preprocessing -------------------------------------------------------------------------------


def test_gpu_preprocessing_matches_the_pil_pipeline_and_reports_the_same_failures(tiny_model, images, tmp_path):
    from chexficient.inference.embed import run_embed
    from chexficient.inference.engine import InferenceEngine
    from chexficient.inference.store import read_embeddings

    results, summaries = {}, {}
    for mode in ("cpu", "gpu"):
        engine = InferenceEngine.from_pretrained(tiny_model, "cpu", "float32", preprocess=mode)
        assert engine.info.preprocess == mode
        out = tmp_path / f"{mode}"
        summaries[mode] = run_embed(images, out, engine, batch_size=4, num_workers=0, progress=False)
        results[mode] = read_embeddings(out)
        errors = (out / "errors.csv").read_text().splitlines()
        assert len(errors) == 1 + 3 and all("bad/" in line for line in errors[1:])
    assert summaries["gpu"].embedded == summaries["cpu"].embedded == 9 and summaries["gpu"].failed == 3
    ids_cpu, _, cpu = results["cpu"]
    ids_gpu, _, gpu = results["gpu"]
    assert ids_gpu == ids_cpu
    assert cosines(cpu, gpu).min() > 0.999  # torch's antialiased bicubic vs PIL's: close, not bit-exact


def test_raw_batches_group_by_size_and_keep_16_bit_values(tiny_model, images):
    import PIL.Image

    from chexficient.data.images import InputItem
    from chexficient.inference.engine import InferenceEngine
    from chexficient.inference.gpu_preprocess import RawImageBatch, decode_raw

    engine = InferenceEngine.from_pretrained(tiny_model, "cpu", "float32", preprocess="gpu")
    processor = engine.image_processor
    png16 = images / "b0.png"
    with PIL.Image.open(png16) as image:
        original = np.asarray(image).astype(np.uint16)
    decoded = decode_raw(processor, png16, str(png16))
    assert decoded.dtype == np.uint16 and decoded.shape == (1, *original.shape)
    np.testing.assert_array_equal(decoded[0], original)  # 16-bit values travel exactly
    assert decode_raw(processor, images / "a0.png", "a0").dtype == np.uint8

    files = sorted(p for p in images.iterdir() if p.is_file())
    loader = engine.make_loader([InputItem(p.name, str(p)) for p in files], batch_size=len(files))
    (batch,) = list(loader)
    assert isinstance(batch, RawImageBatch) and len(batch.indices) == len(files)
    assert len(batch.groups) == 3  # 96 x 96 8-bit, 80 x 80 16-bit, 80 x 72 16-bit
    pixels = engine.batch_pixels(batch)
    assert pixels.shape == (len(files), 3, 56, 56) and pixels.dtype == torch.float32
    reference = np.stack([processor.process_one(str(files[i])) for i in batch.indices])
    assert np.abs(pixels.numpy() - reference).mean() < 0.02  # normalised units (std ~ 0.27)
    assert np.abs(pixels.numpy() - reference).max() < 0.5


def test_embed_command_takes_preprocess_gpu(tiny_model, images, tmp_path):
    from chexficient.cli import main
    from chexficient.inference.store import read_embeddings

    outputs = {}
    for mode in ("cpu", "gpu"):
        out = tmp_path / f"cli_{mode}"
        argv = ["embed", str(images), "--model", str(tiny_model), "--out", str(out), "--device", "cpu"]
        assert main([*argv, "--num-workers", "0", "--no-progress", "--preprocess", mode]) == 0
        outputs[mode] = read_embeddings(out)
    assert outputs["gpu"][0] == outputs["cpu"][0]
    assert cosines(outputs["gpu"][2], outputs["cpu"][2]).min() > 0.999


# ----- bfloat16 on the CPU ---------------------------------------------------------------------------------------


def test_bfloat16_on_the_cpu_agrees_with_float32(tiny_model, images):
    from chexficient.data.images import InputItem, make_image_loader
    from chexficient.inference.engine import InferenceEngine, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == "float32"  # "auto" never picks bf16 on a CPU
    fp32 = InferenceEngine.from_pretrained(tiny_model, "cpu", "float32")
    bf16 = InferenceEngine.from_pretrained(tiny_model, "cpu", "bfloat16")
    assert bf16.info.dtype == "bfloat16" and next(bf16.model.parameters()).dtype == torch.bfloat16
    files = sorted(p for p in images.glob("*.png"))
    items = [InputItem(p.name, str(p)) for p in files]
    (batch,) = list(make_image_loader(items, fp32.image_processor, batch_size=len(items)))
    a, b = fp32.embed_numpy(batch.pixel_values), bf16.embed_numpy(batch.pixel_values)
    assert b.dtype == np.float32 and a.shape == b.shape
    assert cosines(a, b).min() > 0.99
    assert np.abs(np.linalg.norm(b, axis=1) - 1).max() < 1e-2  # normalised in bf16


def test_bfloat16_warns_only_on_a_cpu_without_native_support(tiny_model, monkeypatch, caplog):
    import chexficient.runtime.machine as machine
    from chexficient.inference.engine import InferenceEngine, warn_if_slow_cpu_dtype

    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="chexficient.inference.engine"):
        engine = InferenceEngine.from_pretrained(tiny_model, "cpu", "bfloat16")
    assert engine.dtype == "bfloat16"  # allowed everywhere, only slower
    assert any("AVX512-BF16 or AMX-BF16" in record.getMessage() for record in caplog.records)
    caplog.clear()
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="chexficient.inference.engine"):
        InferenceEngine.from_pretrained(tiny_model, "cpu", "bfloat16")
    assert not caplog.records
    assert not warn_if_slow_cpu_dtype("float32", torch.device("cpu"))
    assert not warn_if_slow_cpu_dtype("bfloat16", torch.device("cuda"))


def test_machine_info_reads_the_cpu_flags(monkeypatch):
    import chexficient.runtime.machine as machine

    info = machine.machine_info()
    assert info["logical_cpus"] == os.cpu_count()
    assert set(info["libraries"]) >= {"torch", "transformers", "accelerate", "deepspeed"}
    assert isinstance(info["cpu_native_bf16"], bool)
    fake = "processor : 0\nmodel name : Test CPU\nflags : fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    machine._cpuinfo_text.cache_clear()
    monkeypatch.setattr(machine.Path, "read_text", lambda self: fake)
    try:
        assert machine.cpu_flags()["amx_bf16"] and not machine.cpu_flags()["avx512_vnni"]
        assert machine.cpu_has_native_bf16() and machine._cpuinfo()[0] == "Test CPU"
    finally:
        machine._cpuinfo_text.cache_clear()
