"""What one curation pass over an archive decided (`CurationRun`), and its report: counts per cluster, share kept,
per-label shares, redundancy (pairs sharing a patient) and neighbour spread of the pool, the curated subset and a
random subset of the same size, with the paper's Figure 2a (2-D PCA histograms) and Figure 2b (distance to the k
nearest neighbours) as PNGs. `curate_archive` (a model) and `curate_store` (a store of embeddings) share it.

Nothing here grows faster than N·D. The neighbour statistic is an exact FAISS search (`IndexFlatL2`, k + 1
neighbours, the row itself dropped), never the N x N distance matrix. Sets of more than `KNN_SAMPLE_ROWS` rows are
measured on a seeded uniform sample of that many rows (the neighbours are then searched within the sample): every
subset is measured at the same count, so the curated and the random subset compare fairly, but a sampled figure is
larger than the whole set's (a sample is sparser). The figures draw the same samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


KNN_NEIGHBOURS = 5  # k of the Figure-2b statistic
# rows of a set the kNN statistic and the figures use at most: an exact search over a sample of 10,000 rows of
# 1,024 floats takes seconds on 2 cores (2e11 flops), and 3 samples hold 120 MB
KNN_SAMPLE_ROWS = 10_000


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


def sample_rows(rows: Any, max_rows: int | None, seed: int = 0) -> Any:
    """`rows` (an array or tensor [N, ...]) when N <= `max_rows` (or `max_rows` is None), else a seeded uniform sample
    of `max_rows` of them, in their order."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False))
    return rows[torch.from_numpy(chosen)] if isinstance(rows, torch.Tensor) else rows[chosen]


def knn_distances(
    features: torch.Tensor | np.ndarray,
    k: int = KNN_NEIGHBOURS,
    *,
    max_rows: int | None = KNN_SAMPLE_ROWS,
    seed: int = 0,
) -> np.ndarray:
    """Mean Euclidean distance of each row to its k nearest other rows (the paper's Figure 2b).

    An exact FAISS search of the rows against themselves (k + 1 neighbours, the row itself dropped): memory O(N·k),
    not the N x N matrix of `torch.cdist`. Above `max_rows` rows, the rows are a seeded uniform sample of `max_rows`
    (`sample_rows`) and the neighbours are searched within it: one value per sampled row."""
    import faiss

    points = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else features
    points = np.ascontiguousarray(sample_rows(np.asarray(points, dtype=np.float32), max_rows, seed))
    n = points.shape[0]
    if n <= 1:  # no other row: an infinite distance, as the cdist version gave
        return np.full(n, np.inf, dtype=np.float32)
    k = min(k, n - 1)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(points)
    squared, labels = index.search(points, k + 1)
    own = labels == np.arange(n)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)  # the row itself, or the farthest when ties hid it
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    return np.sqrt(np.maximum(squared[keep].reshape(n, k), 0.0)).mean(axis=1)


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], components [D, 2]) of the two principal components."""
    mean = features.mean(dim=0)
    _, _, v = torch.pca_lowrank(features - mean, q=2, center=False)
    return mean, v[:, :2]


def subset_samples(
    features: torch.Tensor, subsets: dict[str, np.ndarray], max_rows: int | None = KNN_SAMPLE_ROWS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The rows of each subset (a mask over the rows of `features`), a seeded sample of `max_rows` of them where
    there are more: what `spread_report` measures and `plot_figures` draws."""
    return {
        name: sample_rows(features[torch.from_numpy(np.flatnonzero(chosen))], max_rows, seed + i)
        for i, (name, chosen) in enumerate(subsets.items())
    }


def save_figure(figure: Any, path: Path) -> str:
    """Save a figure as PNG under a hidden temporary name, then rename it: a killed run leaves no half-written
    figure under the name."""
    temporary = path.with_name(f".tmp-{path.name}")
    figure.savefig(temporary, dpi=110, format="png")
    os.replace(temporary, path)
    return str(path)


