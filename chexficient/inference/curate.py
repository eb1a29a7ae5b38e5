"""`chexficient curate`: curate an existing archive of image-report pairs with a trained CheXficient, no training.

    chexficient curate pairs.csv --model DIR --out curated/ [--super-batch-size 480] [--seed 0]
    accelerate launch train/pretrain.py --train_manifest curated/subset.csv ...

The manifest is read once; its pairs are embedded in batches (resumable, exactly once, like `chexficient embed`: the
image and report embeddings go to the store `OUT/embeddings/`), the prototypes start from k-means on a warm-up sample,
and the trainer's own curator (`curate_super_batch`, the same code train/pretrain.py runs) walks shuffled
super-batches of the chosen size. The kept pairs are written as `OUT/subset.<suffix>` (the input's rows and columns)
and `OUT/curated_subset.json`; `OUT/report.json`, `OUT/report.md` and the figures come from `curation_report`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..curation.config import CurationConfig
from ..curation.curator import PrototypeCurator, curate_super_batch, warmup_indices
from ..curation.functions import concat_normalized
from ..curation.sampler import CuratingBatchSampler
from ..data.manifests import read_manifest
from ..data.pairs import ImageReportCollator, ImageReportDataset, PairTable, load_pairs
from ..data.subsets import curated_subset_record, write_curated_subset
from ..runtime import resolve_device
from .curation_report import CurationRun, label_columns, plot_figures, report_markdown, subset_report
from .store import ShardWriter, read_store, stored_ids, write_manifest


EMBEDDINGS_DIR = "embeddings"  # the pairs' store: image and report embeddings, Parquet shards
SUBSET_SUFFIXES = (".csv", ".parquet", ".jsonl")


@dataclass
class CurateOptions:
    """How `chexficient curate` walks an archive; the curator's own settings are a `CurationConfig`."""

    super_batch_size: int = 480  # pairs per curation decision
    seed: int = 0  # order of the super-batches, the warm-up sample and FPS starts
    image_root: str | os.PathLike | None = None  # folder the manifest's image paths start from (default: its own)
    label_columns: list[str] | None = None  # label columns the report gives shares for (default: 0/1 columns)
    batch_size: int = 64  # pairs per embedding forward
    num_workers: int = 0  # DataLoader processes decoding images
    device: str = "auto"
    chunk_rows: int = 1024  # embeddings per chunk file while embedding (what a kill can lose at most)
    progress: bool = True


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
            f"{num_pairs} pairs make no full super-batch of {super_batch_size}; lower --super-batch-size."
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
    """(image_embeds [N, D], text_embeds [N, D], valid [N]) of every pair, stored with its report in the store `out`
    (the `chexficient embed` store: complete shards while it runs, each id once whatever the moment of a kill); a
    re-run embeds only the pairs not stored yet. Unreadable images are embedded as zeros and marked invalid."""
    from tqdm.auto import tqdm

    writer = ShardWriter(out, shard_rows=chunk_rows)
    done = stored_ids(out)
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
        images = out_.image_embeds.float().cpu()
        images[~batch["valid"]] = 0.0  # an unreadable image: a zero row, marked invalid on reading
        indices = batch["sample_index"].tolist()
        writer.append(
            [pairs.ids[i] for i in indices],
            [str(pairs.images[i]) for i in indices],
            images.numpy(),
            texts=[pairs.texts[i] for i in indices],
            text_embeddings=out_.text_embeds.float().cpu().numpy(),
        )
    writer.flush()
    write_manifest(out)
    stored = read_store(out, ("id", "embedding", "text_embedding"))
    position = {sample_id: row for row, sample_id in enumerate(stored["id"])}
    order = [position[sample_id] for sample_id in pairs.ids]
    images = torch.from_numpy(stored["embedding"][order])
    return images, torch.from_numpy(stored["text_embedding"][order]), images.abs().sum(dim=1) > 0


# ----- the command -------------------------------------------------------------------------------------------------


def curate_archive(
    manifest: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: CurationConfig | None = None,
    options: CurateOptions | None = None,
) -> dict[str, Any]:
    """Curate `manifest` with the model in `model_dir`; writes the subset, its record, the report and the figures
    under `out_dir` and returns the report."""
    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    config = config or CurationConfig()
    options = options or CurateOptions()
    model_path = Path(model_dir)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no saved CheXficient folder (config.json) there.")
    frame = read_manifest(manifest)
    pairs = load_pairs(frame, image_root=options.image_root, where=manifest)
    table = frame.iloc[pairs.rows].reset_index(drop=True)  # the pairs' rows, in their order: one table from here on
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = CheXficientModel.from_pretrained(model_path).to(resolve_device(options.device)).eval()
    processor = CheXficientProcessor.from_pretrained(model_path)
    image_embeds, text_embeds, valid = embed_pairs(
        model,
        processor.tokenizer,
        processor.image_processor,
        pairs,
        out / EMBEDDINGS_DIR,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        chunk_rows=options.chunk_rows,
        progress=options.progress,
    )
    run = curate_embeddings(
        image_embeds, text_embeds, valid, config, super_batch_size=options.super_batch_size, seed=options.seed
    )
    kept = run.kept.numpy()
    indices = np.flatnonzero(kept).tolist()
    subset_path = write_subset_rows(table.iloc[indices], out, Path(manifest).suffix)
    record = curated_subset_record(indices, [pairs.ids[i] for i in indices], len(pairs), source=Path(manifest).name)
    write_curated_subset(out, record)

    readable = np.flatnonzero(run.valid.numpy())
    random_subset = np.zeros(len(kept), dtype=bool)
    generator = np.random.default_rng(options.seed)
    random_subset[generator.choice(readable, size=min(int(kept.sum()), len(readable)), replace=False)] = True
    features = concat_normalized(image_embeds, text_embeds)
    labels = options.label_columns if options.label_columns is not None else label_columns(table)
    report = subset_report(run, features, table, labels, random_subset)
    subsets = {"pool": run.valid.numpy(), "curated": kept, "random": random_subset}
    report["figures"] = {k: Path(v).name for k, v in plot_figures(features, subsets, out).items()}
    report["settings"] = {"super_batch_size": options.super_batch_size, "seed": options.seed, **asdict(config)}
    report["subset_manifest"] = subset_path.name
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def write_subset_rows(rows: Any, out: Path, suffix: str) -> Path:
    """The kept rows of the manifest, every column, as `out/subset.<suffix>` (csv unless the input was parquet or
    jsonl)."""
    suffix = suffix.lower() if suffix.lower() in SUBSET_SUFFIXES else ".csv"
    path = out / f"subset{suffix}"
    if suffix == ".parquet":
        rows.to_parquet(path, index=False)
    elif suffix == ".jsonl":
        rows.to_json(path, orient="records", lines=True)
    else:
        rows.to_csv(path, index=False)
    return path


__all__ = ["CurateOptions", "CurationRun", "curate_archive", "curate_embeddings", "embed_pairs"]
