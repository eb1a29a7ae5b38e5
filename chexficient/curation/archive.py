"""`chexficient curate`: curate an existing archive of image-report pairs with a trained CheXficient, no training.

    chexficient curate pairs.csv --model DIR --out curated/ [--super_batch_size 480] [--seed 0]
    accelerate launch train/pretrain.py --train_manifest curated/subset.csv ...

The pairs are embedded in batches (resumable, exactly once, like `chexficient embed`: the [image ; text] embeddings
go to `OUT/embeddings.safetensors`), the prototypes start from k-means on a warm-up sample, and the trainer's own
curator (`curate_super_batch`, the same code train/pretrain.py runs) walks shuffled super-batches of the chosen size.
The kept pairs are written as `OUT/subset.<suffix>` (the input's rows and columns) and `OUT/curated_subset.json`;
`OUT/report.json` and `OUT/report.md` give the counts per cluster, the share kept, per-label shares (when label
columns exist) and the near-duplicate share (when a `patient_id` column exists), with the paper's Figure 2a (2-D PCA
histograms of pool, subset and a random subset of the same size) and Figure 2b (distance to the k nearest
neighbours) as PNGs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..manifests import read_manifest
from ..pairs import ImageReportCollator, ImageReportDataset, PairTable, load_pairs
from ..subset import curated_subset_record, write_curated_subset
from .config import CurationConfig
from .curator import PrototypeCurator, curate_super_batch, warmup_indices
from .functions import concat_normalized
from .sampler import CuratingBatchSampler


EMBEDDINGS_FILE = "embeddings.safetensors"


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


def curate_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    valid: torch.Tensor,
    config: CurationConfig,
    *,
    super_batch_size: int = 480,
    seed: int = 0,
) -> CurationRun:
    """The trainer's curation epoch on fixed embeddings [N, D] of N pairs: k-means prototypes from the trainer's
    warm-up sample, then `curate_super_batch` and the prototype update on each super-batch of the trainer's order
    (`CuratingBatchSampler`, one process)."""
    num_pairs = image_embeds.shape[0]
    curator = PrototypeCurator(config, num_samples=num_pairs)
    warm = warmup_indices(num_pairs, config.warmup_samples, seed)
    warm = warm[valid[warm]]
    curator.initialize(image_embeds[warm], text_embeds[warm], generator=torch.Generator().manual_seed(seed))
    sampler = CuratingBatchSampler(num_samples=num_pairs, batch_size=super_batch_size, curation_epochs=1, seed=seed)
    if sampler.steps_per_epoch(0) == 0:
        raise ValueError(
            f"{num_pairs} pairs make no full super-batch of {super_batch_size}; lower --super_batch_size."
        )
    considered = torch.zeros(num_pairs, dtype=torch.bool)
    cluster_ids = torch.full((num_pairs,), -1, dtype=torch.long)
    log = []
    for step, batch in enumerate(sampler):
        ids = torch.tensor(batch, dtype=torch.long)
        images, texts, ok = image_embeds[ids], text_embeds[ids], valid[ids]
        keep, selection = curate_super_batch(curator, images, texts, ids, ok, seed, step)
        curator.update_prototypes(concat_normalized(images[keep], texts[keep]))
        considered[ids] = True
        cluster_ids[ids] = selection.cluster_ids
        log.append({"step": step, "candidates": int(ok.sum()), "kept": int(keep.sum())})
    return CurationRun(
        kept=curator.curated.clone(),
        valid=valid.clone(),
        considered=considered,
        cluster_ids=cluster_ids,
        prototypes=curator.prototypes.clone(),
        steps=len(log),
        log=log,
    )


# ----- embedding the archive ---------------------------------------------------------------------------------------


@torch.no_grad()
def embed_pairs(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    pairs: PairTable,
    out: Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    max_text_length: int = 256,
    chunk_rows: int = 1024,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_embeds [N, D], text_embeds [N, D], valid [N]) of every pair, stored as [image ; text] rows in `out`
    (the `chexficient embed` store: chunks while it runs, each id once whatever the moment of a kill); a re-run
    embeds only the pairs not stored yet. Unreadable images are embedded as zeros and marked invalid."""
    from tqdm.auto import tqdm

    from ..inference.embed import EmbeddingStore, read_embeddings

    store = EmbeddingStore(out, "safetensors", chunk_rows=chunk_rows)
    done = store.existing_ids()
    todo = [i for i, sample_id in enumerate(pairs.ids) if sample_id not in done]
    size = image_processor.crop_size["height"], image_processor.crop_size["width"]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageReportDataset(pairs, image_processor), todo),
        batch_size=batch_size,
        collate_fn=ImageReportCollator(tokenizer, size, max_text_length),
        num_workers=num_workers,
    )
    device = next(model.parameters()).device
    for batch in tqdm(loader, desc="embedding pairs", unit="batch", disable=not progress):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
        out_ = model(**{k: v for k, v in inputs.items() if k in batch})
        rows = torch.cat([out_.image_embeds.float(), out_.text_embeds.float()], dim=-1).cpu()
        rows[~batch["valid"]] = 0.0  # an unreadable image: a zero row, marked invalid on reading
        indices = batch["sample_index"].tolist()
        store.append([pairs.ids[i] for i in indices], [str(pairs.images[i]) for i in indices], rows.numpy())
    store.finalize()
    ids, _, rows = read_embeddings(out, "safetensors")
    position = {sample_id: row for row, sample_id in enumerate(ids)}
    rows = torch.from_numpy(rows[[position[sample_id] for sample_id in pairs.ids]])
    dim = rows.shape[1] // 2
    valid = rows.abs().sum(dim=1) > 0
    return rows[:, :dim], rows[:, dim:], valid


