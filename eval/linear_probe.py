"""Linear probing of the frozen image encoder: features computed once (cached as safetensors), a linear head trained
with AdamW on 1-100% of the training labels over several seeds, AUROC on the test split with CIs.

    python -m eval.linear_probe --model outputs/demo/final --dataset phantom --root outputs/demo/phantoms

The head is selected on the validation split (the dataset's own, or a fixed share of the training split) by macro
AUROC after each epoch. Writes `linear_probe_<dataset>.json` and a markdown table; the feature cache is reused by
later runs with the same model weights, dataset split and feature kind.

The head is `CheXficientForImageClassification.classifier_head`, the layer of the model's own linear probe. With
`--features embedding` (the default) on a CheXficient model it reads the same L2-normalised, projected embedding as
`CheXficientForImageClassification`, so the trained probe is saved as that class (`--save_probe`, on by default):
`OUT/<dataset>_probe/` holds the evaluated model's image tower and projection, the head of the largest label
fraction's run with the best validation macro AUROC (the first seed on a tie), `id2label`/`label2id` and
`problem_type="multi_label_classification"`, and the image processor, so that

    CheXficientForImageClassification.from_pretrained("OUT/phantom_probe")  # sigmoid(logits): probabilities
    pipeline("image-classification", model="OUT/phantom_probe", trust_remote_code=True)

load it. The JSON's `probe` names the folder, the label fraction and the seed (null with `--features backbone` or
another HF encoder, whose head sits on the raw pooled output and has no model class here).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eval.arguments import EvalArguments


logger = logging.getLogger(__name__)


@dataclass
class FeatureSplit:
    """Cached features of one split: features [N, D], targets [N, C] (1/0/-1) and ids."""

    features: torch.Tensor
    targets: np.ndarray
    ids: list[str]


def _model_fingerprint(model_path: str) -> str:
    """Changes when the model's weights change (path, size and mtime of the weight files)."""
    parts = [os.path.abspath(model_path)]
    for name in sorted(os.listdir(model_path)) if os.path.isdir(model_path) else []:
        if name.endswith((".safetensors", ".bin")):
            stat = os.stat(os.path.join(model_path, name))
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_features(
    loaded: Any,
    data: Any,
    cache_dir: str | os.PathLike,
    *,
    split: str,
    kind: str = "embedding",
    batch_size: int = 64,
    num_workers: int = 0,
) -> FeatureSplit:
    """Features of every readable image of `data` (a ClassificationSet), read from or written to the cache."""
    from safetensors.torch import load_file, save_file

    from eval.common import encode_images

    key = f"{data.name}_{split}_{kind}_{_model_fingerprint(loaded.path)}"
    path = Path(cache_dir) / f"{key}.safetensors"
    ids_path = path.with_suffix(".ids.json")
    if path.exists() and ids_path.exists():
        stored = json.loads(ids_path.read_text())
        index = {sample_id: i for i, sample_id in enumerate(data.ids)}
        if all(sample_id in index for sample_id in stored["ids"]):
            rows = np.array([index[sample_id] for sample_id in stored["ids"]], dtype=np.int64)
            logger.info("features of %s/%s read from %s", data.name, split, path)
            return FeatureSplit(load_file(str(path))["features"], data.targets[rows], stored["ids"])
        logger.warning("%s is stale (ids differ from the dataset); recomputing", path)
    encoded = encode_images(
        data.image_paths,
        loaded.image_processor,
        lambda pixel_values: loaded.image_features(pixel_values, kind),
        loaded.device,
        batch_size=batch_size,
        num_workers=num_workers,
        desc=f"features {data.name}/{split}",
    )
    ids = [data.ids[i] for i in encoded.indices]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": encoded.features.contiguous()}, str(path), metadata={"model": loaded.path, "kind": kind})
    ids_path.write_text(json.dumps({"ids": ids, "skipped": encoded.skipped}))
    return FeatureSplit(encoded.features, data.targets[encoded.indices], ids)


def split_off_validation(split: FeatureSplit, fraction: float, seed: int = 0) -> tuple[FeatureSplit, FeatureSplit]:
    """A fixed random `fraction` of a training split as validation (the same for every probe seed)."""
    order = np.random.default_rng(seed).permutation(len(split.ids))
    num_val = max(1, int(round(fraction * len(order))))
    parts = []
    for rows in (np.sort(order[num_val:]), np.sort(order[:num_val])):
        parts.append(FeatureSplit(split.features[rows], split.targets[rows], [split.ids[i] for i in rows]))
    return parts[0], parts[1]