def plot_figures(
    samples: dict[str, torch.Tensor],
    out_dir: Path,
    distances: dict[str, np.ndarray] | None = None,
    k: int = KNN_NEIGHBOURS,
    title: str = "",
) -> dict[str, str]:
    """Figure 2a (2-D PCA histograms of each subset's rows `samples` [n, D], in the PCA of the first, the pool) and
    Figure 2b (the kNN distance distribution of each subset but the first: `distances`, computed when not given);
    returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = {name: torch.as_tensor(rows).float() for name, rows in samples.items()}
    mean, components = pca_2d(next(iter(samples.values())))
    points = {name: ((rows - mean) @ components).numpy() for name, rows in samples.items()}
    extent = np.percentile(next(iter(points.values())), [1, 99], axis=0)
    figure, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 3.4), squeeze=False)
    for axis, (name, xy) in zip(axes[0], points.items()):
        axis.hist2d(xy[:, 0], xy[:, 1], bins=40, range=extent.T, cmap="magma", density=True)
        axis.set_title(f"{name} (n = {len(xy)})")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"Figure 2a: 2-D PCA density {title}".strip())
    figure.tight_layout()
    paths = {"figure_2a": save_figure(figure, out_dir / "figure_2a_pca.png")}
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5.0, 3.4))
    for name, rows in list(samples.items())[1:]:
        values = distances[name] if distances is not None else knn_distances(rows, k, max_rows=None)
        axis.hist(values, bins=40, alpha=0.55, density=True, label=name)
    axis.set_xlabel(f"mean distance to the {k} nearest neighbours in the subset")
    axis.set_ylabel("density")
    axis.legend()
    axis.set_title(f"Figure 2b: spread of the subsets {title}".strip())
    figure.tight_layout()
    paths["figure_2b"] = save_figure(figure, out_dir / "figure_2b_knn.png")
    plt.close(figure)
    return paths


def counts_report(
    *,
    pairs: int,
    readable: int,
    considered: int,
    kept: int,
    steps: int,
    cluster_pairs: np.ndarray,
    cluster_kept: np.ndarray,
) -> dict[str, Any]:
    """The counts of a pass: pairs, readable, considered (in a full super-batch), kept, share kept, steps, and the
    considered and kept pairs of each cluster (nearest prototype at selection time)."""
    return {
        "pairs": int(pairs),
        "readable": int(readable),
        "considered": int(considered),
        "kept": int(kept),
        "share_kept": float(kept / max(int(considered), 1)),
        "steps": int(steps),
        "clusters": [
            {"cluster": c, "pairs": int(p), "kept": int(q)}
            for c, (p, q) in enumerate(zip(cluster_pairs, cluster_kept))
        ],
    }


def subset_report(run: CurationRun, frame: Any, label_columns: list[str], random_subset: np.ndarray) -> dict[str, Any]:
    """Counts per cluster, share kept, per-label shares and redundancy of the pool, the subset and a random subset
    of the same size (`spread_report` adds the neighbour statistic and the figures)."""
    kept, pool = run.kept.numpy(), run.valid.numpy()
    clusters = run.cluster_ids.numpy()
    num_clusters = run.prototypes.shape[0]
    report = counts_report(
        pairs=len(kept),
        readable=int(pool.sum()),
        considered=int(run.considered.sum()),
        kept=int(kept.sum()),
        steps=run.steps,
        cluster_pairs=[int(((clusters == c) & pool).sum()) for c in range(num_clusters)],
        cluster_kept=[int(((clusters == c) & kept).sum()) for c in range(num_clusters)],
    )
    subsets = {"pool": pool, "curated": kept, "random": random_subset}
    if label_columns:
        report["label_shares"] = {
            name: {label: float(frame[label].to_numpy()[chosen].mean()) for label in label_columns}
            for name, chosen in subsets.items()
        }
    if "patient_id" in frame.columns:
        groups = frame["patient_id"].astype(str).to_numpy()
        report["near_duplicate_share"] = {name: near_duplicate_share(groups, c) for name, c in subsets.items()}
    return report


def spread_report(
    report: dict[str, Any],
    samples: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    set_sizes: dict[str, int],
    k: int = KNN_NEIGHBOURS,
    max_rows: int | None = KNN_SAMPLE_ROWS,
) -> dict[str, Any]:
    """Add the Figure-2b statistic (the mean kNN distance of each subset, measured on `samples`: each subset's rows,
    or a uniform sample of `max_rows` of them) and the two figures to `report`; `set_sizes` are the subsets' sizes."""
    distances = {name: knn_distances(rows, k, max_rows=max_rows) for name, rows in samples.items()}
    report["knn_distance"] = {
        name: float(values.mean()) if len(values) else float("nan") for name, values in distances.items()
    }
    report["knn"] = {
        "k": k,
        "max_rows": max_rows,
        "rows": {name: len(values) for name, values in distances.items()},
        "sampled": any(len(distances[name]) < size for name, size in set_sizes.items()),
    }
    figures = plot_figures(samples, out_dir, distances, k)
    report["figures"] = {name: Path(path).name for name, path in figures.items()}
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Curated subset",
        "",
        f"Kept **{report['kept']}** of {report['considered']} pairs considered ({report['share_kept']:.1%}); "
        f"{report['pairs']} pairs in the {report.get('source', 'manifest')}, {report['readable']} readable.",
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
    knn, setting = report["knn_distance"], report.get("knn", {})
    lines += [
        "",
        f"Mean distance to the {setting.get('k', KNN_NEIGHBOURS)} nearest neighbours: curated {knn['curated']:.4f}, "
        f"random {knn['random']:.4f}, pool {knn['pool']:.4f}.",
    ]
    if setting.get("sampled"):
        lines.append(
            f"(Measured within a seeded sample of at most {setting['max_rows']} rows of each set, searched within the "
            "sample: the sets compare at the same count; whole sets would give smaller distances.)"
        )
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


