"""LLaVA-Rad under DeepSpeed ZeRO-3 on two CPU processes, and the export without merging LoRA.

A tiny Dinov2 tower (28 px, patch 14: 4 image tokens) and a tiny Llama. Both stages run once under ZeRO-3 on two gloo
processes (`llava_rad/configs/deepspeed_zero3.json`, every parameter partitioned) and once on one process; the
stage outputs of the ZeRO-3 run (projector.safetensors, the PEFT adapter) must hold full tensors equal to the
single-process run's. Every example has the same report, so both runs average the same token losses.
`--merge false` exports the base model and `adapter/`; the PeftModel loaded from them must give the merged export's
logits and generate the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import llava_train_args
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parent.parent
FINDINGS = "The heart is enlarged. No pleural effusion."  # one report for every image: equal token counts per rank
OTHER_TEXTS = ["The lungs are clear. No pneumothorax.", "There is a small left pleural effusion."]


def environment() -> dict[str, str]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from llava_rad.data import ReportExample, write_examples_csv
    from llava_rad.demo import save_tiny_chexficient, save_tiny_language_model

    root = tmp_path_factory.mktemp("llava_zero3")
    torch.manual_seed(0)
    save_tiny_chexficient(root / "chexficient", image_size=28, hidden_size=32)
    save_tiny_language_model(root / "llama", [FINDINGS, *OTHER_TEXTS], vocab_size=300, train_steps=40)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    examples = []
    for i in range(4):
        coarse = (rng.random((5, 5)) * 255).astype(np.uint8)
        PIL.Image.fromarray(coarse).resize((40, 40), PIL.Image.BICUBIC).save(images / f"{i}.png")
        examples.append(ReportExample(f"s{i}", f"images/{i}.png", FINDINGS))
    write_examples_csv(examples, root / "train.csv")
    # the shipped ZeRO-3 file, with every parameter partitioned (the tiny ones sit under its persistence threshold)
    config = json.loads((ROOT / "llava_rad" / "configs" / "deepspeed_zero3.json").read_text())
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(config))
    return {"root": root, "chexficient": root / "chexficient", "llama": root / "llama", "train": root / "train.csv"}


def stage_args(parts, output: Path, stage: str, batch_size: int, **overrides) -> list[str]:
    options = {
        "per_device_batch_size": batch_size,
        "num_epochs": 3,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "num_workers": 0,
        "logging_steps": 1,
        "seed": 0,
    }
    return llava_train_args(parts, output, stage, **{**options, **overrides})


# torch's gloo backend now and then aborts a process at exit, after the run and its outputs are complete, when a
# process group outlives `destroy_process_group` (DeepSpeed keeps references): SIGABRT with this message.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def launch_zero3(parts, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of llava_rad/train.py under DeepSpeed ZeRO-3 on two local CPU processes (gloo); launched
    once more only when a process died of the teardown abort above."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
    command += ["--use_deepspeed", "--deepspeed_config_file", str(parts["root"] / "zero3.json")]
    command += ["llava_rad/train.py", *args]  # no --cpu: DeepSpeed finds the CPU itself
    for attempt in range(2):
        result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
        if result.returncode == 0 or GLOO_EXIT_ABORT not in result.stderr or attempt:
            break
        print(f"ZeRO-3 launch hit the gloo teardown abort; launching again:\n{result.stderr[-1500:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def assert_same_tensors(got: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape and got[name].numel() > 0, name
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(parts, tmp_path_factory) -> dict[str, Path]:
    """Stage 1 and stage 2, each under ZeRO-3 (2 processes x 2 examples) and on one process (4 examples)."""
    from llava_rad import train as train_script

    out = tmp_path_factory.mktemp("llava_zero3_runs")
    lora = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    logs = {}
    logs["zero3_stage1"] = launch_zero3(parts, stage_args(parts, out / "zero3_stage1", "align", 2, save_steps=3))
    logs["zero3_stage2"] = launch_zero3(
        parts,
        stage_args(parts, out / "zero3_stage2", "finetune", 2, projector_path=out / "zero3_stage1", **lora),
    )
    train_script.main([*stage_args(parts, out / "single_stage1", "align", 4), "--cpu", "true"])
    train_script.main(
        [
            *stage_args(parts, out / "single_stage2", "finetune", 4, projector_path=out / "single_stage1", **lora),
            "--cpu",
            "true",
        ]
    )
    return {"out": out, **logs}


def test_zero3_was_partitioned_and_the_stage_outputs_are_gathered(runs):
    out = runs["out"]
    for stage in ("stage1", "stage2"):
        log = runs[f"zero3_{stage}"]
        assert "gathered" in log.stdout + log.stderr and "ZeRO-3 partitions" in log.stdout + log.stderr
    checkpoint = next((out / "zero3_stage1" / "checkpoints").glob("step-*"))
    model_shards = sorted(p.name for p in checkpoint.rglob("zero_pp_rank_*_model_states.pt"))
    assert len(model_shards) == 2, model_shards  # each process held its own partition of the parameters

    # stage 1: the projector, full-sized and equal to the single-process run's
    expected = load_file(out / "single_stage1" / "projector.safetensors")
    got = load_file(out / "zero3_stage1" / "projector.safetensors")
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        "linear_1.weight": (32, 32),
        "linear_1.bias": (32,),
        "linear_2.weight": (32, 32),
        "linear_2.bias": (32,),
    }
    assert_same_tensors(got, expected)
    single_losses = json.loads((out / "single_stage1" / "losses.json").read_text())
    zero3_losses = json.loads((out / "zero3_stage1" / "losses.json").read_text())
    np.testing.assert_allclose(zero3_losses, single_losses, rtol=1e-4)

    # stage 2: the PEFT adapter (LoRA + the projector copy) and the projector
    expected = load_file(out / "single_stage2" / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "zero3_stage2" / "adapter" / "adapter_model.safetensors")
    assert sum(".lora_" in k for k in got) == 2 * 7 * 2 and any("multi_modal_projector" in k for k in got)
    assert_same_tensors(got, expected)
    assert_same_tensors(
        load_file(out / "zero3_stage2" / "projector.safetensors"),
        load_file(out / "single_stage2" / "projector.safetensors"),
    )


def test_unmerged_export_gives_the_merged_logits_and_generates(parts, runs, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from llava_rad.data import LlavaRadCollator, LlavaRadDataset, load_findings_csv
    from llava_rad.export import main as export_main
    from llava_rad.generate import generate_reports, load_for_generation

    stage2 = runs["out"] / "zero3_stage2"
    merged_dir, unmerged_dir = tmp_path / "merged", tmp_path / "unmerged"
    export_main(["--checkpoint", str(stage2), "--output", str(merged_dir)])
    export_main(["--checkpoint", str(stage2), "--output", str(unmerged_dir), "--merge", "false"])
    assert (unmerged_dir / "adapter" / "adapter_config.json").is_file()
    assert not (merged_dir / "adapter").exists()

    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    base = LlavaForConditionalGeneration.from_pretrained(unmerged_dir)
    assert not any("lora" in name for name, _ in base.named_parameters())
    unmerged = PeftModel.from_pretrained(base, unmerged_dir / "adapter").eval()

    _, processor = load_for_generation(merged_dir)
    examples = load_findings_csv(parts["train"], parts["root"])
    dataset = LlavaRadDataset(examples, processor.tokenizer, 4, image_processor=processor.image_processor)
    batch = LlavaRadCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    batch.pop("ids")
    batch.pop("labels")
    with torch.no_grad():
        reference = merged(**batch).logits
        torch.testing.assert_close(unmerged(**batch).logits, reference, rtol=1e-4, atol=1e-4)
    # the LoRA changed the model: the base alone gives other logits
    with torch.no_grad(), unmerged.disable_adapter():
        assert not torch.allclose(unmerged(**batch).logits, reference, atol=1e-3)

    predictions = {}
    # the PeftModel's base holds the injected LoRA layers: `generate_reports` runs it like any Llava model
    for name, model in (("merged", merged), ("unmerged", unmerged.get_base_model())):
        rows, skipped = generate_reports(model, processor, examples, batch_size=2, max_new_tokens=6, progress=False)
        assert not skipped and len(rows) == 4
        predictions[name] = [row["prediction"] for row in rows]
    assert predictions["merged"] == predictions["unmerged"]
