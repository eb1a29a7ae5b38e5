"""End-to-end curated pretraining on the phantoms: one process, resume after SIGKILL, 2 processes and DeepSpeed (each
against the single-process run), accumulate mode, the random-subset baseline."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chexficient.phantoms import PHANTOM_LABELS


ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 8,
        "image_size": 32,
    },
    "text_config": {
        "vocab_size": 256,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "projection_dim": 32,
}
# the same without dropout: each process draws its own dropout masks, so only a dropout-free run can equal the
# single-process run on several processes
TINY_NO_DROPOUT = {
    **TINY,
    "text_config": {**TINY["text_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "tiny_no_dropout.json").write_text(json.dumps(TINY_NO_DROPOUT))
    return root


def common_args(workspace: Path, output: Path, cpu: bool = True, **overrides) -> list[str]:
    values = {
        "model_config": str(workspace / "tiny.json"),
        "output_dir": str(output),
        "phantom_dir": str(workspace / "phantoms"),
        "phantom_num_train": 100,
        "phantom_num_eval": 20,
        "phantom_num_test": 40,
        "phantom_image_size": 48,
        "per_device_batch_size": 24,
        "curated_batch_size": 8,
        "num_epochs": 3,
        "warmup_samples": 48,
        "num_prototypes": 3,
        "num_workers": 0,
        "tokenizer_vocab_size": 200,
        "learning_rate": 1e-3,
        "report_to": "none",
        "logging_steps": 1,
        "trace_samples": True,
    }
    values.update(overrides)
    args = ["--cpu"] if cpu else []  # DeepSpeed finds the CPU itself; Accelerator(cpu=True) would bypass it
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def launch_two_processes(launcher_args: list[str], script_args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of train/pretrain.py on two local processes."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
    return run([*launcher, *launcher_args, "train/pretrain.py", *script_args])


def read_trace(output: Path) -> dict[int, dict]:
    """Step -> record; a later line for the same step (written after a resume) wins."""
    records = {}
    for line in (output / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def test_single_process_run_curates_trains_and_exports(workspace):
    output = workspace / "single"
    result = run([sys.executable, "train/pretrain.py", *common_args(workspace, output)])
    summary = json.loads((output / "summary.json").read_text())
    assert "test zero-shot macro AUROC (paper prompts)" in result.stdout
    for prompts in ("paper", "report"):
        test = summary["test"][prompts]
        assert test["prompts"] == prompts and test["num_images"] == 40
        assert set(test["auroc"]) | set(test["skipped_classes"]) == set(PHANTOM_LABELS)
    subset = json.loads((output / "final" / "curated_subset.json").read_text())
    assert 0 < subset["num_curated"] < subset["num_candidates"] == 100  # validation rows come on top
    assert summary["unreadable_images"] >= 1  # the phantoms' corrupt files were met and skipped
    trace = read_trace(output)
    curation_steps = [r for r in trace.values() if r["epoch"] == 0]
    later = [r for r in trace.values() if r["epoch"] > 0]
    assert len(curation_steps) == 100 // 24
    assert all(set(r["indices"]) <= set(subset["indices"]) for r in later)  # later epochs walk the subset only
    kept = {i for r in curation_steps for i in r["kept"]}
    assert kept == set(subset["indices"])
    # the exported folder is a complete HF model
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(output / "final", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output / "final", trust_remote_code=True)
    assert processor.image_processor.size == {"shortest_edge": 32}
    assert model.prototypes.abs().sum() > 0  # the curator's prototypes travel with the model
    # a plain tokenizer of the folder truncates at the text tower's positions, and replays no loading arguments
    saved = json.loads((output / "final" / "tokenizer_config.json").read_text())
    assert (
        saved["model_max_length"]
        == model.config.text_config.max_position_embeddings
        == processor.tokenizer.model_max_length
    )
    assert not {"is_local", "local_files_only"} & set(saved)


def kill_after_checkpoint(workspace: Path, output: Path, step: int, **args) -> None:
    """Start a run and SIGKILL it as soon as the checkpoint of `step` is complete."""
    process = subprocess.Popen(
        [sys.executable, "train/pretrain.py", *common_args(workspace, output, **args)],
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = output / "checkpoints" / f"step-{step:08d}" / "checkpoint_complete.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize(
    "kill_at",
    [4, 10],
    ids=["at-the-end-of-the-curation-epoch", "in-the-middle-of-a-post-curation-epoch"],
)
def test_killed_run_resumes_without_repeating_or_losing_samples(workspace, kill_at):
    """The resumed process starts at its checkpoint's step and never runs the steps before it; together the two
    processes run every step of an uninterrupted run once, on the same samples, to the same weights."""
    args = dict(save_steps=2, num_epochs=4)
    reference = workspace / "reference"
    if not (reference / "summary.json").exists():
        run([sys.executable, "train/pretrain.py", *common_args(workspace, reference, **args)])
    killed = workspace / f"killed-{kill_at}"
    kill_after_checkpoint(workspace, killed, kill_at, **args)

    resumed = run(
        [sys.executable, "train/pretrain.py", *common_args(workspace, killed, resume_from_checkpoint="latest", **args)]
    )
    started = re.search(r"resumed from \S+ at step (\d+)", resumed.stdout)
    assert started, resumed.stdout[-2000:]
    checkpoint_step = int(started.group(1))
    assert checkpoint_step >= kill_at and checkpoint_step % 2 == 0
    records = [json.loads(line) for line in (killed / "samples.jsonl").read_text().splitlines()]
    second = [r["step"] for r in records if r["resumed_from"] == checkpoint_step]
    first = [r["step"] for r in records if r["resumed_from"] is None]
    assert second and min(second) == checkpoint_step + 1  # started at the checkpoint's step, not from step 1
    assert second == list(range(checkpoint_step + 1, max(second) + 1))  # and never ran a step twice
    assert set(range(1, checkpoint_step + 1)) <= set(first)  # the killed process had run those
    expected, got = read_trace(reference), read_trace(killed)
    assert sorted(got) == sorted(expected)  # every step ran
    for step in expected:
        assert got[step]["indices"] == expected[step]["indices"], step
        assert got[step]["kept"] == expected[step]["kept"], step
    subset = json.loads((killed / "final" / "curated_subset.json").read_text())
    assert subset == json.loads((reference / "final" / "curated_subset.json").read_text())
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


NO_PICKLE_RESUME = """
import pickle, runpy, sys, torch

