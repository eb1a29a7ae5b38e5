"""What one curation pass over an archive decided (`CurationRun`), and its report: counts per cluster, share kept, per-label shares, redundancy (pairs sharing a
patient) and neighbour spread of the pool, the curated subset and a random subset of the same size, with the paper's
Figure 2a (2-D PCA histograms) and Figure 2b (distance to the k nearest neighbours) as PNGs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class CurationRun:
    """What one pass of the curator over an archive decided."""

    kept: torch.Tensor  # [N] bool over the pairs
    valid: torch.Tensor  # [N] bool: the pair's image was readable
    considered: torch.Tensor  # [N] bool: the pair was in a full super-batch (the last, incomplete one is not)
    cluster_ids: torch.Tensor  # [N] long: nearest prototype at selection time (-1 when not considered)
    prototypes: torch.Tensor  # [K, 2D] after the pass
    steps: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


def near_duplicate_share(groups: np.ndarray, chosen: np.ndarray) -> float:
    """Share of the chosen pairs whose group (e.g. patient) has another chosen pair: the redundancy of a subset."""
    if not chosen.any():
        return 0.0
    _, inverse, counts = np.unique(groups[chosen], return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())


def knn_distances(features: torch.Tensor, k: int = 5) -> np.ndarray:
    """Mean Euclidean distance of each row to its k nearest other rows (the paper's Figure 2b)."""
    distances = torch.cdist(features.float(), features.float())
    distances.fill_diagonal_(float("inf"))
    k = min(k, max(features.shape[0] - 1, 1))
    return distances.topk(k, dim=1, largest=False).values.mean(dim=1).numpy()


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], components [D, 2]) of the two principal components."""
    mean = features.mean(dim=0)
    _, _, v = torch.pca_lowrank(features - mean, q=2, center=False)
    return mean, v[:, :2]


def plot_figures(
    features: torch.Tensor, subsets: dict[str, np.ndarray], out_dir: Path, k: int = 5, title: str = ""
) -> dict[str, str]:
    """Figure 2a (2-D PCA histograms of each subset, in the PCA of the first, the pool) and Figure 2b (the kNN
    distance distribution of each subset); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, components = pca_2d(features[next(iter(subsets.values()))])
    points = ((features - mean) @ components).numpy()
    extent = np.percentile(points, [1, 99], axis=0)
    figure, axes = plt.subplots(1, len(subsets), figsize=(3.6 * len(subsets), 3.4), squeeze=False)
    for axis, (name, chosen) in zip(axes[0], subsets.items()):
        axis.hist2d(points[chosen, 0], points[chosen, 1], bins=40, range=extent.T, cmap="magma", density=True)
        axis.set_title(f"{name} (n = {int(chosen.sum())})")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"Figure 2a: 2-D PCA density {title}".strip())
    figure.tight_layout()
    paths = {"figure_2a": str(out_dir / "figure_2a_pca.png")}
    figure.savefig(paths["figure_2a"], dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5.0, 3.4))
    for name, chosen in list(subsets.items())[1:]:
        axis.hist(knn_distances(features[chosen], k), bins=40, alpha=0.55, density=True, label=name)
    axis.set_xlabel(f"mean distance to the {k} nearest neighbours in the subset")
    axis.set_ylabel("density")
    axis.legend()
    axis.set_title(f"Figure 2b: spread of the subsets {title}".strip())
    figure.tight_layout()
    paths["figure_2b"] = str(out_dir / "figure_2b_knn.png")
    figure.savefig(paths["figure_2b"], dpi=110)
    plt.close(figure)
    return paths


def subset_report(
    run: CurationRun,
    features: torch.Tensor,
    frame: Any,
    label_columns: list[str],
    random_subset: np.ndarray,
    k: int = 5,
) -> dict[str, Any]:
    """Counts per cluster, share kept, per-label shares and redundancy of the pool, the subset and a random subset
    of the same size, and the mean kNN distance of each subset (in the space of `features`)."""
    kept, pool = run.kept.numpy(), run.valid.numpy()
    clusters = run.cluster_ids.numpy()
    report: dict[str, Any] = {
        "pairs": int(len(kept)),
        "readable": int(pool.sum()),
        "considered": int(run.considered.sum()),
        "kept": int(kept.sum()),
        "share_kept": float(kept.sum() / max(int(run.considered.sum()), 1)),
        "steps": run.steps,
        "clusters": [
            {"cluster": c, "pairs": int(((clusters == c) & pool).sum()), "kept": int(((clusters == c) & kept).sum())}
            for c in range(run.prototypes.shape[0])
        ],
    }
    subsets = {"pool": pool, "curated": kept, "random": random_subset}
    if label_columns:
        report["label_shares"] = {
            name: {label: float(frame[label].to_numpy()[chosen].mean()) for label in label_columns}
            for name, chosen in subsets.items()
        }
    if "patient_id" in frame.columns:
        groups = frame["patient_id"].astype(str).to_numpy()
        report["near_duplicate_share"] = {name: near_duplicate_share(groups, c) for name, c in subsets.items()}
    report["knn_distance"] = {name: float(knn_distances(features[c], k).mean()) for name, c in subsets.items()}
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Curated subset",
        "",
        f"Kept **{report['kept']}** of {report['considered']} pairs considered ({report['share_kept']:.1%}); "
        f"{report['pairs']} pairs in the manifest, {report['readable']} readable.",
        "",
        "| cluster | pairs | kept |",
        "|---|---|---|",
    ]
    lines += [f"| {c['cluster']} | {c['pairs']} | {c['kept']} |" for c in report["clusters"]]
    if "label_shares" in report:
        shares = report["label_shares"]
        lines += ["", "| label | pool | curated | random, same size |", "|---|---|---|---|"]
        for label in shares["pool"]:
            lines.append(
                f"| {label} | {shares['pool'][label]:.1%} | {shares['curated'][label]:.1%} | "
                f"{shares['random'][label]:.1%} |"
            )
    if "near_duplicate_share" in report:
        dup = report["near_duplicate_share"]
        lines += [
            "",
            "Pairs sharing their patient with another pair of the set: pool "
            f"{dup['pool']:.1%}, curated {dup['curated']:.1%}, random {dup['random']:.1%}.",
        ]
    knn = report["knn_distance"]
    lines += [
        "",
        f"Mean distance to the 5 nearest neighbours: curated {knn['curated']:.4f}, random {knn['random']:.4f}.",
    ]
    lines += ["", "![Figure 2a](figure_2a_pca.png)", "", "![Figure 2b](figure_2b_knn.png)", ""]
    return "\n".join(lines)


def label_columns(frame: Any) -> list[str]:
    """Columns holding 0/1 (or -1) labels: what the report gives per-label shares for."""
    columns = []
    for column in frame.columns:
        values = frame[column]
        if column in ("id", "path") or values.dtype.kind not in "iuf":
            continue
        if set(np.unique(values.dropna().to_numpy())) <= {-1, 0, 1}:
            columns.append(column)
    return columns


__all__ = [
    "CurationRun",
    "knn_distances",
    "label_columns",
    "near_duplicate_share",
    "pca_2d",
    "plot_figures",
    "report_markdown",
    "subset_report",
]
