"""The paper's comparison in miniature: CheXficient (curated) vs CheXrandom (a random subset of the same size) vs
CheXfull (every pair), through the real trainer, on the archive-like phantom corpus, from a shared warm start.

    python benchmarks/curation_archive.py --out-dir benchmarks/results/curation_archive          # about an hour
    python benchmarks/curation_archive.py --out-dir ... --reuse                                   # finished arms kept

1. Data (`chexficient.phantoms.archive`): a pool of repeated studies per patient with a dominant normal class and a
   long tail of rare findings; a disjoint "foundation" corpus (other patients); an i.i.d. test set (one study per
   patient) for zero-shot and retrieval; an i.i.d. labelled set for the linear probe.
2. A foundation stage (`train/pretrain.py`, no curation) on the foundation corpus stands in for DINOv2 and
   Bio_ClinicalBERT: every arm starts from it (`--model_name_or_path`) with its tokenizer.
3. Arms, paired by seed: CheXficient (curated), CheXrandom (`--random_subset_size` = the pairs the curated arm of
   the same seed kept), CheXfull; the same epochs, learning rate and batch sizes.
4. Endpoints that a sign flip cannot dominate: the frozen-encoder linear probe (macro AUROC at 1% and 10% labels) and
   zero-shot macro AUROC with report-style prompt ensembles; beside them the paper's bare prompts per finding, AUROC
   on the rare findings, image->report Recall@10, and compute (pairs trained, wall time).
5. Mechanism: per-finding shares and the near-duplicate share (pairs sharing their patient) of the curated and random
   subsets; Figure 2a (2-D PCA densities of full / curated / random) and Figure 2b (distance to the 5 nearest
   neighbours), both in the CheXfull model's embedding space.

Writes `results.json` (per seed, means, paired differences with 95% t-intervals), `summary.md` and PNG plots under
--out-dir; the runs and data go to --work-dir (default outputs/curation_archive).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chexficient.curation.functions import concat_normalized  # noqa: E402
from chexficient.data.images import make_image_loader  # noqa: E402
from chexficient.inference.curation_report import knn_distances, near_duplicate_share, pca_2d  # noqa: E402
from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc  # noqa: E402
from chexficient.phantoms import PHANTOM_LABELS  # noqa: E402
from chexficient.phantoms.archive import RARE_FINDINGS, archive_prompts, write_archive_dataset  # noqa: E402
from chexficient.runtime.machine import machine_info  # noqa: E402
from eval.linear_probe import FeatureSplit, evaluate_linear_probe, split_off_validation  # noqa: E402
from eval.retrieval import deduplicate_texts, evaluate_retrieval  # noqa: E402

from modeling_chexficient import CheXficientModel, zero_shot_scores  # noqa: E402
from processing_chexficient import CheXficientProcessor  # noqa: E402


ARMS = ("curated", "random", "full")
PRIMARY = ("linear_probe_1pct", "linear_probe_10pct", "zero_shot_archive")
# The probe sets are small (1% of 3,000 images is 30): enough optimizer steps for a linear head to converge, with
# the best epoch chosen on the validation share as eval/linear_probe.py does.
PROBE_EPOCHS, PROBE_BATCH, PROBE_LR = 100, 32, 3e-3


# ----- data and runs ----------------------------------------------------------------------------------------------


def prepare_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The pool (train), the i.i.d. probe set (val) and test set, and the disjoint foundation corpus."""
    pool = write_archive_dataset(
        work / "pool",
        num_train=args.pool_size,
        num_val=args.probe_size,
        num_test=args.test_size,
        seed=0,
        image_size=args.image_size,
        extra_studies=args.extra_studies,
    )
    foundation = write_archive_dataset(
        work / "foundation", num_train=args.foundation_size, num_test=0, seed=7, image_size=args.image_size
    )
    return {**pool, "foundation": foundation["train"], "foundation_root": foundation["root"]}