# ----- the report ------------------------------------------------------------------------------------------------


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


# ----- the command -------------------------------------------------------------------------------------------------


def curate_archive(
    manifest: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: CurationConfig | None = None,
    *,
    super_batch_size: int = 480,
    seed: int = 0,
    image_root: str | os.PathLike | None = None,
    label_columns: list[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    chunk_rows: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Curate `manifest` with the model in `model_dir`; writes the subset, its record, the report and the figures
    under `out_dir` and returns the report."""
    from ..runtime import resolve_device
    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    config = config or CurationConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_dir)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no saved CheXficient folder (config.json) there.")
    model = CheXficientModel.from_pretrained(model_path).to(resolve_device(device)).eval()
    processor = CheXficientProcessor.from_pretrained(model_path)
    pairs = load_pairs(manifest, image_root=image_root)
    frame = read_manifest(manifest)
    frame = frame.assign(_id=frame["id"].astype(str) if "id" in frame else list(map(str, frame.index)))
    frame = frame.set_index("_id").loc[pairs.ids].reset_index(drop=True)  # the pairs' rows, in their order
    image_embeds, text_embeds, valid = embed_pairs(
        model,
        processor.tokenizer,
        processor.image_processor,
        pairs,
        out / EMBEDDINGS_FILE,
        batch_size=batch_size,
        num_workers=num_workers,
        chunk_rows=chunk_rows,
        progress=progress,
    )
    run = curate_embeddings(image_embeds, text_embeds, valid, config, super_batch_size=super_batch_size, seed=seed)

    kept = run.kept.numpy()
    indices = np.flatnonzero(kept).tolist()
    suffix = Path(manifest).suffix.lower()
    subset_path = out / f"subset{suffix if suffix in ('.csv', '.parquet', '.jsonl') else '.csv'}"
    rows = read_manifest(manifest)
    keep_ids = {pairs.ids[i] for i in indices}
    id_values = rows["id"].astype(str) if "id" in rows else rows.index.astype(str)
    chosen_rows = rows[id_values.isin(keep_ids).to_numpy()]
    if subset_path.suffix == ".parquet":
        chosen_rows.to_parquet(subset_path, index=False)
    elif subset_path.suffix == ".jsonl":
        chosen_rows.to_json(subset_path, orient="records", lines=True)
    else:
        chosen_rows.to_csv(subset_path, index=False)
    record = curated_subset_record(indices, [pairs.ids[i] for i in indices], len(pairs), source=Path(manifest).name)
    write_curated_subset(out, record)

    labels = label_columns if label_columns is not None else _label_columns(frame)
    generator = np.random.default_rng(seed)
    readable = np.flatnonzero(run.valid.numpy())
    random_subset = np.zeros(len(kept), dtype=bool)
    random_subset[generator.choice(readable, size=min(int(kept.sum()), len(readable)), replace=False)] = True
    features = concat_normalized(image_embeds, text_embeds)
    report = subset_report(run, features, frame, labels, random_subset)
    subsets = {"pool": run.valid.numpy(), "curated": kept, "random": random_subset}
    report["figures"] = {k: Path(v).name for k, v in plot_figures(features, subsets, out).items()}
    report["settings"] = {"super_batch_size": super_batch_size, "seed": seed, **asdict(config)}
    report["subset_manifest"] = subset_path.name
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def _label_columns(frame: Any) -> list[str]:
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
    "curate_archive",
    "curate_embeddings",
    "embed_pairs",
    "knn_distances",
    "near_duplicate_share",
    "plot_figures",
]
