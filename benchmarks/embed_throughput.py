"""Image-embedding throughput: the stock Hugging Face path next to `chexficient`'s paths, in one run.

Writes a random-weight model of the released sizes (ViT-B/14 at 378 px + BERT-base, 512-d) and synthetic 1024x1024
16-bit PNGs and DICOMs (phantoms) to a temporary folder, then measures each path in its own subprocess (so that
peak RSS is per path):

  stock       AutoModel.from_pretrained(dir, trust_remote_code=True) + AutoImageProcessor, one image at a time, fp32
  eager       InferenceEngine: DataLoader decode workers + batched forward (bf16 + SDPA on CUDA, fp32 on CPU)
  compile     the same with torch.compile (compile time reported apart, not in the throughput)
  int8        torch dynamic int8 quantisation of the linear layers (CPU)
  onnx        ONNX Runtime fp32 (export time reported apart; parity with PyTorch checked, cosine >= 0.999)
  onnx-int8   ONNX Runtime dynamic int8

For each: images/s end-to-end (decode + preprocess + forward), images/s of the forward alone, latency p50/p95 at
batch 1 (decode included), peak RSS, peak GPU memory on CUDA; ratios against stock. JSON to --out.

    python benchmarks/embed_throughput.py --num-images 4 --latency-runs 3      # ~5 min on 2 CPU cores
    python benchmarks/embed_throughput.py --num-images 512 --batch-size 64 --paths stock,eager,compile   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stock_path import stock_image_features  # noqa: E402

from chexficient.runtime.machine import machine_info  # noqa: E402

from configuration_chexficient import CheXficientConfig  # noqa: E402
from image_processing_chexficient import CheXficientImageProcessor  # noqa: E402
from modeling_chexficient import CheXficientModel  # noqa: E402


PATHS = ("stock", "eager", "compile", "int8", "onnx", "onnx-int8")


# ----- setup (main process) ------------------------------------------------------------------------------------


def write_model(folder: Path) -> None:
    """The released architecture with random weights, saved with its remote code and image processor."""
    torch.manual_seed(0)
    CheXficientModel(CheXficientConfig()).eval().save_pretrained(folder)
    CheXficientImageProcessor().save_pretrained(folder)


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` 1024x1024 16-bit phantoms, alternately as PNG and DICOM."""
    from chexficient.inference.synthetic import phantom_images, write_dicom, write_png

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(phantom_images(count, image_size=1024, bit_depth=16)):
        paths.append(
            write_png(folder / f"cxr{i:04d}.png", image)
            if i % 2 == 0
            else write_dicom(folder / f"cxr{i:04d}.dcm", image)
        )
    return paths


# ----- measurement (one subprocess per path) -------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None}
    return {"p50_ms": 1000 * float(np.percentile(values, 50)), "p95_ms": 1000 * float(np.percentile(values, 95))}


