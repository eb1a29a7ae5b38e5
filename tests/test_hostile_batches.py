"""Hostile inputs to the batch commands (embed, classify, curate): one file no decoder can read never sinks the run,
manifests in another encoding or with duplicate ids are refused before anything is written, and a curate killed by
SIGKILL while a temporary file exists leaves nothing behind once re-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from helpers import save_tiny_model

from chexficient.cli import main
from chexficient.curation import CurationConfig
from chexficient.data.images import decode_image, discover_inputs, make_image_loader
from chexficient.inference.classify import run_classify
from chexficient.inference.curate import CurateOptions, curate_archive
from chexficient.inference.embed import run_embed
from chexficient.inference.engine import InferenceEngine
from chexficient.inference.store import read_store
from chexficient.inference.synthetic import phantom_images, write_png


ROOT = Path(__file__).resolve().parent.parent
REPORTS = ["no pneumothorax", "small left pleural effusion", "the lungs are clear", "large heart size"]
CURATION = ["--num-prototypes", "3", "--warmup-samples", "8", "--super-batch-size", "8", "--batch-size", "4"]


# ----- crafted files ---------------------------------------------------------------------------------------------


def undecodable_dds(path: Path) -> Path:
    """A well-formed DDS header with an ATI3 (3Dc) pixel format: Pillow opens it and has no decoder for it
    (NotImplementedError from Pillow itself)."""
    header = struct.pack("<4sIIIIIII", b"DDS ", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<II4sIIIII", 32, 0x4, b"ATI3", 0, 0, 0, 0, 0)
    caps = struct.pack("<IIIII", 0x1000, 0, 0, 0, 0)
    path.write_bytes(header + pixel_format + caps + b"\0" * 16)
    return path


def multi_page(path: Path, **save) -> Path:
    """A real 2-page 8-bit file (TIFF or GIF, by the suffix): Pillow writes it with save_all."""
    first, second = phantom_images(2, image_size=40, seed=5)
    PIL.Image.fromarray(first).save(path, save_all=True, append_images=[PIL.Image.fromarray(second)], **save)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_model(root / "model")
    images = root / "images"
    images.mkdir()
    good = [write_png(images / f"cxr{i:02d}.png", image) for i, image in enumerate(phantom_images(18, image_size=40))]
    odd = {
        "dds": undecodable_dds(images / "undecodable.dds"),
        "tiff": multi_page(images / "two_pages.tif"),
        "gif": multi_page(images / "two_frames.gif"),
    }
    return {"root": root, "model": root / "model", "good": good, "odd": odd}


def read_errors(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {row["path"]: row["message"] for row in csv.DictReader(handle)}


# ----- the policy, pinned with a decoder that raises anything ----------------------------------------------------


class RaisingProcessor:
    """An image processor whose decoder raises, for some file names, what a third-party decoder may raise."""

    errors = {
        "assert.png": AssertionError,
        "notimpl.png": lambda: NotImplementedError("Unimplemented pixel format 860443713"),
        "memory.png": MemoryError,
        "key.png": lambda: KeyError("tile"),
        "value.png": ValueError,  # the image processor's own: "PATH: reason"
    }

    def process_one(self, source, name=None):
        make = self.errors.get(Path(str(source)).name)
        if make is ValueError:
            raise ValueError(f"{name}: not a recognised image file.")
        if make is not None:
            raise make()
        return np.full((3, 4, 4), 0.5, np.float32)


@pytest.mark.parametrize("workers", [0, 2])
def test_any_exception_decoding_one_input_is_that_inputs_error_naming_it(tmp_path, workers):
    names = ["a.png", "assert.png", "b.png", "notimpl.png", "memory.png", "key.png", "value.png", "c.png"]
    paths = [str(tmp_path / name) for name in names]
    loader = make_image_loader(paths, RaisingProcessor(), batch_size=3, num_workers=workers)
    decoded, failed = [], {}
    for batch in loader:
        decoded += batch.indices
        failed.update({names[index]: message for index, message in batch.failed})
    assert [names[i] for i in decoded] == ["a.png", "b.png", "c.png"]
    assert sorted(failed) == sorted(RaisingProcessor.errors)
    for name, message in failed.items():
        assert message.startswith(str(tmp_path / name)), message  # the message names the file
    assert "AssertionError" in failed["assert.png"]
    assert "NotImplementedError: Unimplemented pixel format 860443713" in failed["notimpl.png"]
    assert "MemoryError" in failed["memory.png"] and "KeyError: 'tile'" in failed["key.png"]
    assert failed["value.png"] == f"{tmp_path / 'value.png'}: not a recognised image file."  # a ValueError as is

    pixels, message = decode_image(RaisingProcessor(), paths[1], "the first study")
    assert pixels is None and message.startswith("the first study: ") and "AssertionError" in message

    class Interrupted:
        def process_one(self, source, name=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupt is never one input's error
        list(make_image_loader([str(tmp_path / "a.png")], Interrupted(), batch_size=1))


# ----- the commands, on real files no decoder reads ----------------------------------------------------------------


def test_embed_goes_on_past_files_the_decoders_cannot_read(hostile, tmp_path, capsys):
    """A DDS whose pixel format Pillow cannot decode, a 2-page TIFF and a 2-frame GIF among good PNGs: each decodes
    or is that file's error, and the run embeds the rest, writes its shards and errors.csv, and says how many
    failed."""
    inputs = [*hostile["good"][:5], *hostile["odd"].values(), *hostile["good"][5:8]]
    out = tmp_path / "emb"
    argv = ["embed", *map(str, inputs), "--model", str(hostile["model"]), "--out", str(out), "--batch-size", "3"]
    assert main([*argv, "--num-workers", "2", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    errors = read_errors(out / "errors.csv")
    dds = str(hostile["odd"]["dds"])
    assert dds in errors and dds in errors[dds]  # the file, named in its own message
    assert set(errors) <= {str(path) for path in hostile["odd"].values()}
    stored = read_store(out, ("id",))["id"]
    assert sorted(stored) == sorted(str(p) for p in inputs if str(p) not in errors)  # everything else embedded
    assert f"embedded {len(stored)}, skipped 0" in summary and f"failed {len(errors)}" in summary

    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 0  # a re-run retries only the failed files
    assert f"embedded 0, skipped {len(stored)}" in capsys.readouterr().out


def test_an_embed_run_that_stops_keeps_the_rows_and_the_failures_it_had(hostile, tmp_path):
    """A crash that is not one input's (here the forward of the second batch) still writes the rows embedded before
    it as a shard and the failures so far to errors.csv, so the re-run embeds only the rest."""
    inputs = [*hostile["good"][:3], hostile["odd"]["dds"], *hostile["good"][3:6]]
    engine = InferenceEngine.from_pretrained(hostile["model"])
    real_forward, calls = engine.embed_pixels, []

    def crashing_forward(pixel_values):
        calls.append(len(pixel_values))
        if len(calls) > 1:
            raise RuntimeError("the device is gone")
        return real_forward(pixel_values)

    engine.embed_pixels = crashing_forward
    out = tmp_path / "emb"
    with pytest.raises(RuntimeError, match="the device is gone"):
        run_embed(inputs, out, engine, batch_size=4, num_workers=0, progress=False, shard_rows=4096)
    assert sorted(read_store(out, ("id",))["id"]) == sorted(map(str, hostile["good"][:3]))  # flushed, not lost
    assert list(read_errors(out / "errors.csv")) == [str(hostile["odd"]["dds"])]
    engine.embed_pixels = real_forward
    resumed = run_embed(inputs, out, engine, batch_size=4, num_workers=0, progress=False)
    assert (resumed.embedded, resumed.skipped, resumed.failed) == (3, 3, 1)


def test_classify_goes_on_past_a_file_the_decoders_cannot_read(hostile, tmp_path):
    inputs = [*hostile["good"][:3], hostile["odd"]["dds"], hostile["good"][3]]
    engine = InferenceEngine.from_pretrained(hostile["model"])
    out = tmp_path / "probs.csv"
    summary = run_classify(inputs, out, engine, ["Pneumothorax"], batch_size=2, num_workers=0, progress=False)
    assert (summary.classified, summary.failed) == (4, 1)
    assert list(read_errors(Path(f"{out}.errors.csv"))) == [str(hostile["odd"]["dds"])]


def write_pairs(path: Path, images: list[Path], ids: list[str] | None = None, encoding: str = "utf-8") -> Path:
    ids = ids or [f"p{i}" for i in range(len(images))]
    rows = [f"{i},{image},{REPORTS[n % len(REPORTS)]}" for n, (i, image) in enumerate(zip(ids, images))]
    path.write_bytes(("id,path,report\n" + "\n".join(rows) + "\n").encode(encoding))
    return path


def test_curate_goes_on_past_an_image_the_decoders_cannot_read(hostile, tmp_path):
    images = [*hostile["good"][:9], hostile["odd"]["dds"], *hostile["good"][9:16]]
    manifest = write_pairs(tmp_path / "pairs.csv", images)
    config = CurationConfig(num_prototypes=3, warmup_samples=8)
    options = CurateOptions(super_batch_size=8, batch_size=4, progress=False)
    report = curate_archive(manifest, hostile["model"], tmp_path / "out", config, options)
    assert (report["pairs"], report["readable"]) == (17, 16)
    assert report["unreadable"] == 1
    with open(tmp_path / "out" / "embeddings" / "errors.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["id"], row["path"]) for row in rows] == [("p9", str(hostile["odd"]["dds"]))]
    assert str(hostile["odd"]["dds"]) in rows[0]["message"]

    again = curate_archive(manifest, hostile["model"], tmp_path / "out", config, options)  # nothing left to embed
    assert again["unreadable"] == 1 and again["kept"] == report["kept"]
    with open(tmp_path / "out" / "embeddings" / "errors.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == rows  # the earlier run's report stands


# ----- manifests: encodings and duplicate ids, checked before anything is written ---------------------------------


def test_a_manifest_in_another_encoding_is_an_error_naming_the_file_and_the_line(hostile, tmp_path, capsys):
    images = hostile["good"][:4]
    manifest = write_pairs(tmp_path / "latin.csv", images, encoding="latin-1")
    text = manifest.read_bytes().replace(b"the lungs are clear", b"pleural \xe9panchement")
    manifest.write_bytes(text)  # latin-1 "é" in the third row's report: line 4
    offset = text.index(b"\xe9")
    model = ["--model", str(hostile["model"])]
    for argv in (
        ["embed", str(manifest), *model, "--out", str(tmp_path / "emb"), "--text-column", "report"],
        ["classify", str(manifest), *model, "--out", str(tmp_path / "p.csv"), "--labels", "Pneumothorax"],
        ["curate", str(manifest), *model, "--out", str(tmp_path / "curated"), *CURATION],
    ):
        assert main([*argv, "--num-workers", "0", "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert str(manifest) in error and "line 4" in error and f"byte 0xe9 at offset {offset}" in error, error
        assert "--encoding" in error and "codec can't decode" not in error
    assert not (tmp_path / "emb").exists() and not (tmp_path / "curated").exists()  # nothing written

    txt = tmp_path / "paths.txt"
    txt.write_bytes(f"{images[0]}\n{images[1]}\n".encode() + b"caf\xe9.png\n")
    with pytest.raises(ValueError, match=rf"{txt}: not valid utf-8 text: byte 0xe9 at offset \d+ \(line 3\)"):
        discover_inputs(txt)

    out = tmp_path / "emb"
    argv = ["embed", str(manifest), *model, "--out", str(out), "--text-column", "report", "--encoding", "latin-1"]
    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 0
    assert "pleural épanchement" in read_store(out, ("text",))["text"]


def test_a_utf8_manifest_with_a_byte_order_mark_reads(hostile, tmp_path):
    manifest = tmp_path / "bom.csv"
    manifest.write_bytes(b"\xef\xbb\xbfpath,id\n" + f"{hostile['good'][0]},a\n".encode())
    assert [item.id for item in discover_inputs(manifest)] == ["a"]


def test_curate_refuses_duplicate_ids_before_writing_anything(hostile, tmp_path, capsys):
    ids = ["a", "b", "a", "c", "b", "d", "b", "e", "f", "g"]  # more than a super-batch: only the ids are wrong
    manifest = write_pairs(tmp_path / "dups.csv", hostile["good"][:10], ids)
    out = tmp_path / "curated"
    argv = ["curate", str(manifest), "--model", str(hostile["model"]), "--out", str(out), *CURATION]
    assert main([*argv, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert str(manifest) in error and "2 duplicate input ids" in error
    assert "'a' (rows 2, 4)" in error and "'b' (rows 3, 6, 8)" in error
    assert not out.exists()  # checked before anything was written

    with pytest.raises(ValueError, match=r"dups\.csv: 2 duplicate input ids: 'a' \(rows 2, 4\)"):
        discover_inputs(manifest)  # embed's check is the same one


# ----- curate killed by SIGKILL while a temporary file exists -----------------------------------------------------

# Runs `chexficient curate`; the first rename of a hidden temporary file onto a name containing PATTERN waits, so
# that the test can kill the process with SIGKILL while the temporary file exists.
PAUSED_CURATE = """
import os, sys, time
from pathlib import Path

