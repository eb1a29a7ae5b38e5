"""End-to-end curated pretraining on the phantoms: one process, resume after SIGKILL, 2 processes, DeepSpeed."""

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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    (root / "tiny.json").write_text(json.dumps(TINY))
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


def test_two_processes_over_gloo_share_one_super_batch(workspace):
    output = workspace / "two"
    launch_two_processes(
        ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"],
        common_args(workspace, output, per_device_batch_size=12, num_epochs=2),
    )
    trace = read_trace(output)
    first = trace[1]
    assert len(first["indices"]) == 24 and len(set(first["indices"])) == 24  # 2 ranks x 12, gathered
    subset = json.loads((output / "final" / "curated_subset.json").read_text())
    assert subset["num_curated"] > 0 and (output / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu(workspace, stage):
    output = workspace / f"zero{stage}"
    launch_two_processes(
        ["--use_deepspeed", "--deepspeed_config_file", f"train/configs/deepspeed_zero{stage}.json"],
        common_args(workspace, output, cpu=False, per_device_batch_size=12, num_epochs=2),
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
