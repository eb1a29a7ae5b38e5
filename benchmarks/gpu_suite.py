"""The GPU suite: one command, one GPU, under 8 minutes on an H100/H200, every number in one JSON.

    python benchmarks/gpu_suite.py          # released sizes on CUDA -> benchmarks/results/gpu_suite_<gpu>.json
    python benchmarks/gpu_suite.py --tiny   # tiny models on the CPU in a minute or two (tests/test_gpu_suite.py)

Sections, each in its own process (so that peak memory is per section and one failure does not stop the others):

  embedding            the released CheXficient (ViT-B/14 at 378 px + BERT-base, 512-d, random weights) on synthetic
                       radiographs (16-bit PNG at 1024 x 1024 and 8-bit PNG at 1024 x 1280, so batches hold two sizes):
                       - stock: `AutoModel.from_pretrained(dir, trust_remote_code=True)` + `AutoImageProcessor`, one
                         image at a time, fp32 (what a model-card user writes);
                       - model only: `InferenceEngine` in bf16 on preprocessed tensors already on the device;
                       - end to end from PNG with GPU preprocessing (`InferenceEngine(preprocess="gpu")`: DataLoader
                         workers decode to uint8/16-bit, the GPU resizes, crops and normalises same-size groups);
                       - end to end with CPU preprocessing (the workers run the whole image processor);
                       the ratios against stock, and the embeddings' cosine to stock's.
  pretrain_superbatch  `train/pretrain.py` itself (its `setup`/`main`, step times taken at each optimizer step) at the
  pretrain_accumulate  released sizes with curation on, bf16, on phantoms: samples/s per GPU (candidates embedded per
                       second) against the reference's ~31 (220 H100-hours for 24.7M samples).
  llava_stage2         the LLaVA-Rad stage-2 step (`llava_rad.train.setup_stage` + `LlavaRadForTraining`) at the real
                       Vicuna-7B size (32 layers, random bf16 weights), LoRA r 64 + the projector, gradient
                       checkpointing, the released tower live at 378 px (729 image tokens).
  llava_generate       greedy generation from the same model with LoRA merged: prefill time, tokens/s at batch 1 and
                       at a larger batch.

Each section records its peak memory: `torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS on the CPU.
The JSON also records the machine (`chexficient.runtime.machine.machine_info`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stock_path import stock_image_features  # noqa: E402

from chexficient.runtime.machine import device_slug, machine_info  # noqa: E402


SECTIONS = ("embedding", "pretrain_superbatch", "pretrain_accumulate", "llava")
REPORTED_SECTIONS = ("embedding", "pretrain_superbatch", "pretrain_accumulate", "llava_stage2", "llava_generate")
# The reference: 220 H100-hours for 24.7M samples (the paper's compute statement) = 31.2 samples/s per H100.
REFERENCE_SAMPLES_PER_S_PER_GPU = 24.7e6 / (220 * 3600)
VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
    max_position_embeddings=1024,
)
TINY_CHEXFICIENT = {
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "image_size": 56,
    },
    "text_config": {
        "vocab_size": 128,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
    "projection_dim": 32,
}


def settings_for(tiny: bool, cuda: bool) -> dict[str, Any]:
    """Sizes of every section: the released ones on a GPU, tiny ones for the CPU test."""
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    if not tiny:
        return {
            "num_images": 1024,
            "unique_images": 32,
            "stock_images": 64,
            "embed_batch_size": 128,
            "model_only_batch_size": 256,
            "model_only_iterations": 10,
            "decode_workers": workers,
            "pretrain_model_config": "chexficient_vitb14_378",
            "pretrain_batch_size": 80,  # the reference's per-GPU share of its 480 super-batch (6 x 80)
            "pretrain_warmup_steps": 3,
            "pretrain_timed_steps": 20,
            "accumulate_pool": 480,  # the paper's super-batch, embedded in chunks on one GPU
            "accumulate_chunk": 160,
            "accumulate_warmup_steps": 1,
            "accumulate_timed_steps": 4,
            "prototype_warmup_samples": 160,
            "phantom_image_size": 192,  # the image processor upsamples to 378 as for any small radiograph
            "pretrain_workers": min(workers, 8),
            "mixed_precision": "bf16" if cuda else "no",
            "llava_batch_size": 16,  # LLaVA-Rad stage 2: 16 per GPU (x 4 GPUs = 64)
            "llava_text_tokens": 200,  # prompt + findings around the 729 image tokens
            "llava_answer_tokens": 120,
            "llava_warmup_steps": 2,
            "llava_timed_steps": 5,
            "lora_r": 64,
            "generate_new_tokens": 128,
            "generate_batch_size": 16,
        }
    return {
        "num_images": 24,
        "unique_images": 6,
        "stock_images": 6,
        "embed_batch_size": 8,
        "model_only_batch_size": 8,
        "model_only_iterations": 3,
        "decode_workers": 1,
        "pretrain_model_config": "tiny",
        "pretrain_batch_size": 16,
        "pretrain_warmup_steps": 1,
        "pretrain_timed_steps": 2,
        "accumulate_pool": 32,
        "accumulate_chunk": 16,
        "accumulate_warmup_steps": 1,
        "accumulate_timed_steps": 2,
        "prototype_warmup_samples": 32,
        "phantom_image_size": 64,
        "pretrain_workers": 0,
        "mixed_precision": "bf16" if cuda else "no",
        "llava_batch_size": 2,
        "llava_text_tokens": 24,
        "llava_answer_tokens": 8,
        "llava_warmup_steps": 1,
        "llava_timed_steps": 2,
        "lora_r": 4,
        "generate_new_tokens": 8,
        "generate_batch_size": 2,
    }


# ----- helpers -------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak GPU memory (`torch.cuda.max_memory_allocated`) on CUDA, this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_kind": "cuda_allocated",
        }
    rss = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
    return {"peak_memory_mb": rss, "peak_memory_kind": "cpu_peak_rss"}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


# ----- set-up (parent process) ---------------------------------------------------------------------------------------


def write_model(folder: Path, tiny: bool) -> None:
    """A CheXficient of the released sizes (or tiny), random weights, with its remote code and image processor."""
    from configuration_chexficient import CheXficientConfig
    from image_processing_chexficient import CheXficientImageProcessor
    from modeling_chexficient import CheXficientModel

    torch.manual_seed(0)
    config = CheXficientConfig(**TINY_CHEXFICIENT) if tiny else CheXficientConfig()
    CheXficientModel(config).eval().save_pretrained(folder)
    CheXficientImageProcessor(size={"shortest_edge": config.vision_config.image_size}).save_pretrained(folder)


def write_images(folder: Path, count: int, unique: int, tiny: bool) -> list[Path]:
    """`count` radiograph files: copies of `unique` phantoms, half 16-bit square PNGs, half 8-bit portrait PNGs."""
    import PIL.Image

    from chexficient.inference.synthetic import phantom_images, write_png

    folder.mkdir(parents=True, exist_ok=True)
    side = 96 if tiny else 1024
    originals = []
    for i, image in enumerate(phantom_images(unique, image_size=side, bit_depth=16)):
        if i % 2 == 0:
            originals.append(write_png(folder / f"src{i:03d}.png", image))
        else:  # 8-bit, taller than wide: another size in the same batches
            pixels = (image >> 8).astype(np.uint8)
            tall = np.asarray(PIL.Image.fromarray(pixels).resize((side, side * 5 // 4), PIL.Image.BILINEAR))
            originals.append(write_png(folder / f"src{i:03d}.png", tall))
    paths = []
    for i in range(count):
        path = folder / f"cxr{i:05d}.png"
        shutil.copyfile(originals[i % unique], path)
        paths.append(path)
    for original in originals:
        original.unlink()
    return paths


def pretrain_phantom_count(s: dict[str, Any]) -> int:
    superbatch = s["pretrain_batch_size"] * (s["pretrain_warmup_steps"] + s["pretrain_timed_steps"])
    accumulate = s["accumulate_pool"] * (s["accumulate_warmup_steps"] + s["accumulate_timed_steps"])
    return max(superbatch, accumulate) + s["pretrain_batch_size"]  # no step runs into the end of the epoch


# ----- embedding -----------------------------------------------------------------------------------------------------


def section_embedding(workdir: Path, s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from transformers import AutoImageProcessor, AutoModel

    from chexficient.data.images import InputItem
    from chexficient.inference.engine import InferenceEngine

    model_dir, images = workdir / "model", sorted((workdir / "images").glob("*.png"))
    items = [InputItem(p.name, str(p)) for p in images]
    result: dict[str, Any] = {"num_images": len(images), "image_sizes": "1024x1024 16-bit + 1024x1280 8-bit PNG"}

    # stock: what a model-card user writes, one image at a time, fp32
    reset_peak(device)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with torch.no_grad():  # warm-up: allocator, kernels
        model.get_image_features(
            pixel_values=processor(images=str(images[0]), return_tensors="pt")["pixel_values"].to(device)
        )
    sync(device)
    stock_embeds, per_image, forward = stock_image_features(model, processor, images[: s["stock_images"]], device)
    result["stock"] = {
        "dtype": "float32",
        "batch_size": 1,
        "images": len(per_image),
        "end_to_end_images_per_s": len(per_image) / sum(per_image),
        "model_only_images_per_s": len(forward) / sum(forward),
        **peak_memory(device),
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # model only, bf16, preprocessed tensors already on the device
    reset_peak(device)
    engine = InferenceEngine.from_pretrained(model_dir, device, "bfloat16", preprocess="gpu")
    size, batch = engine.image_size, s["model_only_batch_size"]
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        engine.embed_pixels(pixels)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(s["model_only_iterations"]):
        engine.embed_pixels(pixels)
    sync(device)
    seconds = time.perf_counter() - t0
    result["model_only_bf16"] = {
        "dtype": "bfloat16",
        "batch_size": batch,
        "images_per_s": batch * s["model_only_iterations"] / seconds,
        **peak_memory(device),
    }
    del pixels

    # end to end from PNG: decode in workers, then GPU preprocessing (or the workers' full CPU preprocessing)
    def end_to_end(mode: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        engine.preprocess = mode
        warm = engine.make_loader(items[: 2 * s["embed_batch_size"]], s["embed_batch_size"], 0)
        for _ in engine.iter_embeddings(warm):  # kernels for every shape group, outside the timing
            pass
        sync(device)
        reset_peak(device)
        loader = engine.make_loader(items, s["embed_batch_size"], s["decode_workers"])
        embeds: dict[str, np.ndarray] = {}
        t0 = time.perf_counter()
        for batch_, out in engine.iter_embeddings(loader):
            if batch_.failed:
                raise RuntimeError(f"benchmark images failed to decode: {batch_.failed[:2]}")
            for index, row in zip(batch_.indices, out):
                embeds[items[index].id] = row
        seconds = time.perf_counter() - t0
        return {
            "dtype": engine.dtype,
            "preprocess": mode,
            "batch_size": s["embed_batch_size"],
            "decode_workers": s["decode_workers"],
            "images": len(embeds),
            "images_per_s": len(embeds) / seconds,
            **peak_memory(device),
        }, embeds

    result["end_to_end_gpu_preprocess"], gpu_embeds = end_to_end("gpu")
    result["end_to_end_cpu_preprocess"], cpu_embeds = end_to_end("cpu")
    compared = [p.name for p in images[: s["stock_images"]]]
    result["min_cosine_vs_stock"] = {
        "gpu_preprocess_bf16": min_cosine(stock_embeds, np.stack([gpu_embeds[i] for i in compared])),
        "cpu_preprocess_bf16": min_cosine(stock_embeds, np.stack([cpu_embeds[i] for i in compared])),
    }
    stock = result["stock"]
    result["ratios"] = {
        "end_to_end_gpu_preprocess_vs_stock": result["end_to_end_gpu_preprocess"]["images_per_s"]
        / stock["end_to_end_images_per_s"],
        "end_to_end_cpu_preprocess_vs_stock": result["end_to_end_cpu_preprocess"]["images_per_s"]
        / stock["end_to_end_images_per_s"],
        "model_only_bf16_vs_stock": result["model_only_bf16"]["images_per_s"] / stock["model_only_images_per_s"],
        "gpu_vs_cpu_preprocess": result["end_to_end_gpu_preprocess"]["images_per_s"]
        / result["end_to_end_cpu_preprocess"]["images_per_s"],
    }
    result["peak_memory_mb"] = max(
        r["peak_memory_mb"]
        for r in (
            stock,
            result["model_only_bf16"],
            result["end_to_end_gpu_preprocess"],
            result["end_to_end_cpu_preprocess"],
        )
    )
    return result


# ----- pretraining ---------------------------------------------------------------------------------------------------


def section_pretrain(workdir: Path, s: dict[str, Any], device: torch.device, mode: str) -> dict[str, Any]:
    """Drive train/pretrain.py's own `main` with its `setup` wrapped so that every optimizer step is timed."""
    import train.pretrain as pretrain

    accumulate = mode == "accumulate"
    warmup = s["accumulate_warmup_steps"] if accumulate else s["pretrain_warmup_steps"]
    timed = s["accumulate_timed_steps"] if accumulate else s["pretrain_timed_steps"]
    candidates = s["accumulate_pool"] if accumulate else s["pretrain_batch_size"]
    args = {
        "model_config": s["pretrain_model_config"],
        "output_dir": workdir / f"pretrain_{mode}",
        "phantom_dir": workdir / "phantoms",
        "phantom_num_train": pretrain_phantom_count(s),
        "phantom_num_eval": 8,
        "phantom_num_test": 16,
        "phantom_image_size": s["phantom_image_size"],
        "per_device_batch_size": s["pretrain_batch_size"],
        "num_epochs": 2,
        "max_steps": warmup + timed,
        "warmup_samples": s["prototype_warmup_samples"],
        "num_workers": s["pretrain_workers"],
        "mixed_precision": s["mixed_precision"],
        "report_to": "none",
        "logging_steps": 10_000,
        "curation_mode": mode,
    }
    if accumulate:
        args.update(candidate_pool_size=s["accumulate_pool"], embedding_chunk_size=s["accumulate_chunk"])
    argv = [item for key, value in args.items() for item in (f"--{key}", str(value))]
    if device.type == "cpu":
        argv.append("--cpu")

    stamps: list[float] = []
    original_setup = pretrain.setup

    def timed_setup(argv_=None):
        ctx = original_setup(argv_)
        step = ctx.optimizer.step

        def timed_step(*a, **k):
            out = step(*a, **k)
            sync(ctx.accelerator.device)
            stamps.append(time.perf_counter())
            return out

        ctx.optimizer.step = timed_step
        reset_peak(ctx.accelerator.device)
        return ctx

    pretrain.setup = timed_setup
    started = time.perf_counter()
    summary = pretrain.main(argv)
    wall = time.perf_counter() - started
    if len(stamps) != warmup + timed:
        raise RuntimeError(f"expected {warmup + timed} optimizer steps, timed {len(stamps)}")
    seconds_per_step = (stamps[-1] - stamps[warmup - 1]) / timed
    samples_per_s = candidates / seconds_per_step
    return {
        "mode": mode,
        "model_config": s["pretrain_model_config"],
        "mixed_precision": s["mixed_precision"],
        "candidates_per_step": candidates,
        "embedding_chunk": s["accumulate_chunk"] if accumulate else None,
        "timed_steps": timed,
        "seconds_per_step": seconds_per_step,
        "samples_per_s_per_gpu": samples_per_s,
        "trained_pairs_per_s_per_gpu": summary["pairs_trained"] / summary["candidates_seen"] * samples_per_s,
        "kept_fraction": summary["pairs_trained"] / summary["candidates_seen"],
        "reference_samples_per_s_per_gpu": REFERENCE_SAMPLES_PER_S_PER_GPU,
        "ratio_vs_reference": samples_per_s / REFERENCE_SAMPLES_PER_S_PER_GPU,
        "run_wall_s": wall,
        **peak_memory(device),
    }