def run_pretrain(name: str, output: Path, arguments: list[str], reuse: bool, log: Path) -> dict[str, Any]:
    """One `train/pretrain.py` run (its summary, with the wall time); reused when `reuse` and it finished."""
    if reuse and (output / "summary.json").exists() and (output / "wall.json").exists():
        print(f"[{name}] reusing {output}", flush=True)
        return {**json.loads((output / "summary.json").read_text()), **json.loads((output / "wall.json").read_text())}
    command = [sys.executable, str(ROOT / "train" / "pretrain.py"), "--output_dir", str(output), *arguments]
    print(f"[{name}] {' '.join(command[2:])}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("a") as handle:
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = {"wall_seconds": round(time.time() - start, 1)}
    (output / "wall.json").write_text(json.dumps(wall))
    print(f"[{name}] done in {wall['wall_seconds']:.0f} s", flush=True)
    return {**json.loads((output / "summary.json").read_text()), **wall}


def common_arguments(args: argparse.Namespace) -> list[str]:
    return [
        "--cpu",
        "--report_to",
        "none",
        "--num_workers",
        str(args.num_workers),
        "--logging_steps",
        "50",
        "--per_device_batch_size",
        str(args.super_batch),
        "--curated_batch_size",
        str(args.batch_size),
        "--warmup_samples",
        str(args.super_batch),
    ]


# ----- evaluation -------------------------------------------------------------------------------------------------


def load_frame(path: Path):
    import pandas as pd

    return pd.read_csv(path)


@torch.no_grad()
def encode(model_dir: Path, frame: Any, root: Path, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Image embeddings (CLIP space), backbone features (normalised CLS, the linear probe's) and text embeddings."""
    model = CheXficientModel.from_pretrained(model_dir).eval()
    processor = CheXficientProcessor.from_pretrained(model_dir)
    paths = [str(root / p) for p in frame["path"]]
    images, backbone = [], []
    for batch in make_image_loader(paths, processor.image_processor, batch_size=256):
        assert not batch.failed, batch.failed
        pooled = model.vision_model(pixel_values=batch.pixel_values).pooler_output
        images.append(torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1))
        backbone.append(torch.nn.functional.normalize(pooled, dim=-1))
    out = {"image": torch.cat(images), "backbone": torch.cat(backbone), "model": model, "processor": processor}
    if texts is not None:
        chunks = []
        for start in range(0, len(texts), 256):
            tokens = processor(text=texts[start : start + 256])
            chunks.append(model.get_text_features(tokens["input_ids"], tokens["attention_mask"]))
        out["text"] = torch.cat(chunks)
    return out


@torch.no_grad()
def archive_text_embeds(model: Any, processor: Any, labels: list[str]) -> torch.Tensor:
    """[C, 2, D]: per label, the mean (re-normalised) embedding of its positive and of its negative sentences in the
    corpus's own report wording (`archive_prompts`): report-style prompt ensembles."""
    pairs = []
    for label in labels:
        sides = []
        for sentences in archive_prompts(label):
            tokens = processor(text=sentences)
            embeds = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
            sides.append(torch.nn.functional.normalize(embeds.mean(dim=0), dim=-1))
        pairs.append(torch.stack(sides))
    return torch.stack(pairs)


def report_texts(frame: Any) -> list[str]:
    return [" ".join(f"{a} {b}".split()) for a, b in zip(frame["findings"].fillna(""), frame["impression"].fillna(""))]


def evaluate_arm(model_dir: Path, data: dict[str, Any], probe_seeds: tuple[int, ...]) -> dict[str, Any]:
    """Every endpoint of one trained model on the fixed test and probe sets."""
    test, probe, root = data["test_frame"], data["probe_frame"], data["root"]
    labels = list(PHANTOM_LABELS)
    encoded = encode(model_dir, test, root, texts=report_texts(test))
    model, tokenizer = encoded["model"], encoded["processor"].tokenizer
    targets = test[labels].to_numpy(dtype=float)
    result: dict[str, Any] = {}
    scores = zero_shot_scores(encoded["image"], archive_text_embeds(model, encoded["processor"], labels)).numpy()
    metric = multilabel_auc(scores, targets, labels, with_auprc=False)
    result["zero_shot_archive"] = metric["macro_auroc"]
    result["zero_shot_archive_per_finding"] = metric["auroc"]
    rare = [metric["auroc"][f] for f in RARE_FINDINGS if f in metric["auroc"]]
    result["zero_shot_archive_rare"] = float(np.mean(rare)) if rare else math.nan
    for prompts in ("report", "paper"):
        scores = model.zero_shot_classify(labels, tokenizer, image_embeds=encoded["image"], prompts=prompts).numpy()
        metric = multilabel_auc(scores, targets, labels, with_auprc=False)
        result[f"zero_shot_{prompts}"] = metric["macro_auroc"]
        result[f"zero_shot_{prompts}_per_finding"] = metric["auroc"]
        rare = [metric["auroc"][f] for f in RARE_FINDINGS if f in metric["auroc"]]
        result[f"zero_shot_{prompts}_rare"] = float(np.mean(rare)) if rare else math.nan
    texts, text_ids = deduplicate_texts(report_texts(test))
    text_embeds = encoded["text"][[text_ids.tolist().index(i) for i in range(len(texts))]]
    retrieval = evaluate_retrieval(encoded["image"], text_embeds, text_ids, k=(1, 10), num_resamples=0)
    result["retrieval_i2t_r10"] = retrieval["image_to_text"]["recall@10"]["value"]
    probe_features = encode(model_dir, probe, root)["backbone"]
    train_split = FeatureSplit(probe_features, probe[labels].to_numpy(dtype=float), probe["id"].astype(str).tolist())
    train_split, val_split = split_off_validation(train_split, 0.1, seed=0)
    test_split = FeatureSplit(encoded["backbone"], targets, test["id"].astype(str).tolist())
    probe_result = evaluate_linear_probe(
        train_split,
        val_split,
        test_split,
        labels,
        label_fractions=(0.01, 0.1),
        seeds=probe_seeds,
        epochs=PROBE_EPOCHS,
        batch_size=PROBE_BATCH,
        lr=PROBE_LR,
        num_resamples=0,
    )
    result["linear_probe_1pct"] = probe_result["0.01"]["macro_auroc"]["mean"]
    result["linear_probe_10pct"] = probe_result["0.1"]["macro_auroc"]["mean"]
    return result


# ----- mechanism ---------------------------------------------------------------------------------------------------


def subset_composition(indices: list[int], pool: Any) -> dict[str, Any]:
    chosen = np.zeros(len(pool), dtype=bool)
    chosen[indices] = True
    groups = pool["patient_id"].astype(str).to_numpy()
    return {
        "size": int(chosen.sum()),
        "shares": {label: float(pool[label].to_numpy()[chosen].mean()) for label in PHANTOM_LABELS},
        "near_duplicate_share": near_duplicate_share(groups, chosen),
    }


@torch.no_grad()
def pool_features(model_dir: Path, pool: Any, root: Path) -> torch.Tensor:
    """The pool's [image ; text] features in `model_dir`'s space (L2-normalised concatenation, as curation sees it)."""
    encoded = encode(model_dir, pool, root, texts=report_texts(pool))
    return concat_normalized(encoded["image"], encoded["text"])


def plot_figure_2(features: torch.Tensor, subsets: dict[str, np.ndarray], knn: dict[str, list], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, components = pca_2d(features)
    points = ((features - mean) @ components).numpy()
    extent = np.percentile(points, [1, 99], axis=0)
    figure, axes = plt.subplots(1, len(subsets), figsize=(3.4 * len(subsets), 3.3), squeeze=False)
    for axis, (name, chosen) in zip(axes[0], subsets.items()):
        axis.hist2d(points[chosen, 0], points[chosen, 1], bins=36, range=extent.T, cmap="magma", density=True)
        axis.set_title(f"{name} (n = {int(chosen.sum())})", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("Figure 2a: density in the CheXfull model's space (2-D PCA of [image ; text])", fontsize=10)
    figure.tight_layout()
    figure.savefig(out_dir / "figure_2a_pca.png", dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5.2, 3.4))
    for name, values in knn.items():
        axis.hist(np.concatenate(values), bins=50, alpha=0.55, density=True, label=name)
    axis.set_xlabel("mean distance to the 5 nearest neighbours within the subset")
    axis.set_ylabel("density")
    axis.legend()
    axis.set_title("Figure 2b: spread of the subsets (all seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(out_dir / "figure_2b_knn.png", dpi=110)
    plt.close(figure)


def plot_endpoints(per_seed: dict[str, dict[int, dict]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*PRIMARY, "zero_shot_archive_rare", "zero_shot_paper", "retrieval_i2t_r10"]
    figure, axes = plt.subplots(1, len(names), figsize=(2.5 * len(names), 3.3))
    colours = {"curated": "#c0392b", "random": "#2e86c1", "full": "#7f8c8d"}
    for axis, name in zip(axes, names):
        for x, arm in enumerate(ARMS):
            values = [r[name] for r in per_seed[arm].values()]
            axis.scatter([x] * len(values), values, color=colours[arm], s=14, alpha=0.8)
            axis.plot([x - 0.25, x + 0.25], [np.mean(values)] * 2, color=colours[arm], linewidth=2)
        axis.set_xticks(range(len(ARMS)), ARMS, fontsize=8)
        axis.set_title(name.replace("_", " "), fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "endpoints.png", dpi=110)
    plt.close(figure)


# ----- statistics --------------------------------------------------------------------------------------------------


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over paired seeds, with a 95% t-interval."""
    from scipy import stats

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(diff.mean())
    if len(diff) < 2:
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "n": int(len(diff))}
    half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(len(diff))}


def summarise(values: list[float]) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "n": int(len(values)),
    }


# ----- the experiment ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results/curation_archive")
    parser.add_argument("--work-dir", default="outputs/curation_archive")
    parser.add_argument("--reuse", action="store_true", help="keep arms whose run finished before")
    parser.add_argument("--seeds", type=int, default=10, help="paired seeds of the curated and random arms")
    parser.add_argument("--full-seeds", type=int, default=3, help="seeds of the full arm")
    parser.add_argument("--pool-size", type=int, default=6000)
    parser.add_argument("--probe-size", type=int, default=3000, help="i.i.d. labelled images for the linear probe")
    parser.add_argument("--test-size", type=int, default=1500)
    parser.add_argument("--foundation-size", type=int, default=4000)
    parser.add_argument("--extra-studies", type=float, default=1.5, help="mean follow-up studies per patient")
    parser.add_argument("--image-size", type=int, default=64, help="size the phantoms are rendered at")
    parser.add_argument("--model-config", default="tiny", help="architecture preset of the foundation model")
    parser.add_argument("--foundation-epochs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--super-batch", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=32, help="batch after curation (and of the other arms)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--probe-seeds", type=int, default=3)
    parser.add_argument(
        "--ablate",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="instead of the comparison, one curated/random pair per seed for each variant (e.g. max_per_cluster=20 "
        "num_prototypes=12 super_batch=960 foundation_epochs=2 extra_studies=0.3 outlier_quantile=0.9)",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train/pretrain.py arguments")
    return parser


@dataclass
class Setup:
    """The data, the warm start and the arguments every arm of one setting shares."""

    work: Path
    data: dict[str, Any]
    pool: Any
    common: list[str]
    warm: list[str]
    foundation: dict[str, Any]
    foundation_dir: Path
    log: Path


def set_up(args: argparse.Namespace, work: Path, tag: str = "") -> Setup:
    """Render the data (shared by settings with the same data parameters) and train (or reuse) the foundation."""
    data_dir = work / f"data-r{args.extra_studies:g}-px{args.image_size}"
    data_paths = prepare_data(data_dir, args)
    log = work / "runs.log"
    common = common_arguments(args)
    foundation_dir = work / f"foundation-{args.model_config}-e{args.foundation_epochs}-px{args.image_size}"
    foundation = run_pretrain(
        "foundation" + tag,
        foundation_dir,
        [
            *common,
            "--model_config",
            args.model_config,
            "--train_manifest",
            str(data_paths["foundation"]),
            "--image_root",
            str(data_paths["foundation_root"]),
            "--curation",
            "false",
            "--num_epochs",
            str(args.foundation_epochs),
            "--learning_rate",
            "1e-3",
            "--min_learning_rate",
            "1e-4",
            "--warmup_steps",
            "20",
            "--per_device_batch_size",
            str(args.batch_size),
        ],
        True,  # the warm start of a setting is trained once
        log,
    )
    warm = [
        "--model_name_or_path",
        str(foundation_dir / "final"),
        "--tokenizer",
        str(foundation_dir / "final"),
        "--train_manifest",
        str(data_paths["train"]),
        "--image_root",
        str(data_paths["root"]),
        "--num_epochs",
        str(args.epochs),
        "--learning_rate",
        str(args.learning_rate),
        "--min_learning_rate",
        str(args.learning_rate / 10),
        *args.extra,
    ]
    data = {
        "root": data_paths["root"],
        "test_frame": load_frame(data_paths["test"]),
        "probe_frame": load_frame(data_paths["val"]),
    }
    return Setup(work, data, load_frame(data_paths["train"]), common, warm, foundation, foundation_dir, log)


def run_arms(setup: Setup, args: argparse.Namespace, runs_dir: Path, seeds: int, full_seeds: int):
    """Curated and random arms paired by seed (random matched to the pairs the curated arm kept), and full arms;
    returns their summaries and subsets."""
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
    subsets: dict[str, dict[int, list[int]]] = {"curated": {}, "random": {}}
    base = [*setup.common, *setup.warm]
    for seed in range(seeds):
        curated_dir = runs_dir / f"curated-s{seed}"
        name = f"{runs_dir.name} curated s{seed}"
        runs["curated"][seed] = run_pretrain(name, curated_dir, [*base, "--seed", str(seed)], args.reuse, setup.log)
        kept = json.loads((curated_dir / "final" / "curated_subset.json").read_text())
        subsets["curated"][seed] = kept["indices"]
        random_dir = runs_dir / f"random-s{seed}"
        random_args = ["--seed", str(seed), "--random_subset_size", str(kept["num_curated"])]
        name = f"{runs_dir.name} random s{seed}"
        runs["random"][seed] = run_pretrain(name, random_dir, [*base, *random_args], args.reuse, setup.log)
        subsets["random"][seed] = json.loads((random_dir / "final" / "curated_subset.json").read_text())["indices"]
    for seed in range(full_seeds):
        full_args = ["--seed", str(seed), "--curation", "false", "--per_device_batch_size", str(args.batch_size)]
        name = f"{runs_dir.name} full s{seed}"
        runs["full"][seed] = run_pretrain(name, runs_dir / f"full-s{seed}", [*base, *full_args], args.reuse, setup.log)
    return runs, subsets


def evaluate_arms(setup: Setup, runs: dict, runs_dir: Path, probe_seeds: tuple[int, ...]) -> dict:
    per_seed: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for seed, summary in runs[arm].items():
            print(f"[evaluate] {runs_dir.name} {arm} s{seed}", flush=True)
            endpoints = evaluate_arm(runs_dir / f"{arm}-s{seed}" / "final", setup.data, probe_seeds)
            compute = {k: summary.get(k) for k in ("pairs_trained", "steps", "wall_seconds", "curated_pairs")}
            per_seed[arm][seed] = {**endpoints, **compute}
    return per_seed


def compare(per_seed: dict) -> tuple[list[str], dict, dict, dict]:
    """Endpoint names, means per arm, curated - random and full - random paired differences."""
    first = next(iter(per_seed["curated"].values()))
    names = [k for k, v in first.items() if isinstance(v, (int, float)) and v is not None]
    means = {
        arm: {k: summarise([r[k] for r in per_seed[arm].values()]) for k in names} for arm in ARMS if per_seed[arm]
    }
    paired = {
        k: paired_difference(
            [per_seed["curated"][s][k] for s in per_seed["curated"]],
            [per_seed["random"][s][k] for s in per_seed["curated"]],
        )
        for k in names
    }
    full = (
        {
            k: paired_difference(
                [per_seed["full"][s][k] for s in per_seed["full"]],
                [per_seed["random"][s][k] for s in per_seed["full"]],
            )
            for k in names
        }
        if per_seed["full"]
        else {}
    )
    return names, means, paired, full


def run_ablations(args: argparse.Namespace, work: Path, out_dir: Path) -> dict[str, Any]:
    """Each variant changes one setting of the default comparison; curated and random arms, paired by seed."""
    probe_seeds = tuple(range(args.probe_seeds))
    variants = ["default=", *args.ablate]
    table = {}
    for variant in variants:
        key, _, value = variant.partition("=")
        varied = argparse.Namespace(**vars(args))
        trainer: list[str] = []
        if key in ("foundation_epochs", "extra_studies", "super_batch"):
            setattr(varied, key, type(getattr(args, key))(value))
        elif key != "default":
            trainer = [f"--{key}", value]
        varied.extra = [*args.extra, *trainer]
        setup = set_up(varied, work, tag=f" ({variant})")
        runs_dir = work / f"ablation-{key}-{value}" if key != "default" else work / "comparison"
        runs, subsets = run_arms(setup, varied, runs_dir, args.seeds, 0)
        per_seed = evaluate_arms(setup, runs, runs_dir, probe_seeds)
        _, means, paired, _ = compare(per_seed)
        table[variant] = {
            "curated": {k: means["curated"][k]["mean"] for k in (*PRIMARY, "curated_pairs")},
            "random": {k: means["random"][k]["mean"] for k in PRIMARY},
            "curated_minus_random": {k: paired[k] for k in PRIMARY},
            "near_duplicate_share": {
                arm: float(
                    np.mean(
                        [subset_composition(ids, setup.pool)["near_duplicate_share"] for ids in subsets[arm].values()]
                    )
                )
                for arm in subsets
            },
        }
        (out_dir / "ablations.json").write_text(json.dumps({"settings": vars(args), "variants": table}, indent=2))
    (out_dir / "ablations.md").write_text(ablation_markdown(table))
    print(ablation_markdown(table))
    return table


def ablation_markdown(table: dict[str, Any]) -> str:
    lines = [
        "| variant | kept pairs | " + " | ".join(f"{k}: curated - random (95% CI)" for k in PRIMARY) + " |",
        "|---|---|" + "---|" * len(PRIMARY),
    ]
    for variant, row in table.items():
        cells = [
            f"{d['mean']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})"
            for d in (row["curated_minus_random"][k] for k in PRIMARY)
        ]
        lines.append(f"| {variant or 'default'} | {row['curated']['curated_pairs']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out_dir, work = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    if args.ablate is not None:
        return run_ablations(args, work, out_dir)
    started = time.time()
    setup = set_up(args, work)
    runs_dir = work / "comparison"
    runs, subsets = run_arms(setup, args, runs_dir, args.seeds, args.full_seeds)
    probe_seeds = tuple(range(args.probe_seeds))
    per_seed = evaluate_arms(setup, runs, runs_dir, probe_seeds)
    warm_endpoints = evaluate_arm(setup.foundation_dir / "final", setup.data, probe_seeds)
    _, means, paired, full_vs_random = compare(per_seed)
    pool = setup.pool
    composition = {
        "pool": subset_composition(list(range(len(pool))), pool),
        **{f"{arm}-s{seed}": subset_composition(ids, pool) for arm in subsets for seed, ids in subsets[arm].items()},
    }
    full_space = pool_features(runs_dir / "full-s0" / "final", pool, setup.data["root"])
    knn = {
        arm: [knn_distances(full_space[torch.tensor(ids)]) for ids in subsets[arm].values()]
        for arm in ("curated", "random")
    }
    chosen = {
        "full": np.ones(len(pool), dtype=bool),
        "curated (seed 0)": np.isin(np.arange(len(pool)), subsets["curated"][0]),
        "random (seed 0)": np.isin(np.arange(len(pool)), subsets["random"][0]),
    }
    plot_figure_2(full_space, chosen, knn, out_dir)
    plot_endpoints(per_seed, out_dir)
    foundation = setup.foundation
    results = {
        "settings": vars(args),
        "machine": machine,
        "foundation": {
            "summary": {k: foundation.get(k) for k in ("steps", "pairs_trained", "wall_seconds")},
            **warm_endpoints,
        },
        "per_seed": per_seed,
        "means": means,
        "curated_minus_random": paired,
        "full_minus_random": full_vs_random,
        "composition": composition,
        "knn_distance_in_full_space": {arm: [float(v.mean()) for v in values] for arm, values in knn.items()},
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out_dir / "summary.md").write_text(summary_markdown(results))
    print(summary_markdown(results))
    return results


def summary_markdown(results: dict[str, Any]) -> str:
    means, paired, vs_full = results["means"], results["curated_minus_random"], results["full_minus_random"]
    rows = [
        *PRIMARY,
        "zero_shot_archive_rare",
        "zero_shot_report",
        "zero_shot_paper",
        "zero_shot_paper_rare",
        "retrieval_i2t_r10",
        "pairs_trained",
        "wall_seconds",
    ]
    lines = [
        "| endpoint | CheXficient (curated) | CheXrandom | CheXfull | curated - random (95% CI) | full - random (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for name in rows:
        cells = [f"{means[arm][name]['mean']:.4g}" for arm in ARMS]
        diff = paired[name]
        full = vs_full[name]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {diff['mean']:+.4f} ({diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}) | "
            f"{full['mean']:+.4f} ({full['ci_low']:+.4f}, {full['ci_high']:+.4f}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
