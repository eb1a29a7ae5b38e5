"""How much does curation cost next to a training step?

Times one curation decision (nearest prototype, per-cluster quantiles, farthest point sampling), one prototype
update (Sinkhorn-Knopp + EMA) and, for reference, one training step of the model, for super-batches of 480, 4,096
and 65,536 pairs; writes JSON.

    python benchmarks/curation_overhead.py --out benchmarks/results/curation_overhead_cpu.json
    python benchmarks/curation_overhead.py --model-config chexficient_vitb14_378 --step-batch 32   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chexficient.curation import CurationConfig, PrototypeCurator  # noqa: E402
from chexficient.runtime.machine import machine_info  # noqa: E402
from chexficient.runtime.presets import load_json_preset  # noqa: E402
from train.arguments import MODEL_CONFIG_DIR  # noqa: E402

from configuration_chexficient import CheXficientConfig  # noqa: E402
from modeling_chexficient import CheXficientModel  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}


def curation_timings(size: int, dim: int, device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    generator = torch.Generator(device=device).manual_seed(0)
    images = F.normalize(torch.randn(size, dim, device=device, generator=generator), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(size, dim, device=device, generator=generator), dim=-1)
    curator = PrototypeCurator(CurationConfig(), num_samples=size, device=device)
    curator.initialize(images[:800], texts[:800], generator=torch.Generator().manual_seed(0))
    ids = torch.arange(size, device=device)
    holder = {}

    def select():
        holder["result"] = curator.select(images, texts, ids, generator=generator)

    select()
    kept = torch.cat([images, texts], dim=-1)[holder["result"].keep]
    kept = F.normalize(kept, dim=-1)
    return {
        "select": timed(select, device, repeats),
        "sinkhorn_ema": timed(lambda: curator.update_prototypes(kept), device, repeats),
        "kept": int(holder["result"].keep.sum()),
    }


def train_step_time(model_config: str, batch: int, device: torch.device, repeats: int, dtype) -> dict[str, float]:
    config = CheXficientConfig(**load_json_preset(model_config, MODEL_CONFIG_DIR))
    model = CheXficientModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, device=device)
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch, 64), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, device, repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 4096, 65536])
    parser.add_argument("--dim", type=int, default=512, help="projection dim (the concatenation is twice this)")
    parser.add_argument("--model-config", default="tiny", help="a preset in train/configs/models or a JSON path")
    parser.add_argument("--step-batch", type=int, default=32, help="batch of the reference training step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/curation_overhead.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = train_step_time(args.model_config, args.step_batch, device, args.repeats, dtype)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine_info(),
        "train_step": {"model_config": args.model_config, "batch": args.step_batch, **step},
        "curation": {},
    }
    for size in args.sizes:
        timings = curation_timings(size, args.dim, device, args.repeats)
        timings["select_vs_step"] = timings["select"]["median_ms"] / step["median_ms"]
        timings["update_vs_step"] = timings["sinkhorn_ema"]["median_ms"] / step["median_ms"]
        results["curation"][str(size)] = timings
        print(
            f"super-batch {size:>6}: select {timings['select']['median_ms']:8.2f} ms, "
            f"Sinkhorn+EMA {timings['sinkhorn_ema']['median_ms']:7.2f} ms, kept {timings['kept']:>5}; "
            f"train step ({args.model_config}, batch {args.step_batch}) {step['median_ms']:.1f} ms "
            f"-> select/step {timings['select_vs_step']:.3f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
