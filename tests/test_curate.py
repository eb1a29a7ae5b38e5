"""The archive-like phantom corpus, `chexficient curate` (end to end, resumed after a kill, equal to the trainer's
own curation on the same embeddings), and the warm-start path of pretraining."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from chexficient.cli import main as cli
from chexficient.inference.curate import CurateOptions, curate_archive, curate_embeddings
from chexficient.inference.curate_store import curate_store
from chexficient.inference.curation_report import knn_distances, near_duplicate_share
from chexficient.inference.store import ShardWriter, read_store, shard_paths, write_manifest
from chexficient.phantoms import PHANTOM_LABELS
from chexficient.phantoms.archive import (
    ARCHIVE_PREVALENCE,
    COMMON_FINDINGS,
    RARE_FINDINGS,
    generate_archive,
    write_archive_dataset,
)
from train.tokenizer import build_report_tokenizer

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


ROOT = Path(__file__).resolve().parent.parent
CURATION = ["--num-prototypes", "3", "--warmup-samples", "96"]


# ----- the archive-like corpus ---------------------------------------------------------------------------------------


def test_archive_has_a_dominant_normal_class_saturated_common_findings_and_a_rare_tail():
    studies = generate_archive(3000, seed=0, image_size=16)
    share = {label: np.mean([s.labels[label] for s in studies]) for label in PHANTOM_LABELS}
    assert 0.5 < share["No Finding"] < 0.68  # dominant
    for finding in COMMON_FINDINGS:
        assert share[finding] > 0.08  # saturated: hundreds of studies even in a 22% subset of a few thousand
    for finding in RARE_FINDINGS:
        assert ARCHIVE_PREVALENCE[finding] <= 0.02 and 0 < share[finding] < 0.04
    assert set(COMMON_FINDINGS) | set(RARE_FINDINGS) == set(PHANTOM_LABELS) - {"No Finding"}


def test_patients_have_repeated_studies_that_differ_only_in_noise_position_and_wording():
    studies = generate_archive(400, seed=1, image_size=48)
    by_patient: dict[str, list] = {}
    for study in studies:
        by_patient.setdefault(study.patient_id, []).append(study)
    sizes = np.array([len(group) for group in by_patient.values()])
    assert 2.0 < sizes.mean() < 3.0 and sizes.max() >= 4 and (sizes == 1).any()
    repeated = [group for group in by_patient.values() if len(group) >= 2]
    for first, second in ((g[0], g[1]) for g in repeated[:20]):
        assert first.labels == second.labels  # the same findings
        difference = np.abs(first.image.astype(float) - second.image.astype(float)).mean()
        assert 0 < difference < 25  # the same patient, another exposure
    reports = {(s.findings, s.impression) for g in repeated for s in g}
    assert len(reports) > 0.9 * sum(len(g) for g in repeated)  # reworded almost every time
    others = [by_patient[p][0] for p in list(by_patient)[:40]]
    unrelated = np.mean(
        [np.abs(a.image.astype(float) - b.image.astype(float)).mean() for a, b in zip(others, others[1:])]
    )
    assert (
        unrelated
        > 1.5
        * np.mean(  # studies of one patient are closer than studies of two
            [np.abs(g[0].image.astype(float) - g[1].image.astype(float)).mean() for g in repeated[:40]]
        )
    )


def test_test_splits_hold_one_study_per_patient_and_seeds_share_no_patient(tmp_path):
    written = write_archive_dataset(tmp_path, num_train=120, num_test=40, image_size=16)
    train, test = pd.read_csv(written["train"]), pd.read_csv(written["test"])
    assert test["patient_id"].is_unique and not train["patient_id"].is_unique
    assert list(train.columns[:5]) == ["id", "patient_id", "path", "findings", "impression"]
    other = {s.patient_id for s in generate_archive(120, seed=7, image_size=16)}
    assert not other & set(train["patient_id"]) and not set(test["patient_id"]) & set(train["patient_id"])
    first = [s.findings for s in generate_archive(30, seed=0, image_size=16)]
    assert first == train["findings"].tolist()[:30]  # deterministic for (seed, split)


# ----- chexficient curate ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict[str, Path]:
    """300 archive studies at 32 px and a tiny model without dropout (its embeddings do not depend on train mode)."""
    root = tmp_path_factory.mktemp("archive")
    written = write_archive_dataset(root / "data", num_train=300, num_test=0, image_size=32)
    frame = pd.read_csv(written["train"])
    tokenizer = build_report_tokenizer((frame.findings + " " + frame.impression).tolist(), vocab_size=400)
    text = dict(
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    CheXficientModel(tiny_config(text_config=text, num_prototypes=3)).save_pretrained(root / "model")
    processor = CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tokenizer)
    processor.save_pretrained(root / "model")
    return {"manifest": written["train"], "model": root / "model", "root": root}


def test_curate_end_to_end_writes_the_subset_record_report_and_figures(archive, capsys):
    out = archive["root"] / "cli"
    argv = ["curate", str(archive["manifest"]), "--model", str(archive["model"]), "--out", str(out)]
    assert cli([*argv, "--super-batch-size", "96", *CURATION, "--no-progress"]) == 0
    assert "kept" in capsys.readouterr().out
    record = json.loads((out / "curated_subset.json").read_text())
    subset = pd.read_csv(out / "subset.csv")
    pool = pd.read_csv(archive["manifest"])
    assert subset["id"].tolist() == record["ids"] == [pool["id"][i] for i in record["indices"]]
    assert list(subset.columns) == list(pool.columns)  # the input's rows, every column
    report = json.loads((out / "report.json").read_text())
    assert report["considered"] == 288 and 0 < report["kept"] == record["num_curated"] < 288  # 3 super-batches of 96
    assert sum(c["kept"] for c in report["clusters"]) == report["kept"] and len(report["clusters"]) == 3
    assert set(report["label_shares"]["curated"]) == set(PHANTOM_LABELS)
    chosen = pool["id"].isin(record["ids"]).to_numpy()
    for label in PHANTOM_LABELS:
        assert report["label_shares"]["curated"][label] == pytest.approx(pool[label].to_numpy()[chosen].mean())
    groups = pool["patient_id"].to_numpy()
    assert report["near_duplicate_share"]["curated"] == pytest.approx(near_duplicate_share(groups, chosen))
    assert (out / "figure_2a_pca.png").stat().st_size > 5000 and (out / "figure_2b_knn.png").exists()
    assert "Kept" in (out / "report.md").read_text()


def test_curate_resumes_after_a_kill_without_reembedding(archive, tmp_path, monkeypatch):
    reference = curate_archive(
        archive["manifest"],
        archive["model"],
        tmp_path / "whole",
        _config(),
        CurateOptions(super_batch_size=96, progress=False),
    )
    calls, armed = [], [True]
    real_forward = CheXficientModel.forward

    def dies_on_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if armed[0] and len(calls) == 3:
            raise KeyboardInterrupt("killed while embedding")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(CheXficientModel, "forward", dies_on_the_third_batch)
    out = tmp_path / "resumed"
    curate_in_batches_of_50 = functools.partial(
        curate_archive,
        archive["manifest"],
        archive["model"],
        out,
        _config(),
        CurateOptions(super_batch_size=96, batch_size=50, chunk_rows=50, progress=False),
    )
    with pytest.raises(KeyboardInterrupt):
        curate_in_batches_of_50()
    assert len(shard_paths(out / "embeddings")) == 2  # the two batches embedded before the kill were kept
    calls.clear()
    armed[0] = False
    resumed = curate_in_batches_of_50()
    assert len(calls) == 4  # 200 of 300 pairs embedded again, not all 300
    stored = read_store(out / "embeddings", ("id", "embedding", "text_embedding"))
    assert sorted(stored["id"]) == sorted(map(str, pd.read_csv(archive["manifest"])["id"]))  # each pair once
    assert stored["embedding"].shape == stored["text_embedding"].shape == (300, 16)
    assert resumed["kept"] == reference["kept"] and resumed["clusters"] == reference["clusters"]
    whole = json.loads((tmp_path / "whole" / "curated_subset.json").read_text())
    assert json.loads((out / "curated_subset.json").read_text())["ids"] == whole["ids"]


def _config():
    from chexficient.curation import CurationConfig

    return CurationConfig(num_prototypes=3, warmup_samples=96)


def test_curate_selects_what_the_trainer_selects_from_the_same_embeddings(archive, tmp_path):
    """The trainer's curation epoch with a frozen model (learning rate 0, no dropout: the same embeddings) keeps
    exactly the pairs `chexficient curate` keeps with the same seed and super-batch size: one curator, not a copy."""
    curated = curate_archive(
        archive["manifest"],
        archive["model"],
        tmp_path / "curate",
        _config(),
        CurateOptions(super_batch_size=96, seed=3, progress=False),
    )
    output = tmp_path / "trainer"
    run_trainer(
        archive,
        output,
        "--per_device_batch_size",
        "96",
        "--num_epochs",
        "1",
        "--seed",
        "3",
        "--learning_rate",
        "0",
        *CURATION,
    )
    trainer = json.loads((output / "final" / "curated_subset.json").read_text())
    mine = json.loads((tmp_path / "curate" / "curated_subset.json").read_text())
    assert trainer["ids"] == mine["ids"] and curated["kept"] == trainer["num_curated"] > 0


def run_trainer(archive: dict[str, Path], output: Path, *options: str) -> None:
    """`train/pretrain.py` on CPU from the archive's warm model and its tokenizer, on the archive's manifest."""
    command = [
        sys.executable,
        "train/pretrain.py",
        "--cpu",
        "--model_name_or_path",
        str(archive["model"]),
        "--tokenizer",
        str(archive["model"]),
        "--train_manifest",
        str(archive["manifest"]),
        "--output_dir",
        str(output),
        "--min_learning_rate",
        "0",
        "--num_workers",
        "0",
        "--report_to",
        "none",
        *options,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# ----- warm start --------------------------------------------------------------------------------------------------


def test_pretraining_starts_from_a_warm_model_and_its_tokenizer(archive, tmp_path):
    """`--model_name_or_path` + `--tokenizer`: the run continues the given weights (a frozen run exports them
    unchanged, a moving one starts there) and keeps the folder's tokenizer."""
    start = load_file(archive["model"] / "model.safetensors")
    runs = {}
    for name, lr in (("frozen", "0"), ("moving", "1e-3")):
        output = tmp_path / name
        run_trainer(
            archive,
            output,
            "--curation",
            "false",
            "--per_device_batch_size",
            "32",
            "--max_steps",
            "3",
            "--learning_rate",
            lr,
        )
        runs[name] = load_file(output / "final" / "model.safetensors")
        vocab = [
            json.loads((f / "tokenizer.json").read_text())["model"]["vocab"]
            for f in (output / "final", archive["model"])
        ]
        assert vocab[0] == vocab[1]  # the folder's tokenizer, not one built from the reports
    moved = 0.0
    for key, tensor in start.items():
        torch.testing.assert_close(runs["frozen"][key], tensor)
        moved = max(moved, float((runs["moving"][key] - tensor).abs().max()))
        assert float((runs["moving"][key] - tensor).abs().max()) < 0.1  # three small steps from the start
    assert moved > 0