pattern, argv = sys.argv[1], sys.argv[2:]
real_replace = os.replace


def replace(source, target, *args, **kwargs):
    if Path(source).name.startswith(".tmp-") and pattern in Path(target).name:
        print("paused", source, flush=True)
        time.sleep(300)
    return real_replace(source, target, *args, **kwargs)


os.replace = replace
from chexficient.cli import main

sys.exit(main(argv))
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def kill_when_a_temporary_exists(argv: list[str], pattern: str, out: Path, log: Path) -> None:
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", PAUSED_CURATE, pattern, *argv],
            cwd=ROOT,
            env=clean_env(),
            stdout=handle,
            stderr=handle,
        )
    deadline = time.monotonic() + 240
    try:
        while not list(out.rglob(".tmp-*")):
            assert process.poll() is None, (
                f"curate ended (rc {process.returncode}) without a temporary {pattern}: " + (log.read_text()[-3000:])
            )
            assert time.monotonic() < deadline, "no temporary file within 240 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # it really died by SIGKILL


@pytest.mark.parametrize("pattern", ["part-", "curated_subset.json"])
def test_curate_killed_while_a_temporary_file_exists_reruns_clean_and_equal(hostile, tmp_path, pattern, capsys):
    manifest = write_pairs(tmp_path / "pairs.csv", hostile["good"][:16])
    model = ["--model", str(hostile["model"])]
    reference = tmp_path / "whole"
    assert main(["curate", str(manifest), *model, "--out", str(reference), *CURATION, "--no-progress"]) == 0
    out = tmp_path / "killed"
    argv = ["curate", str(manifest), *model, "--out", str(out), *CURATION, "--no-progress"]
    kill_when_a_temporary_exists(argv, pattern, out, tmp_path / "killed.log")
    assert list(out.rglob(".tmp-*"))  # the kill left a temporary file

    assert main(argv) == 0
    capsys.readouterr()
    assert not list(out.rglob(".tmp-*")), list(out.rglob(".tmp-*"))
    for name in ("curated_subset.json",):
        assert json.loads((out / name).read_text()) == json.loads((reference / name).read_text())
    assert (out / "subset.csv").read_text() == (reference / "subset.csv").read_text()
    report, whole = (json.loads((folder / "report.json").read_text()) for folder in (out, reference))
    assert report["kept"] == whole["kept"] and report["clusters"] == whole["clusters"]
