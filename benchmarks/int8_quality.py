"""Does fast inference cost accuracy? Zero-shot macro AUROC of the demo model, fp32 vs int8 vs ONNX, on the phantoms.

Uses the model `make demo` trains (outputs/demo/final, tokenizer included) and the phantom test set it was evaluated
on (outputs/demo/phantoms/test.csv; re-rendered into a temporary folder when missing). Compares:

  torch fp32     the reference (CheXficientModel.zero_shot_classify)
  torch bf16     bfloat16 weights and activations on the CPU (`--dtype bfloat16`; native on AVX512-BF16 / AMX CPUs,
                 emulated elsewhere), image and text towers
  torch int8     dynamic int8 quantisation of every nn.Linear (image and text towers)
  onnx fp32      the exported image embedder (ONNX Runtime) + the fp32 text tower; parity must be cosine >= 0.999
  onnx int8      ONNX Runtime dynamic int8 image embedder + the fp32 text tower

    python benchmarks/int8_quality.py [--model outputs/demo/final] [--out benchmarks/results/int8_quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chexficient.data.images import InputItem, make_image_loader  # noqa: E402
from chexficient.inference.engine import InferenceEngine  # noqa: E402
from chexficient.inference.onnx_export import OnnxEmbedder, compare, export_onnx  # noqa: E402
from chexficient.phantoms import PHANTOM_LABELS, write_phantom_dataset  # noqa: E402
from chexficient.runtime.machine import machine_info  # noqa: E402


def macro_auroc(labels: pd.DataFrame, probs: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-class and macro AUROC over the classes that have both positives and negatives."""
    from sklearn.metrics import roc_auc_score

    per_class = {}
    for j, name in enumerate(names):
        y = labels[name].to_numpy()
        if 0 < y.sum() < len(y):
            per_class[name] = float(roc_auc_score(y, probs[:, j]))
    return {"macro_auroc": float(np.mean(list(per_class.values()))), "per_class": per_class}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=str(ROOT / "outputs" / "demo" / "final"), help="model folder with tokenizer"
    )
    parser.add_argument(
        "--phantoms", default=str(ROOT / "outputs" / "demo" / "phantoms"), help="phantom dataset folder"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_quality.json"))
    parser.add_argument("--max-auroc-drop", type=float, default=0.005, help="fail when int8 loses more macro AUROC")
    args = parser.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "model.safetensors").exists():
        sys.exit(f"{model_dir}: no trained model; run `make demo` first.")
    started = time.perf_counter()
    workdir = tempfile.TemporaryDirectory(prefix="chexficient-int8-")
    phantoms = Path(args.phantoms)
    if not (phantoms / "test.csv").exists():
        phantoms = Path(workdir.name) / "phantoms"
        write_phantom_dataset(phantoms, num_train=0, num_test=400, image_size=128)
    frame = pd.read_csv(phantoms / "test.csv")
    names = [name for name in PHANTOM_LABELS if name in frame.columns]
    items = [InputItem(str(row.id), str(phantoms / row.path)) for row in frame.itertuples()]

    fp32 = InferenceEngine.from_pretrained(model_dir, "cpu", "float32")
    bf16 = InferenceEngine.from_pretrained(model_dir, "cpu", "bfloat16")
    int8 = InferenceEngine.from_pretrained(model_dir, "cpu", "int8")
    pixels, failed = [], []
    for batch in make_image_loader(items, fp32.image_processor, batch_size=64, num_workers=0):
        failed += batch.failed
        if batch.pixel_values is not None:
            pixels.append(batch.pixel_values)
    if failed:
        raise RuntimeError(f"phantom test images failed to decode: {failed[:3]}")
    pixels = torch.cat(pixels)

    onnx_file = Path(workdir.name) / "demo.onnx"
    export = export_onnx(model_dir, onnx_file, int8=True, check_inputs=pixels[:16])
    seconds: dict[str, float] = {}

    def timed(name: str, engine: InferenceEngine) -> np.ndarray:
        engine.embed_numpy(pixels[:8])  # warm-up
        start = time.perf_counter()
        out = engine.embed_numpy(pixels)
        seconds[name] = time.perf_counter() - start
        return out

    embeds = {
        "torch_fp32": timed("torch_fp32", fp32),
        "torch_bf16": timed("torch_bf16", bf16),
        "torch_int8": timed("torch_int8", int8),
        "onnx_fp32": OnnxEmbedder(onnx_file).embed(pixels),
        "onnx_int8": OnnxEmbedder(export.int8_path).embed(pixels),
    }
    results: dict[str, Any] = {}
    for name, image_embeds in embeds.items():
        # the torch bf16 and int8 paths run the text tower in their own precision too
        engine = {"torch_int8": int8, "torch_bf16": bf16}.get(name, fp32)
        probs = engine.classify_embeds(image_embeds, names)
        results[name] = {
            **macro_auroc(frame, probs, names),
            "embedding_agreement_vs_torch_fp32": compare(embeds["torch_fp32"], image_embeds),
        }
        if name in seconds:
            results[name]["image_embedding_images_per_s"] = len(pixels) / seconds[name]
    reference = results["torch_fp32"]["macro_auroc"]
    for result in results.values():
        result["macro_auroc_change_vs_fp32"] = result["macro_auroc"] - reference

    report = {
        "benchmark": "int8_quality",
        "command": "python benchmarks/int8_quality.py " + " ".join(sys.argv[1:]),
        "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "test_set": f"{len(items)} phantom test images ({phantoms.name}/test.csv), labels {names}",
        "onnx_export": {"parity_vs_pytorch": export.parity, "int8_parity_vs_pytorch": export.int8_parity},
        "max_auroc_drop": args.max_auroc_drop,
        "machine": machine_info(),
        "results": results,
        "total_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        agreement = result["embedding_agreement_vs_torch_fp32"]
        print(
            f"{name:<11} macro AUROC {result['macro_auroc']:.4f} ({result['macro_auroc_change_vs_fp32']:+.4f})   "
            f"embedding cosine min {agreement['min_cosine']:.5f} mean {agreement['mean_cosine']:.5f}"
        )
    print(f"wrote {out}")
    worst = min(result["macro_auroc_change_vs_fp32"] for result in results.values())
    if worst < -args.max_auroc_drop:
        sys.exit(
            f"bf16 / int8 / ONNX lose {-worst:.4f} macro AUROC, more than --max-auroc-drop {args.max_auroc_drop}."
        )
    if export.parity["min_cosine"] < 0.999:
        sys.exit("ONNX fp32 disagrees with PyTorch (cosine < 0.999).")


if __name__ == "__main__":
    main()