def label_fraction_rows(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """Rows of a `fraction` of the training set (at least one), drawn per seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fractions must lie in (0, 1], got {fraction}.")
    count = max(1, int(round(fraction * num_samples)))
    return np.sort(np.random.default_rng([seed, int(fraction * 1e6)]).permutation(num_samples)[:count])


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the known labels only (targets of -1 are ignored)."""
    known = targets >= 0
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def train_linear_head(
    train: FeatureSplit,
    val: FeatureSplit,
    *,
    epochs: int = 15,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[torch.nn.Linear, list[dict[str, float]]]:
    """AdamW on a linear head over frozen features; returns the head of the best validation epoch and the history."""
    from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc

    from modeling_chexficient import CheXficientForImageClassification

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = CheXficientForImageClassification.classifier_head(train.features.shape[1], train.targets.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    features, targets = train.features.float(), torch.as_tensor(train.targets, dtype=torch.float32)
    best_state, best_score, history = None, -np.inf, []
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = masked_bce(head(features[rows]), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
        with torch.no_grad():
            val_scores = torch.sigmoid(head(val.features.float())).numpy()
        score = multilabel_auc(val_scores, val.targets, with_auprc=False)["macro_auroc"]
        history.append({"epoch": epoch + 1, "train_loss": float(total) / len(order), "val_macro_auroc": score})
        if best_state is None or (not np.isnan(score) and score > best_score):
            best_score = score if not np.isnan(score) else best_score
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return head, history


def evaluate_linear_probe(
    train: FeatureSplit,
    val: FeatureSplit,
    test: FeatureSplit,
    labels: Sequence[str],
    *,
    label_fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 15,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    num_resamples: int = 500,
    heads: dict[tuple[float, int], torch.nn.Linear] | None = None,
) -> dict[str, Any]:
    """Test AUROC per label fraction: mean ± 1.96·SE over seeds, and a bootstrap CI for every (fraction, seed).
    `heads`, when given, receives each run's trained head under (fraction, seed)."""
    from chexficient.metrics.bootstrap import bootstrap_ci, seed_summary
    from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc

    results: dict[str, Any] = {}
    runs = [(fraction, seed) for fraction in label_fractions for seed in seeds]
    per_run: dict[float, list[dict[str, Any]]] = {fraction: [] for fraction in label_fractions}
    for fraction, seed in tqdm(runs, desc="linear probe", unit="run"):
        rows = label_fraction_rows(len(train.ids), fraction, seed)
        subset = FeatureSplit(train.features[rows], train.targets[rows], [train.ids[i] for i in rows])
        head, history = train_linear_head(
            subset, val, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed
        )
        if heads is not None:
            heads[(fraction, seed)] = head
        with torch.no_grad():
            scores = torch.sigmoid(head(test.features.float())).numpy()
        point = multilabel_auc(scores, test.targets, labels)
        interval = bootstrap_ci(
            lambda r, s=scores: {
                "macro_auroc": multilabel_auc(s[r], test.targets[r], labels, with_auprc=False)["macro_auroc"]
            },
            len(scores),
            num_resamples=num_resamples,
            seed=seed,
        )["macro_auroc"]
        per_run[fraction].append(
            {
                "seed": seed,
                "num_train": int(len(rows)),
                "macro_auroc": interval,
                "auroc": point["auroc"],
                "best_epoch": int(np.nanargmax([h["val_macro_auroc"] for h in history]) + 1)
                if any(not np.isnan(h["val_macro_auroc"]) for h in history)
                else epochs,
                "history": history,
            }
        )
    for fraction, fraction_runs in per_run.items():
        macro = [run["macro_auroc"]["value"] for run in fraction_runs]
        classes = sorted({label for run in fraction_runs for label in run["auroc"]}, key=list(labels).index)
        results[f"{fraction:g}"] = {
            "label_fraction": fraction,
            "num_train": fraction_runs[0]["num_train"],
            "macro_auroc": seed_summary(macro),
            "auroc": {
                c: seed_summary([run["auroc"][c] for run in fraction_runs if c in run["auroc"]]) for c in classes
            },
            "runs": fraction_runs,
        }
    return results


def probe_run(metrics: dict[str, Any]) -> tuple[float, int]:
    """The run whose head is saved as the probe: the largest label fraction, the seed of the best validation macro
    AUROC (its best epoch; the first seed on a tie or when every score is undefined)."""
    entry = max(metrics.values(), key=lambda e: e["label_fraction"])

    def best_val(run: dict[str, Any]) -> float:
        scores = [h["val_macro_auroc"] for h in run["history"] if not np.isnan(h["val_macro_auroc"])]
        return max(scores, default=-np.inf)

    run = max(entry["runs"], key=best_val)  # max keeps the first of equal scores
    return entry["label_fraction"], run["seed"]


def save_probe(loaded: Any, head: torch.nn.Linear, labels: Sequence[str], folder: str | os.PathLike) -> str:
    """The evaluated CheXficient model's image tower and projection with a trained `head`, saved as a
    `CheXficientForImageClassification` folder (multi-label, `id2label` from `labels`) with the image processor."""
    from modeling_chexficient import CheXficientForImageClassification

    config = copy.deepcopy(loaded.model.config)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "multi_label_classification"
    probe = CheXficientForImageClassification(config)
    state = {
        name: value
        for name, value in loaded.model.state_dict().items()
        if name.startswith(("vision_model.", "visual_projection."))
    }
    state.update({f"classifier.{name}": value for name, value in head.state_dict().items()})
    probe.load_state_dict(state, strict=True)
    probe.save_pretrained(folder)
    loaded.image_processor.save_pretrained(folder)
    return str(folder)


def markdown_table(result: dict[str, Any]) -> str:
    from chexficient.metrics.results import format_ci

    lines = [
        f"### Linear probe: {result['dataset']} ({result['num_test']} test images, {len(result['seeds'])} seeds,"
        f" {result['features']} features)",
        "",
        "| label fraction | training images | macro AUROC (mean ± 1.96·SE over seeds) |",
        "|---|---|---|",
    ]
    for entry in result["metrics"].values():
        lines.append(f"| {entry['label_fraction']:.0%} | {entry['num_train']} | {format_ci(entry['macro_auroc'])} |")
    return "\n".join(lines)


# ----- command line ---------------------------------------------------------------------------------------------------


@dataclass
class LinearProbeArguments(EvalArguments):
    train_split: str = field(default="train", metadata={"help": "Split the head is trained on."})
    val_split: str = field(
        default="", metadata={"help": "Validation split; empty: a fixed share (val_fraction) of the training split."}
    )
    val_fraction: float = field(default=0.1, metadata={"help": "Share of the training split held out for selection."})
    test_split: str = field(default="test", metadata={"help": "Split the AUROC is reported on."})
    features: str = field(
        default="embedding",
        metadata={
            "help": "embedding (CheXficient's projected, normalised embedding) or backbone (pooled ViT output)."
        },
    )
    label_fractions: str = field(
        default="0.01,0.1,1.0", metadata={"help": "Comma-separated shares of training labels."}
    )
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds."})
    epochs: int = field(default=15, metadata={"help": "Training epochs of the head."})
    batch_size: int = field(default=512, metadata={"help": "Head training batch size."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    encode_batch_size: int = field(default=64, metadata={"help": "Images per encoder forward pass."})
    cache_dir: str = field(default="", metadata={"help": "Feature cache folder (default: OUT_DIR/features)."})
    save_probe: bool = field(
        default=True,
        metadata={
            "help": "With embedding features of a CheXficient model: save the probe as a "
            "CheXficientForImageClassification folder, OUT_DIR/<dataset>_probe."
        },
    )

    def __post_init__(self):
        self.label_fraction_values = [float(v) for v in self.label_fractions.split(",") if v.strip()]
        self.seed_values = [int(v) for v in self.seeds.split(",") if v.strip()]
        if not self.label_fraction_values or not self.seed_values:
            raise ValueError("--label_fractions and --seeds need at least one value each.")
        if self.features not in ("embedding", "backbone"):
            raise ValueError(f"--features must be embedding or backbone, got {self.features!r}.")


def run_linear_probe(args: LinearProbeArguments) -> dict[str, Any]:
    from eval.common import load_model_and_processor, publish_result
    from eval.datasets import load_classification

    loaded = load_model_and_processor(args.model, device=args.device)
    cache_dir = args.cache_dir or str(Path(args.out_dir) / "features")
    splits = {}
    for role, split in (("train", args.train_split), ("val", args.val_split), ("test", args.test_split)):
        if not split:
            continue
        data = load_classification(args.dataset, args.root, split=split)
        splits[role] = cached_features(
            loaded,
            data,
            cache_dir,
            split=split,
            kind=args.features,
            batch_size=args.encode_batch_size,
            num_workers=args.num_workers,
        )
        labels = data.labels
    if "val" not in splits:
        splits["train"], splits["val"] = split_off_validation(splits["train"], args.val_fraction, seed=args.seed)
    heads: dict[tuple[float, int], torch.nn.Linear] = {}
    metrics = evaluate_linear_probe(
        splits["train"],
        splits["val"],
        splits["test"],
        labels,
        label_fractions=args.label_fraction_values,
        seeds=args.seed_values,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        num_resamples=args.num_resamples,
        heads=heads,
    )
    probe = None
    if args.save_probe and loaded.is_chexficient and args.features == "embedding":
        fraction, seed = probe_run(metrics)
        folder = save_probe(loaded, heads[(fraction, seed)], labels, Path(args.out_dir) / f"{args.dataset}_probe")
        probe = {"path": folder, "label_fraction": fraction, "seed": seed}
    result = {
        "task": "linear_probe",
        "dataset": args.dataset,
        "model": args.model,
        "labels": list(labels),
        "features": args.features,
        "num_train": len(splits["train"].ids),
        "num_val": len(splits["val"].ids),
        "num_test": len(splits["test"].ids),
        "seeds": args.seed_values,
        "hyperparameters": {
            "optimizer": "AdamW",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
        },
        "metrics": metrics,
        "probe": probe,
    }
    return publish_result(result, markdown_table(result), args.out_dir, f"linear_probe_{args.dataset}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from eval.common import run_task_cli

    return run_task_cli(LinearProbeArguments, run_linear_probe, argv)


if __name__ == "__main__":
    main()
