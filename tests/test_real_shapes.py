"""Real sizes before real hardware: the released architectures for a couple of steps on the CPU.

- Curated pretraining at the released sizes (ViT-B/14 at 378 px, BERT-base with the 28,996-token text tower, 512-d;
  `--model_config chexficient_vitb14_378`) on phantoms, in both curation modes: the run trains (finite losses, the
  steps done) and its final folder loads and embeds.
- LLaVA-Rad on the released tower (378 px -> 729 image tokens, 768 -> 4096 -> 4096 projector) with a Llama at
  Vicuna-7B widths (hidden 4096, intermediate 11008, 32 heads, vocabulary 32,000) but one layer: stage 1, stage 2
  with LoRA r 64, the export and a few generated tokens.

Every program runs in its own process, as a user runs it; each prints its time per step and its peak resident memory
(from `os.wait4`), also written to outputs/test-artifacts/real_shapes/. Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import llava_train_args
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "outputs" / "test-artifacts" / "real_shapes"
RELEASED_TEXT_VOCAB = 28996
# A Llama at Vicuna-7B v1.5's widths, one decoder layer instead of 32.
VICUNA_WIDTHS = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_measured(name: str, command: list[str], timeout: float = 1200) -> dict:
    """Run `command` in its own process; its exit status, output, wall time and peak RSS (MB) of that process."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=output, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read().decode(errors="replace").replace("\r", "\n")
    assert process.returncode == 0, f"{name} failed ({process.returncode}):\n{text[-6000:]}"
    return {"name": name, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "output": text}


def report(name: str, **values) -> None:
    """Print one line for the CI log and keep the record under outputs/test-artifacts/real_shapes/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(values, indent=2))
    shown = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    print(f"\n[real shapes] {name}: {shown}", flush=True)


# ----- curated pretraining at the released sizes ---------------------------------------------------------------------


def tensorboard_scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values += [event.value for event in accumulator.Scalars(tag)]
    return values


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_shapes") / "phantoms"  # rendered by the first run, reused by the second


@pytest.mark.parametrize("mode", ["superbatch", "accumulate"])
def test_pretraining_at_the_released_sizes(mode, phantom_dir, tmp_path):
    output = tmp_path / mode
    args = {
        "model_config": "chexficient_vitb14_378",
        "output_dir": output,
        "phantom_dir": phantom_dir,
        # 16 + 3 phantoms: under 20, so none is deliberately corrupt and every step trains on several pairs
        "phantom_num_train": 16,
        "phantom_num_eval": 3,
        "phantom_num_test": 4,
        "phantom_image_size": 378,
        "per_device_batch_size": 4,
        "max_steps": 2,
        "warmup_samples": 8,
        "num_prototypes": 2,
        "tokenizer_vocab_size": 512,  # a tokenizer built from the reports; the text tower keeps the released vocab
        "num_workers": 0,
        "logging_steps": 1,
        "report_to": "tensorboard",
        "curation_mode": mode,
    }
    if mode == "accumulate":
        args.update(candidate_pool_size=8, embedding_chunk_size=4)
    command = [sys.executable, "train/pretrain.py", "--cpu"]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    result = run_measured(f"pretrain_{mode}", command)

    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["pairs_trained"] > 0
    losses = tensorboard_scalars(output, "loss")
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
    kept = tensorboard_scalars(output, "kept_fraction")
    assert all(0 < v <= 1 for v in kept)

    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    final = output / "final"
    model = CheXficientModel.from_pretrained(final).eval()
    config = model.config
    assert (config.vision_config.hidden_size, config.vision_config.image_size, config.projection_dim) == (
        768,
        378,
        512,
    )
    assert config.vision_config.patch_size == 14 and config.vision_config.num_hidden_layers == 12
    assert config.text_config.vocab_size == RELEASED_TEXT_VOCAB and config.text_config.hidden_size == 768
    processor = CheXficientProcessor.from_pretrained(final)
    image = next((phantom_dir / "images" / "test").glob("*.png"))
    inputs = processor(images=[str(image)], text=["No acute cardiopulmonary process."])
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == (1, 512) and torch.isfinite(out.logits_per_image).all()
    assert (final / "curated_subset.json").is_file()
    per_step = summary["seconds"] / summary["steps"]
    report(
        f"pretrain_{mode}",
        steps=summary["steps"],
        batch=args.get("candidate_pool_size", args["per_device_batch_size"]),
        seconds_per_step=per_step,
        peak_rss_mb=result["peak_rss_mb"],
        wall_s=result["wall_s"],
        losses=losses,
    )


# ----- LLaVA-Rad on the released tower with a Vicuna-7B-wide Llama ---------------------------------------------------


FINDINGS = [
    "The heart is mildly enlarged. There is a small left pleural effusion. No pneumothorax.",
    "The lungs are clear. The cardiomediastinal silhouette is normal. No focal consolidation.",
]


@pytest.fixture(scope="module")
def llava_parts(tmp_path_factory) -> dict[str, Path]:
    """The released CheXficient image tower (random weights), a one-layer Llama at Vicuna-7B widths with a small
    tokenizer trained offline on the reports, and two 378 px phantom radiographs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chexficient.inference.synthetic import phantom_images, write_png
    from llava_rad.data import ReportExample, write_examples_csv
    from llava_rad.demo import build_tiny_tokenizer

    from configuration_chexficient import CheXficientConfig
    from modeling_chexficient import CheXficientVisionModel

    root = tmp_path_factory.mktemp("llava_real")
    torch.manual_seed(0)
    CheXficientVisionModel(CheXficientConfig()).save_pretrained(root / "chexficient")  # the released sizes

    tokenizer = build_tiny_tokenizer(FINDINGS, vocab_size=400)
    config = LlamaConfig(
        **VICUNA_WIDTHS,
        num_hidden_layers=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # skip the slow default init of 464M parameters, then draw them once
        language_model = LlamaForCausalLM(config)
    language_model = language_model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in language_model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, config.initializer_range, generator=generator)
    language_model.save_pretrained(root / "llama")  # the rotary buffers are not saved: loading recomputes them
    tokenizer.save_pretrained(root / "llama")
    del language_model

    images = root / "images"
    images.mkdir()
    examples = []
    for i, (pixels, findings) in enumerate(zip(phantom_images(2, image_size=378), FINDINGS)):
        write_png(images / f"{i}.png", pixels)
        examples.append(ReportExample(f"s{i}", f"images/{i}.png", findings, "Shortness of breath." if i else None))
    write_examples_csv(examples, root / "train.csv")
    return {"root": root, "chexficient": root / "chexficient", "llama": root / "llama", "train": root / "train.csv"}


