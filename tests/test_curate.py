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
from chexficient.inference.curate import CurateOptions, curate_archive
from chexficient.inference.curation_report import near_duplicate_share
from chexficient.inference.store import read_store, shard_paths
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