# ----- chexficient curate --embeddings: a store of embeddings, streamed ------------------------------------------------


def clustered_pairs(num_rows: int, dim: int, seed: int = 0, zero_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image and report embeddings [N, dim] of pairs around 5 centres, L2-normalised; the first `zero_images` image
    rows all zero (how `curate` stores an unreadable image)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, 2 * dim)).astype(np.float32)
    rows = centres[rng.integers(0, 5, num_rows)] + 0.6 * rng.standard_normal((num_rows, 2 * dim)).astype(np.float32)
    images, texts = rows[:, :dim], rows[:, dim:]
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    images[:zero_images] = 0.0
    return np.ascontiguousarray(images), np.ascontiguousarray(texts)


def write_store(
    folder: Path, images: np.ndarray, texts: np.ndarray, shard_rows: int, append_rows: int = 250, name: str = "test"
) -> Path:
    """A store of the rows, in their order: shards of `shard_rows` (not a multiple of a super-batch), with reports;
    ids are the writer's `name` and the row number."""
    writer = ShardWriter(folder, writer=name, shard_rows=shard_rows)
    for begin in range(0, len(images), append_rows):
        end = min(begin + append_rows, len(images))
        ids = [f"{name}{i:06d}" for i in range(begin, end)]
        paths, reports = [f"images/{i}.png" for i in ids], [f"report {i}" for i in ids]
        writer.append(ids, paths, images[begin:end], reports, texts[begin:end])
    writer.flush()
    write_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory) -> dict:
    """3,000 clustered pairs (five with an unreadable image) in a store of 700-row shards."""
    images, texts = clustered_pairs(3000, 24, seed=0, zero_images=5)
    folder = write_store(tmp_path_factory.mktemp("store") / "emb", images, texts, shard_rows=700)
    return {"folder": folder, "images": images, "texts": texts}