# ----- LLaVA-Rad -----------------------------------------------------------------------------------------------------


def section_llava(workdir: Path, s: dict[str, Any], device: torch.device, tiny: bool) -> dict[str, Any]:
    """Stage-2 steps and generation at the Vicuna-7B size with random weights, built directly on the device."""
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from llava_rad import train as train_script
    from llava_rad.demo import build_tiny_tokenizer
    from llava_rad.model import assemble_llava, num_image_tokens, prepare_tokenizer

    from configuration_chexficient import RELEASED_VISION_CONFIG
    from image_processing_chexficient import CheXficientImageProcessor

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    tokenizer = prepare_tokenizer(build_tiny_tokenizer(["No acute cardiopulmonary process."], vocab_size=300))
    vision = Dinov2Config(**(TINY_CHEXFICIENT["vision_config"] if tiny else RELEASED_VISION_CONFIG))
    image_tokens = num_image_tokens(
        CheXficientImageProcessor(size={"shortest_edge": vision.image_size}), vision.patch_size
    )
    config = LlamaConfig(
        **(TINY_LLAMA if tiny else VICUNA_7B),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn where they live: no 7B copy on the host
        tower = Dinov2Model(vision).to(dtype)
        language_model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
        model = assemble_llava(tower, language_model, tokenizer, image_tokens)
    model.to(device)
    model_args = train_script.ModelArguments(
        chexficient="random", gradient_checkpointing=True, dtype="bfloat16" if cuda else "float32"
    )
    lora_args = train_script.LoraArguments(lora_r=s["lora_r"], lora_alpha=2 * s["lora_r"], lora_dropout=0.05)
    peft_model = train_script.setup_stage(model, model_args, lora_args, "finetune")
    module = train_script.LlavaRadForTraining(peft_model).to(device)
    module.train()
    module.tower.eval()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    build_s = time.perf_counter() - started

    batch_size, text = s["llava_batch_size"], s["llava_text_tokens"]
    image_id = model.config.image_token_id
    generator = torch.Generator().manual_seed(0)
    prefix = 40 if not tiny else 4

    def token_ids(count: int) -> torch.Tensor:
        ids = torch.randint(3, config.vocab_size, (batch_size, count), generator=generator)
        return ids.masked_fill(ids == image_id, 3)

    bos = torch.full((batch_size, 1), tokenizer.bos_token_id)
    input_ids = torch.cat(
        [bos, token_ids(prefix), torch.full((batch_size, image_tokens), image_id), token_ids(text - prefix - 1)], 1
    )
    labels = torch.full_like(input_ids, -100)
    labels[:, -s["llava_answer_tokens"] :] = input_ids[:, -s["llava_answer_tokens"] :]
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator).to(
            device
        ),
    }

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = module(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    reset_peak(device)
    losses = [step() for _ in range(s["llava_warmup_steps"])]
    sync(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(s["llava_timed_steps"])]
    sync(device)
    seconds_per_step = (time.perf_counter() - t0) / s["llava_timed_steps"]
    sequence = input_ids.shape[1]
    stage2 = {
        "language_model": "Vicuna-7B size (random weights)" if not tiny else "tiny Llama",
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "dtype": str(dtype).replace("torch.", ""),
        "lora_r": s["lora_r"],
        "gradient_checkpointing": True,
        "batch_size": batch_size,
        "sequence_tokens": sequence,
        "image_tokens": image_tokens,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds_per_step": seconds_per_step,
        "samples_per_s": batch_size / seconds_per_step,
        "tokens_per_s": batch_size * sequence / seconds_per_step,
        "losses": losses,
        "build_s": build_s,
        **peak_memory(device),
    }
    optimizer.state.clear()  # free the Adam moments before generation
    module.zero_grad(set_to_none=True)

    # generation: LoRA merged, greedy, a fixed number of new tokens
    merged = peft_model.merge_and_unload().eval()
    merged.config.use_cache = True
    if cuda:
        torch.cuda.empty_cache()
    reset_peak(device)
    new_tokens = s["generate_new_tokens"]
    prompt_length = prefix + 1 + image_tokens + 16
    generate: dict[str, Any] = {"new_tokens": new_tokens, "prompt_tokens": prompt_length, "dtype": stage2["dtype"]}
    for name, size in (("batch_1", 1), (f"batch_{s['generate_batch_size']}", s["generate_batch_size"])):
        ids = batch["input_ids"][:1, :prompt_length].expand(size, -1).contiguous()
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": batch["pixel_values"][:1].expand(size, -1, -1, -1).to(dtype),
        }

        def run(count: int, inputs: dict[str, torch.Tensor] = inputs) -> float:
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                out = merged.generate(
                    **inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, use_cache=True
                )
            sync(device)
            if out.shape[1] != prompt_length + count:
                raise RuntimeError(f"generated {out.shape[1] - prompt_length} tokens, asked for {count}")
            return time.perf_counter() - t

        run(2)  # warm-up
        prefill = run(1)
        total = run(new_tokens)
        generate[name] = {
            "batch_size": size,
            "prefill_s": prefill,
            "total_s": total,
            "tokens_per_s": size * new_tokens / total,
            "decode_tokens_per_s": size * (new_tokens - 1) / max(total - prefill, 1e-9),
        }
    generate.update(peak_memory(device))
    return {"llava_stage2": stage2, "llava_generate": generate}


