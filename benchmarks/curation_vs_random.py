"""The paper's experiment at phantom scale: a curated subset against a random subset of the same size and the full
set, trained for the same number of epochs; zero-shot macro AUROC on the phantom test set, and how spread out the
curated subset is compared with random subsets (mean distance to the k nearest neighbours, the paper's Figure 2b).

    python benchmarks/curation_vs_random.py --out-dir benchmarks/results/curation_vs_random

Each arm is one `train/pretrain.py` run (the demo preset unless overridden); JSON and PNG plots go to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import BertTokenizerFast  # noqa: E402

from chexficient.curation.functions import concat_normalized  # noqa: E402
from chexficient.machine import machine_info  # noqa: E402
from chexficient.pairs import ImageReportCollator, ImageReportDataset, load_pairs  # noqa: E402

from image_processing_chexficient import CheXficientImageProcessor  # noqa: E402
from modeling_chexficient import CheXficientModel  # noqa: E402


def run_arm(name: str, out_dir: Path, common: list[str], extra: list[str], reuse: bool = False) -> dict:
    output = out_dir / name
    if reuse and (output / "summary.json").exists():
        print(f"[{name}] reusing {output / 'summary.json'}")
        return json.loads((output / "summary.json").read_text())
    command = [sys.executable, str(ROOT / "train" / "pretrain.py"), *common, "--output_dir", str(output), *extra]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((output / "summary.json").read_text())
    summary["wall_seconds"] = round(time.time() - start, 1)
    return summary


@torch.no_grad()
def embed_training_pairs(model_dir: Path, manifest: str, image_root: str) -> tuple[torch.Tensor, list[str]]:
    """Concatenated normalised [image ; text] embeddings of every training pair, by the curated model."""
    model = CheXficientModel.from_pretrained(model_dir).eval()
    image_processor = CheXficientImageProcessor.from_pretrained(model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    pairs = load_pairs(manifest, image_root=image_root)
    size = image_processor.crop_size["height"]
    loader = torch.utils.data.DataLoader(
        ImageReportDataset(pairs, image_processor),
        batch_size=128,
        collate_fn=ImageReportCollator(tokenizer, (size, size)),
    )
    features = []
    for batch in loader:
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")})
        features.append(concat_normalized(out.image_embeds, out.text_embeds))
    return torch.cat(features), pairs.ids


def mean_knn_distance(features: torch.Tensor, k: int = 5) -> float:
    """Mean over points of the mean Euclidean distance to their k nearest other points of the same set."""
    distances = torch.cdist(features, features)
    distances.fill_diagonal_(float("inf"))
    return float(distances.topk(k, largest=False).values.mean())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    arms = results["arms"]
    names = list(arms)
    left.bar(names, [arms[n]["test_macro_auroc"] for n in names], color=["#2a6f97", "#a9a9a9", "#6c757d"])
    left.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    left.set_ylabel("zero-shot macro AUROC (phantom test set)")
    left.set_title(f"equal epochs ({results['epochs']})")
    for i, n in enumerate(names):
        left.text(i, arms[n]["test_macro_auroc"] + 0.005, f"{arms[n]['test_macro_auroc']:.3f}", ha="center")
    knn = results["knn"]
    right.hist(knn["random_subsets"], bins=15, color="#a9a9a9", label="random subsets")
    right.axvline(knn["curated"], color="#2a6f97", linewidth=2, label="curated subset")
    right.set_xlabel(f"mean distance to {knn['k']} nearest neighbours")
    right.set_title("spread of the subset (cf. paper Fig. 2b)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results/curation_vs_random")
    parser.add_argument("--config", default="demo_tiny", help="pretraining preset shared by the three arms")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's num_epochs")
    parser.add_argument("--knn", type=int, default=5)
    parser.add_argument("--random-draws", type=int, default=50, help="random subsets for the kNN comparison")
    parser.add_argument("--reuse", action="store_true", help="reuse arms whose summary.json already exists")
    parser.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="further train/pretrain.py arguments")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = ["--config", args.config, "--cpu", "--report_to", "none", "--phantom_dir", str(out_dir / "phantoms")]
    if args.epochs is not None:
        common += ["--num_epochs", str(args.epochs)]
    common += [a for a in args.pretrain_args if a != "--"]

    curated = run_arm("curated", out_dir, common, [], args.reuse)
    ratio = curated["curated_ratio"]
    random_arm = run_arm("random", out_dir, common, ["--random_subset_ratio", f"{ratio:.6f}"], args.reuse)
    full = run_arm("full", out_dir, common, ["--curation", "False"], args.reuse)

    arguments = json.loads((out_dir / "curated" / "arguments.json").read_text())
    features, _ = embed_training_pairs(
        out_dir / "curated" / "final", arguments["data"]["train_manifest"], arguments["data"]["image_root"]
    )
    subset = json.loads((out_dir / "curated" / "final" / "curated_subset.json").read_text())
    curated_knn = mean_knn_distance(features[subset["indices"]], args.knn)
    generator = torch.Generator().manual_seed(0)
    random_knn = [
        mean_knn_distance(
            features[torch.randperm(len(features), generator=generator)[: len(subset["indices"])]], args.knn
        )
        for _ in range(args.random_draws)
    ]
    results = {
        "config": args.config,
        "epochs": arguments["train"]["num_epochs"],
        "num_train_pairs": subset["num_candidates"],
        "subset_size": subset["num_curated"],
        "subset_ratio": ratio,
        "arms": {
            name: {
                "test_macro_auroc": summary["test"]["macro_auroc"],
                "per_class_auroc": summary["test"]["auroc"],
                "pairs_trained": summary["pairs_trained"],
                "steps": summary["steps"],
                "wall_seconds": summary.get("wall_seconds", summary["seconds"]),
            }
            for name, summary in (("curated", curated), ("random", random_arm), ("full", full))
        },
        "knn": {
            "k": args.knn,
            "curated": curated_knn,
            "random_mean": float(np.mean(random_knn)),
            "random_std": float(np.std(random_knn)),
            "random_subsets": random_knn,
            "curated_percentile_among_random": float(np.mean(np.array(random_knn) < curated_knn) * 100),
        },
        "command": "python benchmarks/curation_vs_random.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "curation_vs_random.png")
    for name, arm in results["arms"].items():
        print(
            f"{name:>8}: test macro AUROC {arm['test_macro_auroc']:.4f}, {arm['pairs_trained']} pairs trained, "
            f"{arm['steps']} steps, {arm['wall_seconds']} s"
        )
    knn = results["knn"]
    print(
        f"mean {args.knn}-NN distance: curated {knn['curated']:.4f}, random {knn['random_mean']:.4f} "
        f"± {knn['random_std']:.4f} (curated above {knn['curated_percentile_among_random']:.0f}% of random subsets)"
    )
    return results


if __name__ == "__main__":
    main()