def llava_command(parts: dict[str, Path], output: Path, stage: str, **overrides) -> list[str]:
    options = {
        "per_device_batch_size": 1,
        "max_steps": 2,
        "num_workers": 0,
        "logging_steps": 1,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.0,
        "cpu": True,
    }
    return [sys.executable, "llava_rad/train.py", *llava_train_args(parts, output, stage, **{**options, **overrides})]


def check_stage(output: Path, result: dict, name: str) -> dict:
    info = json.loads((output / "llava_rad.json").read_text())
    summary = info["summary"]
    losses = json.loads((output / "losses.json").read_text())
    assert summary["steps"] == 2 and len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
    projector = load_file(output / "projector.safetensors")
    shapes = {k: tuple(v.shape) for k, v in projector.items()}
    assert shapes == {
        "linear_1.weight": (4096, 768),
        "linear_1.bias": (4096,),
        "linear_2.weight": (4096, 4096),
        "linear_2.bias": (4096,),
    }
    report(
        name,
        steps=summary["steps"],
        batch=1,
        seconds_per_step=summary["seconds"] / summary["steps"],
        peak_rss_mb=result["peak_rss_mb"],
        wall_s=result["wall_s"],
        trainable_parameters=summary["trainable_parameters"],
        losses=losses,
    )
    return summary


def test_llava_rad_stages_export_and_generation_at_vicuna_widths(llava_parts, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_rad.prompt import INSTRUCTION

    stage1, stage2, export = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "export"
    result = run_measured("llava_stage1", llava_command(llava_parts, stage1, "align", learning_rate=1e-3))
    summary = check_stage(stage1, result, "llava_stage1")
    assert summary["trainable_parameters"] == 768 * 4096 + 4096 + 4096 * 4096 + 4096  # the projector only

    result = run_measured(
        "llava_stage2",
        llava_command(
            llava_parts, stage2, "finetune", projector_path=stage1, lora_r=64, lora_alpha=128, lora_dropout=0.05
        ),
    )
    summary = check_stage(stage2, result, "llava_stage2")
    adapter = load_file(stage2 / "adapter" / "adapter_model.safetensors")
    lora = {k: tuple(v.shape) for k, v in adapter.items() if "lora_" in k}
    assert len(lora) == 2 * 7  # one layer x q/k/v/o/gate/up/down x (A, B)
    assert all(64 in shape for shape in lora.values())
    assert {s for k, s in lora.items() if "q_proj.lora_A" in k} == {(64, 4096)}
    assert {s for k, s in lora.items() if "down_proj.lora_A" in k} == {(64, 11008)}

    result = run_measured(
        "llava_export",
        [sys.executable, "-m", "llava_rad.export", "--checkpoint", str(stage2), "--output", str(export)],
    )
    report("llava_export", peak_rss_mb=result["peak_rss_mb"], wall_s=result["wall_s"])

    # a few tokens from the exported folder with plain transformers: 729 image tokens in the prompt
    started = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export)
    image = load_png(llava_parts["root"] / "images" / "0.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 729
    assert inputs["pixel_values"].shape == (1, 3, 378, 378)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.numel() == 4 and model.config.image_token_id not in new_tokens.tolist()
    report("llava_generate", new_tokens=int(new_tokens.numel()), wall_s=time.perf_counter() - started)


def load_png(path: Path):
    import PIL.Image

    with PIL.Image.open(path) as image:
        return PIL.Image.fromarray(np.asarray(image)).convert("RGB")
