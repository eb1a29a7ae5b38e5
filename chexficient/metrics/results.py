"""Evaluation results as the programs write them (`<task>_<dataset>.json`), read back and rendered: tables with
confidence intervals, a per-class AUROC plot and model-index entries, for `eval/report.py` and the Hub card."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def format_ci(entry: dict[str, float], digits: int = 3) -> str:
    """ "0.812 (0.790–0.833)" from a bootstrap/seed entry, or the bare value when no CI exists."""
    value = entry.get("value", entry.get("mean"))
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if low is None or high is None or np.isnan(low) or np.isnan(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


TASK_TITLES = {
    "zero_shot": "Zero-shot classification (AUROC, 95% bootstrap CI)",
    "retrieval": "Image-report retrieval (Recall@K, 95% bootstrap CI)",
    "linear_probe": "Linear probe (macro AUROC, mean ± 1.96·SE over seeds)",
    "segmentation": "Segmentation (Dice, 95% bootstrap CI)",
}


def load_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every task result JSON under `folder` (recursively), ordered by task then dataset."""
    results = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}).") from error
        if isinstance(record, dict) and record.get("task") in TASK_TITLES:
            record["_path"] = str(path)
            results.append(record)
    order = list(TASK_TITLES)
    return sorted(results, key=lambda r: (order.index(r["task"]), r["dataset"]))


def results_markdown(results: Sequence[dict[str, Any]], plot: str | None = None) -> str:
    """The results section of a model card: one table per task, then the per-class plot."""
    lines = ["## Results", ""]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        by_task.setdefault(record["task"], []).append(record)
    for task, records in by_task.items():
        lines += [f"### {TASK_TITLES[task]}", ""]
        if task == "zero_shot":
            lines += ["| dataset | images | macro AUROC | macro AUPRC |", "|---|---|---|---|"]
            for r in records:
                m = r["metrics"]
                lines.append(
                    f"| {r['dataset']} | {r['num_images']} | {format_ci(m['macro_auroc'])} | "
                    f"{format_ci(m['macro_auprc'])} |"
                )
        elif task == "retrieval":
            lines += ["| dataset | direction | R@1 | R@5 | R@10 | mean rank |", "|---|---|---|---|---|---|"]
            for r in records:
                for direction in ("image_to_text", "text_to_image"):
                    m = r["metrics"][direction]
                    cells = [format_ci(m[f"recall@{k}"]) for k in (1, 5, 10)] + [format_ci(m["mean_rank"], 1)]
                    lines.append(f"| {r['dataset']} | {direction.replace('_', ' ')} | " + " | ".join(cells) + " |")
        elif task == "linear_probe":
            fractions = sorted({f for r in records for f in r["metrics"]}, key=float)
            lines += [
                "| dataset | " + " | ".join(f"{float(f):.0%} labels" for f in fractions) + " |",
                "|---|" + "---|" * len(fractions),
            ]
            for r in records:
                cells = [format_ci(r["metrics"][f]["macro_auroc"]) if f in r["metrics"] else "" for f in fractions]
                lines.append(f"| {r['dataset']} | " + " | ".join(cells) + " |")
        elif task == "segmentation":
            lines += ["| dataset | structures | mean Dice |", "|---|---|---|"]
            for r in records:
                per_class = ", ".join(f"{c} {r['metrics']['dice'][c]['value']:.3f}" for c in r["classes"])
                lines.append(f"| {r['dataset']} | {per_class} | {format_ci(r['metrics']['mean_dice'])} |")
        lines.append("")
    if plot:
        lines += [f"![Per-class zero-shot AUROC]({plot})", ""]
    return "\n".join(lines)


def plot_per_class_auroc(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Horizontal bars of per-class zero-shot AUROC with CI whiskers, one panel per dataset; None if no zero-shot."""
    records = [r for r in results if r["task"] == "zero_shot"]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(3.0, 0.32 * max(len(r["metrics"]["auroc"]) for r in records) + 1.2)
    figure, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), height), squeeze=False)
    for axis, record in zip(axes[0], records):
        entries = record["metrics"]["auroc"]
        names = list(entries)[::-1]
        values = [entries[n]["value"] for n in names]
        low = [max(0.0, entries[n]["value"] - entries[n]["ci_low"]) for n in names]
        high = [max(0.0, entries[n]["ci_high"] - entries[n]["value"]) for n in names]
        axis.barh(names, values, xerr=[low, high], color="#4878a8", ecolor="#333333", capsize=2)
        axis.axvline(0.5, color="#999999", linestyle="--", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_xlabel("AUROC")
        axis.set_title(f"{record['dataset']} (macro {record['metrics']['macro_auroc']['value']:.3f})")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def model_index_entries(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat (task, dataset, metric, value) records for a model card's model-index metadata."""
    entries = []
    for r in results:
        if r["task"] == "zero_shot":
            metrics = [("macro_auroc", "roc_auc", r["metrics"]["macro_auroc"]["value"])]
            metrics.append(("macro_auprc", "average_precision", r["metrics"]["macro_auprc"]["value"]))
            task_type = "zero-shot-image-classification"
        elif r["task"] == "retrieval":
            metrics = [
                (f"{d}_recall@{k}", "recall", r["metrics"][d][f"recall@{k}"]["value"])
                for d in ("image_to_text", "text_to_image")
                for k in (1, 5, 10)
            ]
            task_type = "image-text-retrieval"
        elif r["task"] == "linear_probe":
            metrics = [
                (f"linear_probe_auroc@{float(f):.0%}", "roc_auc", entry["macro_auroc"]["mean"])
                for f, entry in r["metrics"].items()
            ]
            task_type = "image-classification"
        else:
            metrics = [("mean_dice", "dice", r["metrics"]["mean_dice"]["value"])]
            task_type = "image-segmentation"
        for name, metric_type, value in metrics:
            entries.append(
                {
                    "task_type": task_type,
                    "dataset": r["dataset"],
                    "metric_name": name,
                    "metric_type": metric_type,
                    "value": float(value),
                }
            )
    return entries


__all__ = [
    "TASK_TITLES",
    "format_ci",
    "load_results",
    "model_index_entries",
    "plot_per_class_auroc",
    "results_markdown",
]