def measure_stock(model_dir: Path, images: list[Path]) -> dict[str, Any]:
    """What a user writes from the model card: Auto classes, one image at a time, fp32, decode included."""
    from transformers import AutoImageProcessor, AutoModel

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the lab note's A100 ran it on the GPU
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    load = time.perf_counter() - start
    embeddings, per_image, forward = stock_image_features(model, processor, images, device)
    np.save(os.environ["BENCH_EMBED_OUT"], embeddings)
    result = {
        "load_s": load,
        "end_to_end_images_per_s": len(images) / sum(per_image),
        "model_only_images_per_s": len(images) / sum(forward),
        "latency_batch1": _percentiles(per_image),  # every stock request is a batch-1 request
        "device": str(device),
        "dtype": "float32",
    }
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def measure_engine(
    path: str, model_dir: Path, images: list[Path], batch_size: int, num_workers: int, latency_runs: int, device: str
) -> dict[str, Any]:
    """Our paths: batched embedding through the DataLoader, forward timed apart, then batch-1 latency."""
    from chexficient.data.images import InputItem, make_image_loader
    from chexficient.inference.engine import InferenceEngine

    start = time.perf_counter()
    extra: dict[str, Any] = {}
    onnx_session = None
    if path in ("onnx", "onnx-int8"):
        from chexficient.inference.onnx_export import OnnxEmbedder, export_onnx

        onnx_dir = Path(os.environ["BENCH_WORKDIR"]) / "onnx"
        onnx_file = onnx_dir / "chexficient.onnx"
        if path == "onnx" and not onnx_file.exists():  # exported (and checked) in the first round only
            processor = CheXficientImageProcessor.from_pretrained(model_dir)
            check = torch.from_numpy(np.stack([processor.process_one(p) for p in images[:2]]))
            report = export_onnx(
                model_dir, onnx_file, int8=True, exporter=os.environ["BENCH_EXPORTER"], check_inputs=check
            )
            extra["export_s"] = report.seconds
            extra["parity_vs_pytorch_fp32"] = report.parity
            extra["onnx_int8_vs_pytorch_fp32"] = report.int8_parity
        onnx_session = OnnxEmbedder(onnx_file if path == "onnx" else onnx_dir / "chexficient.int8.onnx")
        processor = CheXficientImageProcessor.from_pretrained(model_dir)
        run = onnx_session.embed
        device_obj = torch.device("cpu")
        dtype = "float32" if path == "onnx" else "int8"
    else:
        dtype = {"eager": "auto", "compile": "auto", "int8": "int8"}[path]
        engine = InferenceEngine.from_pretrained(model_dir, device, dtype, compile=path == "compile")
        device_obj = engine.device
        dtype = engine.dtype
        processor = engine.image_processor

        def run(pixels: torch.Tensor) -> np.ndarray:
            return engine.embed_pixels(pixels).cpu().numpy()

    extra["load_s"] = time.perf_counter() - start
    items = [InputItem(p.name, str(p)) for p in images]

    if path == "compile":  # compile for this batch size, outside the timings
        warm = torch.from_numpy(np.stack([processor.process_one(images[0])] * min(batch_size, len(images))))
        t0 = time.perf_counter()
        run(warm)
        _sync(device_obj)
        extra["compile_s"] = time.perf_counter() - t0
    else:  # one warm-up forward (allocator, thread pools, ORT arena)
        run(torch.from_numpy(processor.process_one(images[0])[None]))

    loader = make_image_loader(items, processor, batch_size, num_workers, pin_memory=device_obj.type == "cuda")
    forward_s, embeddings = 0.0, []
    if device_obj.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_obj)
    t_start = time.perf_counter()
    for batch in loader:
        if batch.failed:
            raise RuntimeError(f"benchmark image failed to decode: {batch.failed}")
        t0 = time.perf_counter()
        embeddings.append(run(batch.pixel_values))  # the host copy synchronises on CUDA
        forward_s += time.perf_counter() - t0
    total_s = time.perf_counter() - t_start
    np.save(os.environ["BENCH_EMBED_OUT"], np.concatenate(embeddings))

    latencies: list[float] = []
    if path != "compile":  # a compiled graph is specialised to the batch size; batch 1 would recompile
        for image in images[:latency_runs]:
            t0 = time.perf_counter()
            run(torch.from_numpy(processor.process_one(image)[None]))
            latencies.append(time.perf_counter() - t0)
    result = {
        "end_to_end_images_per_s": len(images) / total_s,
        "model_only_images_per_s": len(images) / forward_s,
        "latency_batch1": _percentiles(latencies),
        "device": str(device_obj),
        "dtype": dtype,
        "batch_size": batch_size,
        "num_workers": num_workers,
        **extra,
    }
    if device_obj.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device_obj) / 2**20
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss keeps the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def worker(args: argparse.Namespace) -> None:
    images = sorted(Path(args.images_dir).iterdir())
    if args.worker == "stock":
        result = measure_stock(Path(args.model_dir), images)
    else:
        result = measure_engine(
            args.worker,
            Path(args.model_dir),
            images,
            args.batch_size,
            args.num_workers,
            args.latency_runs,
            args.device,
        )
    result["peak_rss_mb"] = peak_rss_mb()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ----- orchestration -------------------------------------------------------------------------------------------


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest figures over rounds (throughput max, latency min), the largest peak memory, every round listed."""
    best = dict(max(runs, key=lambda r: r["end_to_end_images_per_s"]))
    best["model_only_images_per_s"] = max(r["model_only_images_per_s"] for r in runs)
    p50 = [r["latency_batch1"]["p50_ms"] for r in runs if r["latency_batch1"]["p50_ms"] is not None]
    p95 = [r["latency_batch1"]["p95_ms"] for r in runs if r["latency_batch1"]["p95_ms"] is not None]
    best["latency_batch1"] = {"p50_ms": min(p50) if p50 else None, "p95_ms": min(p95) if p95 else None}
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["rounds_end_to_end_images_per_s"] = [r["end_to_end_images_per_s"] for r in runs]
    for key in ("export_s", "parity_vs_pytorch_fp32", "onnx_int8_vs_pytorch_fp32", "compile_s"):
        values = [r[key] for r in runs if key in r]
        if values:
            best[key] = values[0]
    return best


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=8, help="images per path (half PNG, half DICOM)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of our batched paths")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader decode workers of our paths")
    parser.add_argument("--latency-runs", type=int, default=3, help="batch-1 requests timed per path")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measure every path this often, interleaved; keep the best"
    )
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--device", default="auto", help="device of the torch paths (auto: CUDA when available)")
    parser.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"), help="torch.onnx exporter")
    parser.add_argument("--workdir", default=None, help="keep the model and images here (default: a temp folder)")
    parser.add_argument(
        "--out", default=None, help="JSON output (default benchmarks/results/embed_throughput_<cpu|cuda>.json)"
    )
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {PATHS}")
    if "onnx-int8" in paths and "onnx" not in paths:
        parser.error("onnx-int8 uses the file the onnx path exports; include onnx too.")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"embed_throughput_{'cuda' if cuda else 'cpu'}.json")
    workdir_obj = None if args.workdir else tempfile.TemporaryDirectory(prefix="chexficient-bench-")
    workdir = Path(args.workdir or workdir_obj.name)
    model_dir, images_dir = workdir / "model", workdir / "images"

    started = time.perf_counter()
    if not (model_dir / "model.safetensors").exists():
        write_model(model_dir)
    if not images_dir.is_dir() or len(list(images_dir.iterdir())) != args.num_images:
        for stale in images_dir.glob("*") if images_dir.is_dir() else []:
            stale.unlink()
        write_images(images_dir, args.num_images)
    setup_s = time.perf_counter() - started
    print(f"setup {setup_s:.1f} s: released-size model with random weights, {args.num_images} 1024x1024 16-bit images")

    rounds: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    results: dict[str, Any] = {}
    embeddings: dict[str, np.ndarray] = {}
    for round_index in range(args.rounds):  # paths interleaved, best round kept: robust to a busy shared machine
        for path in paths:
            if round_index and ("error" in results.get(path, {}) or path == "compile"):
                continue  # compiling again each round would double the run; compile is measured once
            embed_file = workdir / f"embeddings_{path}.npy"
            env = {
                **os.environ,
                "BENCH_EMBED_OUT": str(embed_file),
                "BENCH_WORKDIR": str(workdir),
                "BENCH_EXPORTER": args.exporter,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }
            command = [sys.executable, __file__, "--worker", path, "--model-dir", str(model_dir)]
            command += ["--images-dir", str(images_dir), "--batch-size", str(args.batch_size)]
            command += ["--num-workers", str(args.num_workers), "--latency-runs", str(args.latency_runs)]
            command += ["--device", args.device]
            t0 = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir)
            lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{path}: FAILED\n{done.stderr[-3000:]}", file=sys.stderr)
                results[path] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no result"}
                continue
            r = json.loads(lines[-1][len("BENCH_RESULT ") :])
            r["wall_s"] = time.perf_counter() - t0
            rounds[path].append(r)
            results[path] = best_of(rounds[path])
            embeddings[path] = np.load(embed_file)
            print(
                f"round {round_index + 1} {path:<10} end-to-end {r['end_to_end_images_per_s']:7.3f} img/s   "
                f"model-only {r['model_only_images_per_s']:7.3f} img/s   "
                f"p50 {r['latency_batch1']['p50_ms'] or float('nan'):8.0f} ms   "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB   ({r['wall_s']:.0f} s)",
                flush=True,
            )

    stock = results.get("stock", {})
    for path, r in results.items():
        if "error" in r or "error" in stock or not stock:
            continue
        r["speedup_vs_stock"] = {
            "end_to_end": r["end_to_end_images_per_s"] / stock["end_to_end_images_per_s"],
            "model_only": r["model_only_images_per_s"] / stock["model_only_images_per_s"],
        }
        if path in embeddings and "stock" in embeddings:
            r["min_cosine_vs_stock"] = cosine_rows(embeddings["stock"], embeddings[path])

    report = {
        "benchmark": "embed_throughput",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "model": "released architecture (ViT-B/14 @ 378 px + BERT-base, 512-d), random weights",
        "images": f"{args.num_images} synthetic 1024x1024 16-bit phantoms, half PNG, half DICOM",
        "machine": machine_info(),
        "settings": {
            k: getattr(args, k)
            for k in ("num_images", "batch_size", "num_workers", "latency_runs", "rounds", "exporter")
        },
        "setup_s": setup_s,
        "total_s": time.perf_counter() - started,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nratios against the stock path (end-to-end / model-only):")
    for path, r in results.items():
        if "speedup_vs_stock" in r:
            s = r["speedup_vs_stock"]
            print(
                f"  {path:<10} {s['end_to_end']:5.2f}x / {s['model_only']:5.2f}x   min cosine vs stock {r.get('min_cosine_vs_stock', float('nan')):.5f}"
            )
    print(f"wrote {out} ({report['total_s']:.0f} s)")
    if workdir_obj is not None:
        workdir_obj.cleanup()


if __name__ == "__main__":
    main()