# ----- samples of a stream, for the report -------------------------------------------------------------------


class Reservoir:
    """A seeded uniform sample of at most `size` rows of a stream (Algorithm R, vectorised per batch); every row when
    `size` is None."""

    def __init__(self, size: int | None, seed: int):
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.chunks: list[np.ndarray] = []  # size None: every row
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        if self.size is None:
            self.chunks.append(rows.copy())
            self.seen += len(rows)
            return
        if self.rows is None:
            self.rows = np.empty((self.size, rows.shape[1]), dtype=np.float32)
        fill = min(max(self.size - self.seen, 0), len(rows))
        self.rows[self.seen : self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if len(rest):
            seen = self.seen + fill + np.arange(len(rest))  # items seen before each of the rest
            slot = (self.rng.random(len(rest)) * (seen + 1)).astype(np.int64)  # uniform in [0, seen]
            chosen = np.flatnonzero(slot < self.size)
            last = len(chosen) - 1 - np.unique(slot[chosen][::-1], return_index=True)[1]  # the last write wins
            self.rows[slot[chosen[last]]] = rest[chosen[last]]
        self.seen += len(rows)

    def sample(self, dim: int) -> np.ndarray:
        if self.chunks:
            return np.concatenate(self.chunks)
        if self.rows is None:
            return np.zeros((0, dim), dtype=np.float32)
        return self.rows[: min(self.seen, len(self.rows))]


class PositionSample:
    """The rows at positions drawn before a pass (seeded, uniform over the store), gathered as the pass reads them
    into a buffer allocated once (nothing long-lived is allocated during the pass); `rows()` in draw order."""

    def __init__(self, num_rows: int, size: int, dim: int, rng: np.random.Generator):
        self.slot = np.full(num_rows, -1, dtype=np.int32)
        self.slot[rng.choice(num_rows, size=size, replace=False)] = np.arange(size, dtype=np.int32)
        self.buffer = np.empty((size, dim), dtype=np.float32)
        self.filled = np.zeros(size, dtype=bool)

    def hits(self, positions: np.ndarray, usable: np.ndarray) -> np.ndarray:
        return (self.slot[positions] >= 0) & usable

    def gather(self, positions: np.ndarray, hit: np.ndarray, features: np.ndarray) -> None:
        slots = self.slot[positions[hit]]
        self.buffer[slots] = features[hit]
        self.filled[slots] = True

    def rows(self) -> np.ndarray:
        return self.buffer[self.filled]


__all__ = [
    "PositionSample",
    "Reservoir",
    "KNN_NEIGHBOURS",
    "KNN_SAMPLE_ROWS",
    "CurationRun",
    "counts_report",
    "knn_distances",
    "label_columns",
    "near_duplicate_share",
    "pca_2d",
    "plot_figures",
    "report_markdown",
    "sample_rows",
    "save_figure",
    "spread_report",
    "subset_report",
    "subset_samples",
]