# ----- orchestration -------------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    settings = json.loads(Path(args.workdir, "settings.json").read_text())
    workdir = Path(args.workdir)
    if args.section == "embedding":
        result = {"embedding": section_embedding(workdir, settings, device)}
    elif args.section in ("pretrain_superbatch", "pretrain_accumulate"):
        mode = args.section.split("_", 1)[1]
        result = {args.section: section_pretrain(workdir, settings, device, mode)}
    else:
        result = section_llava(workdir, settings, device, args.tiny)
    print("SUITE_RESULT " + json.dumps(result), flush=True)


def run_section(section: str, args: argparse.Namespace, workdir: Path, device: str, timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", section, "--workdir", str(workdir), "--device", device]
    if args.tiny:
        command.append("--tiny")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {section: {"error": f"timed out after {timeout:.0f} s"}}
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("SUITE_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout[-2000:] + done.stderr[-4000:]).strip()
        print(f"{section}: FAILED\n{tail}", file=sys.stderr)
        last = tail.splitlines()[-1] if tail else "no result"
        names = ("llava_stage2", "llava_generate") if section == "llava" else (section,)
        return {name: {"error": last} for name in names}
    result = json.loads(lines[-1][len("SUITE_RESULT ") :])
    for value in result.values():
        value["section_wall_s"] = wall
    return result


def summary_lines(sections: dict[str, Any]) -> list[str]:
    lines = []
    e = sections.get("embedding", {})
    if "ratios" in e:
        lines += [
            f"embedding  stock fp32 {e['stock']['end_to_end_images_per_s']:.1f} img/s end to end, "
            f"{e['stock']['model_only_images_per_s']:.1f} model only",
            f"           bf16 model only {e['model_only_bf16']['images_per_s']:.1f} img/s "
            f"({e['ratios']['model_only_bf16_vs_stock']:.1f}x stock)",
            "           end to end from PNG, GPU preprocessing "
            f"{e['end_to_end_gpu_preprocess']['images_per_s']:.1f} img/s "
            f"({e['ratios']['end_to_end_gpu_preprocess_vs_stock']:.1f}x stock); CPU preprocessing "
            f"{e['end_to_end_cpu_preprocess']['images_per_s']:.1f} img/s "
            f"({e['ratios']['end_to_end_cpu_preprocess_vs_stock']:.1f}x stock)",
        ]
    for mode in ("superbatch", "accumulate"):
        p = sections.get(f"pretrain_{mode}", {})
        if "samples_per_s_per_gpu" in p:
            lines.append(
                f"pretrain   {mode:<10} {p['samples_per_s_per_gpu']:.1f} samples/s per GPU "
                f"({p['ratio_vs_reference']:.2f}x the reference's {REFERENCE_SAMPLES_PER_S_PER_GPU:.1f}), "
                f"{p['seconds_per_step']:.2f} s/step of {p['candidates_per_step']}, peak {p['peak_memory_mb']:.0f} MB"
            )
    l2 = sections.get("llava_stage2", {})
    if "seconds_per_step" in l2:
        lines.append(
            f"llava      stage 2 {l2['seconds_per_step']:.2f} s/step at batch {l2['batch_size']} x "
            f"{l2['sequence_tokens']} tokens, peak {l2['peak_memory_mb']:.0f} MB"
        )
    g = sections.get("llava_generate", {})
    for key, value in g.items():
        if isinstance(value, dict) and "tokens_per_s" in value:
            lines.append(
                f"llava      generate {key}: {value['tokens_per_s']:.1f} tokens/s, prefill {value['prefill_s']:.2f} s"
            )
    for name, value in sections.items():
        if "error" in value:
            lines.append(f"{name}: ERROR {value['error']}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models and inputs (CPU test; also runs on a GPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:1, cpu")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/gpu_suite_<device>.json)")
    parser.add_argument(
        "--workdir", default=None, help="keep the model, images and runs here (default: a temp folder)"
    )
    parser.add_argument("--section-timeout", type=float, default=300.0, help="seconds before a section is stopped")
    parser.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.section = args.worker
        worker(args)
        return 0

    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if not cuda and not args.tiny:
        print("warning: no CUDA device; the released sizes on the CPU take hours. Use --tiny.", file=sys.stderr)
    slug = device_slug() if cuda else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_suite_{slug}{'_tiny' if args.tiny else ''}.json")
    settings = settings_for(args.tiny, cuda)
    workdir_obj = None if args.workdir else tempfile.TemporaryDirectory(prefix="chexficient-gpu-suite-")
    workdir = Path(args.workdir or workdir_obj.name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(settings))

    started = time.perf_counter()
    if "embedding" in sections:
        if not (workdir / "model" / "model.safetensors").exists():
            write_model(workdir / "model", args.tiny)
        if len(list((workdir / "images").glob("*.png"))) != settings["num_images"]:
            shutil.rmtree(workdir / "images", ignore_errors=True)
            write_images(workdir / "images", settings["num_images"], settings["unique_images"], args.tiny)
    if any(name.startswith("pretrain") for name in sections):  # rendered once for both modes
        from chexficient.phantoms import write_pretraining_splits

        write_pretraining_splits(
            workdir / "phantoms",
            num_train=pretrain_phantom_count(settings),
            num_val=8,
            num_test=16,
            image_size=settings["phantom_image_size"],
        )
    setup_s = time.perf_counter() - started
    print(f"setup {setup_s:.1f} s ({'tiny' if args.tiny else 'released sizes'} on {device})", flush=True)

    results: dict[str, Any] = {}
    for section in sections:
        try:
            new = run_section(section, args, workdir, device, args.section_timeout)
        except Exception:  # a broken section is reported; the others still run
            new = {section: {"error": traceback.format_exc().strip().splitlines()[-1]}}
        results.update(new)
        for line in summary_lines(new):
            print(line, flush=True)

    report = {
        "benchmark": "gpu_suite",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "tiny": args.tiny,
        "device": device,
        "machine": machine_info(),
        "settings": settings,
        "reference": {
            "pretrain_samples_per_s_per_gpu": REFERENCE_SAMPLES_PER_S_PER_GPU,
            "source": "220 H100-hours for 24.7M samples (the paper's compute statement)",
        },
        "setup_s": setup_s,
        "total_s": time.perf_counter() - started,
        "sections": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(["", *summary_lines(results), f"wrote {out} ({report['total_s']:.0f} s)"]))
    if workdir_obj is not None:
        workdir_obj.cleanup()
    return 1 if any("error" in value for value in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