def test_curate_embeddings_keeps_what_the_in_memory_curator_keeps_on_the_same_stream(
    pair_store, tmp_path, monkeypatch
):
    """`curate --embeddings` walks the store in its order; `curate_embeddings(..., shuffle=False)` walks the same
    rows in the same order from memory. One function decides every super-batch of both (`curation_step`), and they
    keep the same ids, with the flags the curator gave."""
    import chexficient.inference.curate as curate_module
    import chexficient.inference.curate_store as curate_store_module

    calls = []
    real_step = curate_module.curation_step

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(curate_module, "curation_step", counted)
    monkeypatch.setattr(curate_store_module, "curation_step", counted)
    out = tmp_path / "streamed"
    argv = ["curate", "--embeddings", str(pair_store["folder"]), "--out", str(out), "--super-batch-size", "96"]
    assert cli([*argv, "--seed", "3", "--knn-sample-rows", "500", "--no-progress", *CURATION]) == 0
    streamed_steps = list(calls)
    calls.clear()
    images, texts = torch.from_numpy(pair_store["images"]), torch.from_numpy(pair_store["texts"])
    run = curate_embeddings(
        images, texts, images.abs().sum(dim=1) > 0, _config(), super_batch_size=96, seed=3, shuffle=False
    )
    assert streamed_steps == calls == list(range(31))  # 3,000 rows: 31 super-batches of 96, the last 24 left out

    record = json.loads((out / "curated_subset.json").read_text())
    expected = run.kept.nonzero().squeeze(1).tolist()
    assert record["indices"] == expected and record["ids"] == [f"test{i:06d}" for i in expected]
    assert record["num_candidates"] == 3000 and 0 < record["num_curated"] < 2976

    subset = pd.read_parquet(out / "subset.parquet")
    assert list(subset.columns) == [
        "id", "path", "text", "index", "step", "prototype", "distance", "outlier", "support", "central",
    ]  # fmt: skip
    assert sorted(subset["index"]) == expected and set(subset["id"]) == set(record["ids"])
    assert subset["text"].tolist() == [f"report {i}" for i in subset["id"]]  # the store's report: a training manifest
    assert (subset["support"] | subset["central"]).all() and not subset["outlier"].any()
    assert subset["prototype"].between(0, 2).all()
    assert (subset["prototype"].to_numpy() == run.cluster_ids.numpy()[subset["index"]]).all()
    decisions = pd.read_parquet(out / "decisions.parquet")
    assert len(decisions) == 2976 and decisions["index"].is_unique and decisions["kept"].sum() == len(subset)
    assert (decisions.loc[decisions["index"] < 5, "prototype"] == -1).all()  # unreadable: never a candidate
    assert not decisions.loc[decisions["index"] < 5, "kept"].any()

    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == 3000 and report["readable"] == 2995 and report["considered"] == 2976
    assert report["kept"] == len(expected) and report["steps"] == 31
    assert [c["kept"] for c in report["clusters"]] == np.bincount(subset["prototype"], minlength=3).tolist()
    assert report["settings"]["order"] == "store" and report["subset_manifest"] == "subset.parquet"
    rows = report["knn"]["rows"]  # a sample of 500 rows of each set; the pool's drawn by position, the unreadable out
    assert 495 <= rows["pool"] <= 500 and rows["curated"] == rows["random"] == 500 and report["knn"]["sampled"]
    assert report["knn_distance"]["curated"] > 0 and (out / "figure_2a_pca.png").stat().st_size > 5000
    assert "Kept" in (out / "report.md").read_text()


