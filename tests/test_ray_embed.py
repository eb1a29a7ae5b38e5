"""`chexficient embed --engine ray` (Ray Data) against the single-process `run_embed`, on a local Ray with 2 CPUs:
the same store (ids, each once, embeddings within 1e-5), the same errors, and exactly-once resume."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import ray
import torch
from helpers import save_tiny_model

from chexficient.cli import main
from chexficient.inference.embed import run_embed
from chexficient.inference.engine import InferenceEngine
from chexficient.inference.ray_embed import _WriteShards, run_embed_ray, shard_writer_name
from chexficient.inference.store import read_embeddings, read_manifest, read_store, shard_paths
from chexficient.inference.synthetic import phantom_images, write_corrupt_files, write_dicom, write_png


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per module (its start is most of this file's time): 2 CPUs, no dashboard."""
    began = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    print(f"ray.init: {time.perf_counter() - began:.1f} s")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, object]:
    """A tiny model; five phantom images (8-bit PNGs, one in a subfolder, a 16-bit PNG, a DICOM) and two broken
    files; a .csv manifest of them with a report column."""
    root = tmp_path_factory.mktemp("ray_embed")
    torch.manual_seed(0)
    save_tiny_model(root / "model")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    good = [write_png(images / ("sub" if i == 2 else ".") / f"cxr{i}.png", x) for i, x in enumerate(phantom_images(3))]
    wide = phantom_images(2, image_size=56, bit_depth=16, seed=1)
    good += [write_png(images / "high.png", wide[0]), write_dicom(images / "study.dcm", wide[1])]
    buffer = io.BytesIO()
    PIL.Image.fromarray(phantom_images(1)[0]).save(buffer, format="PNG")
    bad = write_corrupt_files(images / "broken", buffer.getvalue())[:2]  # empty.png, report.png
    (images / "broken" / "truncated.png").unlink()
    manifest = root / "pairs.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "report"])
        for i, path in enumerate(good + bad):
            writer.writerow([f"study{i}", str(path), f"FINDINGS: study {i}. =no effusion"])
    return {"root": root, "model": root / "model", "images": images, "manifest": manifest, "good": good, "bad": bad}


def local_store(workspace, source, out: Path, text_column: str | None = None) -> Path:
    """The single-process reference: `run_embed` on the CPU."""
    engine = InferenceEngine.from_pretrained(workspace["model"], "cpu", "float32")
    run_embed(source, out, engine, batch_size=2, num_workers=0, progress=False, text_column=text_column)
    return out


def errors(out: Path) -> list[dict[str, str]]:
    with (out / "errors.csv").open(newline="") as handle:
        return sorted(csv.DictReader(handle), key=lambda row: row["id"])


def assert_same_store(ray_out: Path, local_out: Path, columns=("id", "path", "embedding")) -> None:
    """Same ids, each once; the same paths and texts; every embedding column within 1e-5."""
    got, want = read_store(ray_out, columns), read_store(local_out, columns)
    assert len(got["id"]) == len(set(got["id"])), "an id is stored twice"
    assert sorted(got["id"]) == sorted(want["id"])
    order = [got["id"].index(i) for i in want["id"]]
    for name in columns:
        if name.endswith("embedding"):
            assert np.abs(got[name][order] - want[name]).max() <= 1e-5, name
        elif name != "id":
            assert [got[name][i] for i in order] == want[name], name