real_load = torch.load
loaded = []


def weights_only_load(*args, **kwargs):
    if kwargs.get("weights_only") is False:
        raise SystemExit(f"unpickled {args[0]} with weights_only=False")
    loaded.append(str(args[0]))
    return real_load(*args, **kwargs)


def refuse(*args, **kwargs):
    raise SystemExit("pickle.load(s) called while resuming")


torch.load, pickle.load, pickle.loads = weights_only_load, refuse, refuse
sys.argv = ["train/pretrain.py", *sys.argv[1:]]
runpy.run_path("train/pretrain.py", run_name="__main__")
print("torch.load:", loaded)
"""


def test_resume_loads_no_pickle(workspace, tmp_path):
    """Model, optimizer and schedule come back through Accelerate's weights-only loads; the curator and the train
    state from safetensors and JSON: nothing is unpickled."""
    output = workspace / "no-pickle"
    args = dict(save_steps=2, num_epochs=2, max_steps=6)
    run([sys.executable, "train/pretrain.py", *common_args(workspace, output, **args)])
    checkpoint = output / "checkpoints" / "step-00000006"
    assert (checkpoint / "curator.safetensors").exists() and (checkpoint / "curator.json").exists()
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # no pickled custom state
    script = tmp_path / "resume_without_pickle.py"
    script.write_text(NO_PICKLE_RESUME)
    resumed = run(
        [
            sys.executable,
            str(script),
            *common_args(workspace, output, resume_from_checkpoint=str(checkpoint), **{**args, "max_steps": 8}),
        ]
    )
    assert "resumed from" in resumed.stdout and "at step 6" in resumed.stdout
    assert "optimizer.bin" in resumed.stdout  # the optimizer state was loaded, weights-only
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 8


def world_size_args(workspace: Path, output: Path, world_size: int, cpu: bool = True) -> list[str]:
    """One run for any number of processes: global super-batches of 24 while curating and 16 after, no dropout."""
    return common_args(
        workspace,
        output,
        cpu=cpu,
        model_config=str(workspace / "tiny_no_dropout.json"),
        per_device_batch_size=24 // world_size,
        curated_batch_size=16 // world_size,
        num_epochs=2,
    )


@pytest.fixture(scope="module")
def single_process_reference(workspace) -> Path:
    output = workspace / "reference-one-process"
    run([sys.executable, "train/pretrain.py", *world_size_args(workspace, output, 1)])
    return output


def assert_same_run_as(output: Path, reference: Path) -> None:
    """A run on several processes is the single-process run of the same seed: the sampler gives each step the same
    global super-batch, k-means starts from the same warm-up sequence, the gathered loss has the single-process
    gradient and the schedule advances once per step, so every step keeps the same pairs with the same loss and
    learning rate, the curated subset is the same and the weights agree to float32 round-off."""
    expected, got = read_trace(reference), read_trace(output)
    assert sorted(got) == sorted(expected)
    for step, record in expected.items():
        assert got[step]["indices"] == record["indices"], step
        assert got[step]["kept"] == record["kept"], step
        assert got[step]["lr"] == pytest.approx(record["lr"], rel=1e-9), step
        assert got[step]["loss"] == pytest.approx(record["loss"], abs=1e-4), step
    subset = json.loads((output / "final" / "curated_subset.json").read_text())
    assert subset == json.loads((reference / "final" / "curated_subset.json").read_text())
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(output / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # attention key biases have an exactly zero gradient (a softmax ignores a shift of its logits), whose
        # round-off AdamW normalises into updates of up to the learning rate: they are free to differ
        if not key.endswith(".key.bias"):
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_two_processes_over_gloo_share_one_super_batch(workspace, single_process_reference):
    output = workspace / "two"
    launch_two_processes(
        ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"],
        world_size_args(workspace, output, 2),
    )
    trace = read_trace(output)
    first = trace[1]
    assert len(first["indices"]) == 24 and len(set(first["indices"])) == 24  # 2 ranks x 12, gathered
    subset = json.loads((output / "final" / "curated_subset.json").read_text())
    assert subset["num_curated"] > 0 and (output / "final" / "model.safetensors").exists()
    assert_same_run_as(output, single_process_reference)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu(workspace, single_process_reference, stage):
    output = workspace / f"zero{stage}"
    launch_two_processes(
        ["--use_deepspeed", "--deepspeed_config_file", f"train/configs/deepspeed_zero{stage}.json"],
        world_size_args(workspace, output, 2, cpu=False),
    )
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] > 0
    checkpoint = next((output / "checkpoints").glob("step-*"))
    shards = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2 and all("zero_pp_rank" in name for name in shards), shards  # ZeRO partitioned it
    # the export gathers partitioned parameters: every tensor has its full shape and the folder loads
    from modeling_chexficient import CheXficientModel

    exported = load_file(output / "final" / "model.safetensors")
    model = CheXficientModel.from_pretrained(output / "final")
    assert all(v.numel() > 0 for v in exported.values())
    assert model.vision_model.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
    assert_same_run_as(output, single_process_reference)  # no gradient clipping unless asked, as on one process


def test_accumulate_mode_steps_on_the_selection_only(workspace):
    output = workspace / "accumulate"
    run(
        [
            sys.executable,
            "train/pretrain.py",
            *common_args(
                workspace,
                output,
                curation_mode="accumulate",
                candidate_pool_size=40,
                embedding_chunk_size=16,
                num_epochs=2,
            ),
        ]
    )
    trace = read_trace(output)
    first = trace[1]
    assert len(first["indices"]) == 40 and 0 < len(first["kept"]) < 40


def test_subset_smaller_than_one_curated_batch_still_trains(workspace):
    """Before: 0 steps after the curation epoch, silently. Now the batch shrinks to the subset, with a warning."""
    output = workspace / "small-subset"
    result = run(
        [sys.executable, "train/pretrain.py", *common_args(workspace, output, curated_batch_size=500, num_epochs=3)]
    )
    subset = json.loads((output / "final" / "curated_subset.json").read_text())
    assert "is smaller than one curated super-batch" in result.stdout
    later = [r for r in read_trace(output).values() if r["epoch"] > 0]
    assert [r["epoch"] for r in later] == [1, 2]  # one step per post-curation epoch
    assert all(sorted(r["indices"]) == subset["indices"] for r in later)  # each walks the whole subset


# ----- the random-subset baseline (CheXrandom) ----------------------------------------------------------------------


def test_random_subset_is_a_seeded_draw_of_the_stated_size():
    from types import SimpleNamespace

    from chexficient.curation import CurationConfig
    from train.arguments import parse_arguments
    from train.pretrain import build_sampler, random_subset

    subset = random_subset(100, CurationConfig(random_subset_size=30), seed=0)
    assert len(subset) == 30 == len(set(subset.tolist())) and 0 <= subset.min() and subset.max() < 100
    assert sorted(subset.tolist()) != list(range(30))  # drawn, not the first rows
    assert torch.equal(subset, random_subset(100, CurationConfig(random_subset_size=30), seed=0))  # per seed
    assert set(subset.tolist()) != set(random_subset(100, CurationConfig(random_subset_size=30), seed=1).tolist())
    assert len(random_subset(100, CurationConfig(random_subset_ratio=0.25), seed=0)) == 25
    assert len(random_subset(100, CurationConfig(random_subset_size=500), seed=0)) == 100  # at most the pool

    args = parse_arguments(["--random_subset_size", "30", "--per_device_batch_size", "8", "--seed", "3"])
    assert not args.curating
    sampler = build_sampler(args, 100, SimpleNamespace(process_index=0, num_processes=1))
    assert sampler.curation_epochs == 0 and not sampler.is_curating  # no curation epoch over the whole pool
    assert sampler.curated_ids.tolist() == sorted(random_subset(100, args.curation, 3).tolist())
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = [i for batch in sampler for i in batch]
        assert len(seen) == 24 == len(set(seen)) and set(seen) <= set(sampler.curated_ids.tolist())


def test_random_subset_run_trains_on_it_resumes_on_it_and_records_it(workspace, single_process_reference):
    """A CheXrandom run trains on the seed's random subset only, every epoch; killed and resumed, it keeps the same
    subset and ends where the uninterrupted run ends; its record has the curated run's form."""
    from chexficient.curation import CurationConfig
    from chexficient.data.pairs import load_pairs
    from train.pretrain import random_subset

    args = dict(random_subset_size=30, num_epochs=3, save_steps=2)
    uninterrupted = workspace / "random"
    run([sys.executable, "train/pretrain.py", *common_args(workspace, uninterrupted, **args)])
    killed = workspace / "random-killed"
    kill_after_checkpoint(workspace, killed, 4, **args)
    resumed = run(
        [sys.executable, "train/pretrain.py", *common_args(workspace, killed, resume_from_checkpoint="latest", **args)]
    )
    assert "resumed from" in resumed.stdout

    expected = sorted(random_subset(100, CurationConfig(random_subset_size=30), seed=0).tolist())
    pairs = load_pairs(workspace / "phantoms" / "train_split.csv", image_root=workspace / "phantoms")
    for output in (uninterrupted, killed):
        subset = json.loads((output / "final" / "curated_subset.json").read_text())
        reference = json.loads((single_process_reference / "final" / "curated_subset.json").read_text())
        assert subset.keys() == reference.keys() and subset["format"] == reference["format"]
        assert subset["indices"] == expected and subset["ids"] == [pairs.ids[i] for i in expected]
        assert subset["num_curated"] == 30 and subset["num_candidates"] == 100 and subset["ratio"] == 0.3
        summary = json.loads((output / "summary.json").read_text())
        assert summary["curated_pairs"] == 30 and summary["curated_ratio"] == 0.3
        trace = read_trace(output)
        assert sorted(trace) == list(range(1, 10))  # 3 epochs of 30 // 8 steps, none over the whole pool
        for epoch in range(3):
            steps = [r for r in trace.values() if r["epoch"] == epoch]
            seen = [i for r in steps for i in r["indices"]]
            assert len(steps) == 3 and len(seen) == 24 == len(set(seen)) and set(seen) <= set(expected)
        assert all(set(r["kept"]) <= set(r["indices"]) for r in trace.values())  # nothing curated away...
        assert sum(len(r["kept"]) for r in trace.values()) == summary["pairs_trained"]  # ...but unreadable images
    first, second = read_trace(uninterrupted), read_trace(killed)
    assert all(second[step]["indices"] == first[step]["indices"] for step in first)
    a = load_file(uninterrupted / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