def test_curate_embeddings_shuffled_sees_every_row_once_in_a_seeded_order(pair_store, tmp_path):
    options = CurateOptions(super_batch_size=96, seed=5, progress=False, shuffle=True, shuffle_rows=1000)
    runs = [curate_store(pair_store["folder"], tmp_path / name, _config(), options) for name in ("a", "b")]
    orders = [pd.read_parquet(tmp_path / name / "decisions.parquet")["index"].to_numpy() for name in ("a", "b")]
    assert (orders[0] == orders[1]).all() and runs[0]["kept"] == runs[1]["kept"]  # seeded
    assert len(orders[0]) == 2976 and len(set(orders[0])) == 2976  # each row at most once, 24 left out
    assert not (np.diff(orders[0]) > 0).all()  # not the store's order
    first = orders[0][:96]
    assert len({int(i) // 700 for i in first}) > 1  # a super-batch mixes shards
    assert runs[0]["settings"]["order"] == "shuffled"


def test_curate_embeddings_refuses_a_store_without_reports_and_mixed_arguments(archive, pair_store, tmp_path, capsys):
    images, _ = clustered_pairs(200, 8)
    bare = ShardWriter(tmp_path / "bare", writer="test")
    bare.append([str(i) for i in range(200)], [f"{i}.png" for i in range(200)], images)
    bare.flush()
    out = str(tmp_path / "out")
    assert cli(["curate", "--embeddings", str(tmp_path / "bare"), "--out", out]) == 2
    error = capsys.readouterr().err
    assert "no report embeddings" in error and "--text-column" in error
    store = str(pair_store["folder"])
    for argv, message in (
        (["curate", str(archive["manifest"]), "--embeddings", store, "--out", out], "not both"),
        (["curate", "--embeddings", store, "--model", str(archive["model"]), "--out", out], "not both"),
        (["curate", "--out", out], "nothing to curate"),
        (["curate", str(archive["manifest"]), "--out", out], "PAIRS needs --model"),
        (["curate", "--model", str(archive["model"]), "--out", out], "--model needs PAIRS"),
        (["curate", "--embeddings", str(tmp_path / "nothing"), "--out", out], "no embedding store"),
    ):
        assert cli(argv) == 2
        assert message in capsys.readouterr().err


def test_embed_then_curate_embeddings_end_to_end(archive, tmp_path, capsys):
    """`chexficient embed PAIRS.csv --text-column report` with the archive's model, then `chexficient curate
    --embeddings`: no model at curation time, the archive's pairs curated."""
    frame = pd.read_csv(archive["manifest"])
    root = Path(archive["manifest"]).parent
    pairs = pd.DataFrame(
        {
            "id": frame["id"].astype(str),
            "path": [str(root / p) for p in frame["path"]],
            "report": frame["findings"].fillna("") + " " + frame["impression"].fillna(""),
        }
    )
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    store = tmp_path / "emb"
    embed = ["embed", str(tmp_path / "pairs.csv"), "--model", str(archive["model"]), "--out", str(store)]
    assert cli([*embed, "--text-column", "report", "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "curated"
    argv = ["curate", "--embeddings", str(store), "--out", str(out), "--super-batch-size", "96", *CURATION]
    assert cli([*argv, "--no-progress"]) == 0
    assert "kept" in capsys.readouterr().out
    record = json.loads((out / "curated_subset.json").read_text())
    subset = pd.read_parquet(out / "subset.parquet")
    assert record["num_candidates"] == 300 and 0 < record["num_curated"] < 288
    assert sorted(subset["id"]) == sorted(record["ids"]) and set(record["ids"]) <= set(pairs["id"])
    texts = dict(zip(pairs["id"], pairs["report"].str.split().str.join(" ")))
    assert all(texts[i] == t for i, t in zip(subset["id"], subset["text"]))  # each kept pair with its report
    report = json.loads((out / "report.json").read_text())
    assert report["considered"] == 288 and report["kept"] == record["num_curated"] == len(subset)
    assert (out / "figure_2b_knn.png").exists()


def _peak_rss_growth(function) -> tuple[float, object]:
    """(MB the resident memory peaked above its level at the start while `function` ran, its result): the kernel's
    high-water mark, reset first (Linux)."""
    clear = Path("/proc/self/clear_refs")

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    try:
        clear.write_text("5")  # reset VmHWM
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak resident memory")
    before = status("VmRSS")
    result = function()
    return status("VmHWM") - before, result


def test_curate_embeddings_never_holds_the_pool(tmp_path):
    """A store of 96,000 pairs of 128 + 128 floats: its [N, 2D] matrix is 98 MB. Curating it streamed stays far
    below that (peak resident memory and numpy's allocations, tracked by tracemalloc), while reading the pool whole,
    the control, does not."""
    import tracemalloc

    import faiss  # noqa: F401  (imported before measuring: libraries are not the pool)
    import matplotlib.pyplot  # noqa: F401

    num_rows, dim = 96_000, 128
    pool_mb = num_rows * 2 * dim * 4 / 2**20
    folder = tmp_path / "emb"
    for part in range(4):  # written in parts: the test never holds the pool either
        images, texts = clustered_pairs(num_rows // 4, dim, seed=part)
        write_store(folder, images, texts, shard_rows=4096, append_rows=4096, name=f"part{part}")
        del images, texts
    options = CurateOptions(super_batch_size=480, progress=False, knn_sample_rows=2000)
    images, texts = clustered_pairs(8192, dim, seed=9)  # a first, small run: lazy imports and allocators set up
    curate_store(
        write_store(tmp_path / "small", images, texts, 4096, 4096), tmp_path / "small-out", _config(), options
    )
    del images, texts

    tracemalloc.start()
    try:
        growth, report = _peak_rss_growth(lambda: curate_store(folder, tmp_path / "out", _config(), options))
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["considered"] == 96_000 and report["kept"] > 0
    print(f"pool {pool_mb:.0f} MB: numpy peak {numpy_peak / 2**20:.1f} MB, resident growth {growth:.0f} MB")
    assert numpy_peak / 2**20 < 0.3 * pool_mb, f"numpy/Python peak {numpy_peak / 2**20:.0f} MB"
    assert growth < 0.5 * pool_mb, f"curating grew the resident memory by {growth:.0f} MB (pool {pool_mb:.0f} MB)"

    naive, table = _peak_rss_growth(lambda: read_store(folder, ("embedding", "text_embedding")))
    assert table["embedding"].shape == (num_rows, dim) and naive > pool_mb  # the bound would catch a whole read
    del table


def _knn_by_cdist(features: torch.Tensor, k: int = 5) -> np.ndarray:
    """The report's statistic as it was first written: the full N x N distance matrix."""
    distances = torch.cdist(features.float(), features.float())
    distances.fill_diagonal_(float("inf"))
    k = min(k, max(features.shape[0] - 1, 1))
    return distances.topk(k, dim=1, largest=False).values.mean(dim=1).numpy()


def test_knn_distances_equal_the_cdist_statistic_without_its_matrix():
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(300, 24, generator=generator), dim=1)
    features[10] = features[11]  # a duplicate pair: each is the other's nearest, at distance 0
    np.testing.assert_allclose(knn_distances(features), _knn_by_cdist(features), rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(knn_distances(features, 3), _knn_by_cdist(features, 3), rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(knn_distances(features[:4], 5), _knn_by_cdist(features[:4], 5), rtol=1e-4)
    assert np.isinf(knn_distances(features[:1])).all()  # no other row, as before

    many = np.random.default_rng(1).standard_normal((20_000, 8)).astype(np.float32)
    matrix_mb = 20_000**2 * 4 / 2**20  # what cdist would allocate: 1.5 GB
    growth, distances = _peak_rss_growth(lambda: knn_distances(many, max_rows=None))
    assert distances.shape == (20_000,) and np.isfinite(distances).all() and growth < 0.05 * matrix_mb
    reference = _knn_by_cdist(torch.from_numpy(many[:2000]))  # the same statistic on a part small enough for cdist
    np.testing.assert_allclose(knn_distances(many[:2000], max_rows=None), reference, rtol=1e-4, atol=1e-5)

    sampled = knn_distances(many, max_rows=5000, seed=2)
    assert sampled.shape == (5000,) and (sampled == knn_distances(many, max_rows=5000, seed=2)).all()
    assert sampled.mean() > distances.mean()  # a sample is sparser: the documented bias of the sampled figure