def test_cli_ray_run_equals_the_single_process_run(local_ray, workspace, tmp_path):
    reference = local_store(workspace, workspace["images"], tmp_path / "local")
    out = tmp_path / "ray"
    argv = ["embed", str(workspace["images"]), "--model", str(workspace["model"]), "--out", str(out)]
    began = time.perf_counter()
    options = ["--engine", "ray", "--batch-size", "2", "--shard-rows", "3", "--dtype", "float32", "--no-progress"]
    options += ["--export", str(tmp_path / "all.parquet")]
    # stdout only: capsys here leaves Ray Data's logging writing to a closed stream in later tests
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main([*argv, *options]) == 0
    print(f"ray run (5 images, 2 broken): {time.perf_counter() - began:.1f} s")
    printed = printed.getvalue()
    assert "embedded 5, skipped 0" in printed and "failed 2" in printed

    assert_same_store(out, reference)
    assert errors(out) == errors(reference)  # the same files, the same messages (each naming its file)
    for row in errors(out):
        assert Path(row["path"]).name in row["message"]
    manifest = read_manifest(out)
    assert manifest["rows"] == 5 and manifest["model"]["engine"] == "ray" and manifest["model"]["dtype"] == "float32"
    assert {s["name"] for s in manifest["shards"]} == {p.name for p in shard_paths(out)}
    assert all(s["rows"] <= 3 for s in manifest["shards"])  # --shard-rows bounds every shard
    assert sorted(read_embeddings(tmp_path / "all.parquet")[0]) == sorted(read_store(out)["id"])


def test_ray_resume_with_reports_embeds_only_the_rest_exactly_once(local_ray, workspace, tmp_path):
    manifest = workspace["manifest"]
    reference = local_store(workspace, manifest, tmp_path / "local", text_column="report")
    first_two = tmp_path / "first_two.csv"  # a store that already holds two ids, written by the local engine
    first_two.write_text("\n".join(manifest.read_text().splitlines()[:3]) + "\n")
    out = local_store(workspace, first_two, tmp_path / "ray", text_column="report")

    began = time.perf_counter()
    summary = run_embed_ray(
        manifest, out, workspace["model"], batch_size=2, text_column="report", shard_rows=2, progress=False
    )
    print(f"ray run (resume, 3 of 5 images, reports): {time.perf_counter() - began:.1f} s")
    assert (summary.embedded, summary.skipped, summary.failed, summary.total_rows) == (3, 2, 2, 5)
    assert_same_store(out, reference, ("id", "path", "text", "embedding", "text_embedding"))
    assert errors(out) == errors(reference)
    assert len(shard_paths(out)) == 1 + len(summary.shards)  # the local run's shard and the Ray run's


def test_a_retried_write_replaces_its_shard_instead_of_storing_the_rows_twice(tmp_path):
    batch = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "path": np.array(["/a.png", "/b.png", "/c.png"], dtype=object),
        "error": np.array(["", "/b.png: empty file (0 bytes).", ""], dtype=object),
        "embedding": np.eye(3, 4, dtype=np.float32),
    }
    write = _WriteShards(str(tmp_path))
    first, again = write(batch), write(batch)  # Ray retries a write whose node was lost after the rename
    assert first["shard"][0] == again["shard"][0] == f"part-{shard_writer_name(['a', 'c'])}-00000.parquet"
    assert [p.name for p in shard_paths(tmp_path)] == [first["shard"][0]]
    assert read_store(tmp_path)["id"] == ["a", "c"]
    assert json.loads(first["failures"][0]) == [["b", "/b.png: empty file (0 bytes)."]]
    assert shard_writer_name(["a", "c"]) != shard_writer_name(["a", "b"])


def test_ray_errors_are_clear(local_ray, workspace, tmp_path, capsys, monkeypatch):
    argv = ["embed", str(workspace["images"]), "--model", str(workspace["model"]), "--out", str(tmp_path / "e")]
    assert main([*argv, "--engine", "ray", "--gpus-per-actor", "1", "--no-progress"]) == 2  # no GPU here
    assert "--gpus-per-actor 0" in capsys.readouterr().err
    assert main([*argv, "--num-actors", "2"]) == 2  # a Ray option without --engine ray
    assert "need --engine ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert main([*argv, "--engine", "ray"]) == 2
    assert "pip install 'chexficient[scale]'" in capsys.readouterr().err
