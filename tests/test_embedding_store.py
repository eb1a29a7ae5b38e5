"""The embedding store under stress: SIGKILL at every moment of a shard's life, processes of a torchrun launch, a rank
killed and a resume with another world size, and a store too large for a safetensors export."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_model

from chexficient.inference.embed import run_embed
from chexficient.inference.engine import InferenceEngine
from chexficient.inference.store import (
    SAFETENSORS_HEADER_LIMIT,
    ShardWriter,
    export_embeddings,
    read_embeddings,
    read_manifest,
    read_store,
    shard_paths,
    stored_ids,
)
from chexficient.inference.synthetic import phantom_images, write_png


ROOT = Path(__file__).resolve().parent.parent

# Runs `chexficient embed` one image per shard and kills its own process with SIGKILL at the chosen moment of the
# COUNT-th shard (or of the manifest): half-way through writing the temporary file, after it is written but before
# the rename, right after the rename, or while writing the manifest.
KILLED_EMBED = """
import os, signal, sys
import pyarrow.parquet as pq
from chexficient.cli import main
from chexficient.inference import store

moment, count, folder, model, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
calls = []
real_write, real_replace, real_manifest = pq.write_table, os.replace, store._atomic_write_text


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def write_table(table, where, **kwargs):
    calls.append("write")
    if moment == "mid-write" and calls.count("write") == count:
        with open(where, "wb") as handle:
            handle.write(b"PAR1" + b"half of a shard")
        die()
    real_write(table, where, **kwargs)


def replace(source, target):
    calls.append("replace")
    if moment == "before-rename" and calls.count("replace") == count:
        die()
    real_replace(source, target)
    if moment == "after-rename" and calls.count("replace") == count:
        die()


def write_manifest_text(path, text):
    if moment == "manifest":
        with open(path.with_name(".tmp-manifest-half.json"), "w") as handle:
            handle.write(text[: len(text) // 2])
        die()
    real_manifest(path, text)


pq.write_table, store.os.replace, store._atomic_write_text = write_table, replace, write_manifest_text
main(["embed", folder, "--model", model, "--out", out, "--batch-size", "1", "--shard-rows", "1",
      "--num-workers", "0", "--no-progress"])
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store")
    save_tiny_model(root / "model")
    images = root / "images"
    images.mkdir()
    for i, image in enumerate(phantom_images(7, image_size=40, seed=3)):
        write_png(images / f"img{i}.png", image)
    reference = root / "reference"
    engine = InferenceEngine.from_pretrained(root / "model")
    run_embed(images, reference, engine, batch_size=4, num_workers=0, progress=False)
    return {"root": root, "model": root / "model", "images": images, "reference": reference}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def assert_same_as_reference(out: Path, reference: Path) -> None:
    ids, _, embeddings = read_embeddings(out)
    ref_ids, _, ref_embeddings = read_embeddings(reference)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(ref_ids)  # each image exactly once
    order = [ids.index(i) for i in ref_ids]
    assert np.abs(embeddings[order] - ref_embeddings).max() <= 1e-5
    assert read_manifest(out)["rows"] == len(ref_ids)


@pytest.mark.parametrize(
    "moment, count",
    [
        ("mid-write", 1),
        ("mid-write", 4),
        ("before-rename", 3),
        ("after-rename", 2),
        ("after-rename", 7),
        ("manifest", 0),
    ],
)
def test_sigkill_at_any_moment_of_a_shard_then_a_rerun_stores_each_image_once(corpus, tmp_path, moment, count):
    out = tmp_path / "emb"
    argv = [sys.executable, "-c", KILLED_EMBED, moment, str(count), str(corpus["images"]), str(corpus["model"])]
    killed = subprocess.run([*argv, str(out)], env=clean_env(), capture_output=True, text=True, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr  # it really died by SIGKILL
    complete = {"mid-write": count - 1, "before-rename": count - 1, "after-rename": count, "manifest": 7}[moment]
    assert len(stored_ids(out)) == complete  # only whole shards count, whatever the moment
    if moment != "after-rename":
        assert list(out.glob(".tmp-*"))  # the killed writer left a partial file behind

    engine = InferenceEngine.from_pretrained(corpus["model"])
    resumed = run_embed(corpus["images"], out, engine, batch_size=2, num_workers=0, progress=False)
    assert (resumed.embedded, resumed.skipped) == (7 - complete, complete)
    assert not list(out.glob(".tmp-*"))  # the partial files are gone once no writer is at work
    assert_same_as_reference(out, corpus["reference"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_processes_share_the_inputs_and_write_their_own_shards(corpus, tmp_path):
    out = tmp_path / "emb"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    embed = [
        "-m",
        "chexficient.cli",
        "embed",
        str(corpus["images"]),
        "--model",
        str(corpus["model"]),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        [*launch, *embed, "--batch-size", "2", "--num-workers", "0", "--no-progress"],
        env=clean_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    writers = {path.name.split("-")[1][:6] for path in shard_paths(out)}
    assert writers == {"r00000", "r00001"}  # both processes wrote, each under its own name
    assert len(read_store(out, ("id",))["id"]) == 7
    assert_same_as_reference(out, corpus["reference"])


def test_a_rank_killed_mid_run_is_completed_by_a_run_with_another_world_size(corpus, tmp_path):
    out = tmp_path / "emb"
    argv = [sys.executable, "-c", KILLED_EMBED, "after-rename", "2", str(corpus["images"]), str(corpus["model"])]
    killed = subprocess.run(
        [*argv, str(out)], env=clean_env(RANK="1", WORLD_SIZE="2"), capture_output=True, text=True, cwd=tmp_path
    )
    assert killed.returncode == -9, killed.stderr
    survived = stored_ids(out)
    assert len(survived) == 2 and all(int(i[3]) % 2 == 1 for i in survived)  # rank 1 owns img1, img3, img5
    engine = InferenceEngine.from_pretrained(corpus["model"])
    resumed = run_embed(corpus["images"], out, engine, batch_size=3, num_workers=0, progress=False)
    assert (resumed.embedded, resumed.skipped) == (5, 2)
    assert_same_as_reference(out, corpus["reference"])


def test_a_store_over_the_safetensors_header_limit_exports_to_parquet_and_says_so(tmp_path):
    rows, shard = 720_000, 120_000
    writer = ShardWriter(tmp_path / "emb", writer="big", shard_rows=shard)
    values = np.zeros((shard, 2), np.float32)
    for begin in range(0, rows, shard):
        ids = [f"p{10000000 + i}-s{50000000 + i}-{'0' * 40}-{i:07d}" for i in range(begin, begin + shard)]
        paths = [
            f"files/p{i % 100:02d}/p{10000000 + i}/s{50000000 + i}/{'a' * 60}{i:07d}.jpg"
            for i in range(begin, begin + shard)
        ]
        writer.append(ids, paths, values)
    writer.flush()
    with pytest.raises(ValueError, match=r"MB safetensors header, over its 100 MB limit.*\.parquet") as error:
        export_embeddings(tmp_path / "emb", tmp_path / "emb.safetensors")
    assert int(str(error.value).split(" MB")[0].split(" ")[-1]) * 1e6 > SAFETENSORS_HEADER_LIMIT
    assert not (tmp_path / "emb.safetensors").exists()
    export_embeddings(tmp_path / "emb", tmp_path / "emb.parquet")
    ids, paths, embeddings = read_embeddings(tmp_path / "emb.parquet")
    assert len(ids) == rows == len(set(ids)) and embeddings.shape == (rows, 2)
