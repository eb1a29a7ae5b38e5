"""`chexficient curate`: curate image-report pairs with the trainer's own curator, no training.

    chexficient curate pairs.csv --model DIR --out curated/ [--super-batch-size 480] [--seed 0]
    chexficient curate --embeddings EMB_DIR --out curated/ [--super-batch-size 480] [--seed 0] [--shuffle]
    accelerate launch train/pretrain.py --train_manifest curated/subset.csv ...

With a model (`curate_archive`), the manifest is read once; its pairs are embedded in batches (resumable, exactly
once, like `chexficient embed`: the image and report embeddings go to the store `OUT/embeddings/`), the prototypes
start from k-means on a warm-up sample, and the trainer's own curator (`curate_super_batch`, the same code
train/pretrain.py runs) walks shuffled super-batches of the chosen size. The kept pairs are written as
`OUT/subset.<suffix>` (the input's rows and columns) and `OUT/curated_subset.json`; `OUT/report.json`,
`OUT/report.md` and the figures come from `curation_report`.

With `--embeddings`, `chexficient.inference.curate_store` curates a store of precomputed image and report
embeddings without the model, streamed. Both paths take each super-batch's decision with the same function,
`curation_step`.

Before it writes anything, `curate_archive` checks the manifest: its encoding (`--encoding`, UTF-8 by default), its
columns, unique ids, and at least one full super-batch of pairs. An image that cannot be decoded, whatever its decoder
raised, is a pair marked unreadable (listed in `OUT/embeddings/errors.csv`) and the pass goes on. Every file is written
under a hidden temporary name (`.tmp-*`) and renamed when complete; the temporary files a killed run left are removed
when the next run starts.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..curation.config import CurationConfig
from ..curation.curator import PrototypeCurator, curate_super_batch, warmup_indices
from ..curation.functions import SelectionResult, concat_normalized
from ..curation.sampler import CuratingBatchSampler
from ..data.images import InputItem
from ..data.manifests import DEFAULT_ENCODING, check_unique_ids, read_manifest
from ..data.pairs import ImageReportCollator, ImageReportDataset, PairTable, load_pairs
from ..data.subsets import SUBSET_FILENAME, curated_subset_record
from ..runtime import resolve_device
from .curation_report import (
    KNN_SAMPLE_ROWS,
    CurationRun,
    label_columns,
    report_markdown,
    spread_report,
    subset_report,
    subset_samples,
)
from .embed import csv_cell, write_errors
from .store import ERRORS_FILE, ShardWriter, read_store, remove_temporaries, stored_ids, write_manifest


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
    knn_sample_rows: int | None = KNN_SAMPLE_ROWS  # the report's kNN statistic and figures: rows per set at most
    shuffle: bool = False  # --embeddings: seeded shuffle of the store's row groups and of a window of rows
    shuffle_rows: int = 32768  # --embeddings --shuffle: rows shuffled together (memory: this many rows)
    decisions: bool = True  # --embeddings: also write every considered row's decision (OUT/decisions.parquet)
    encoding: str = DEFAULT_ENCODING  # the manifest's text encoding (CSV, JSONL)


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch ops on one thread: a super-batch's tensors are small ([480, 2D]), where a second thread gains little,
    and a busy or shared machine makes the threads of each op wait for each other (measured 40x slower on 2 loaded
    cores). The store reader decodes on the other core meanwhile."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.lru_cache(maxsize=1)
def curation_step(
    curator: PrototypeCurator,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    sample_ids: torch.Tensor,
    valid: torch.Tensor,
    seed: int,
    step: int,
) -> tuple[torch.Tensor, SelectionResult, torch.Tensor]:
    """One super-batch of the trainer's curation epoch on fixed embeddings: the decision `curate_super_batch` takes
    (train/pretrain.py's own) and the prototype EMA towards the kept pairs, which the trainer applies after its
    optimizer step. Returns (keep [n], the selection, the kept pairs' normalised features [m, 2D]). Every path of
    `chexficient curate` takes its decisions here."""
    keep, selection = curate_super_batch(curator, image_embeds, text_embeds, sample_ids, valid, seed, step)
    kept = concat_normalized(image_embeds[keep], text_embeds[keep])
    curator.update_prototypes(kept)
    return keep, selection, kept


def curate_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    valid: torch.Tensor,
    config: CurationConfig,
    *,
    super_batch_size: int = 480,
    seed: int = 0,
    shuffle: bool = True,
) -> CurationRun:
    """The trainer's curation epoch on fixed embeddings [N, D] of N pairs: k-means prototypes from the trainer's
    warm-up sample, then `curation_step` on each super-batch of the trainer's order (`CuratingBatchSampler`, one
    process), or of the rows' own order when `shuffle` is False (what `curate_store` walks by default)."""
    num_pairs = image_embeds.shape[0]
    curator = PrototypeCurator(config, num_samples=num_pairs)
    sampler = CuratingBatchSampler(num_samples=num_pairs, batch_size=super_batch_size, curation_epochs=1, seed=seed)
    steps = sampler.steps_per_epoch(0)
    if steps == 0:
        raise ValueError(
            f"{num_pairs} pairs make no full super-batch of {super_batch_size}; lower --super-batch-size."
        )
    order: Iterable[Sequence[int]] = sampler
    if not shuffle:
        order = (range(step * super_batch_size, (step + 1) * super_batch_size) for step in range(steps))
    considered = torch.zeros(num_pairs, dtype=torch.bool)
    cluster_ids = torch.full((num_pairs,), -1, dtype=torch.long)
    log = []
    with one_intra_op_thread():
        warm = warmup_indices(num_pairs, config.warmup_samples, seed)
        warm = warm[valid[warm]]
        curator.initialize(image_embeds[warm], text_embeds[warm], generator=torch.Generator().manual_seed(seed))
        for step, batch in enumerate(order):
            ids = torch.as_tensor(list(batch), dtype=torch.long)
            images, texts, ok = image_embeds[ids], text_embeds[ids], valid[ids]
            keep, selection, _ = curation_step(curator, images, texts, ids, ok, seed, step)
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
    re-run embeds only the pairs not stored yet. Unreadable images (whatever their decoder raised) are embedded as
    zeros, marked invalid, and listed in `out/errors.csv` (id, path, a message naming the file), with those of the
    runs before."""
    from tqdm.auto import tqdm

    writer = ShardWriter(out, shard_rows=chunk_rows)
    done = stored_ids(out)
    todo = [i for i, sample_id in enumerate(pairs.ids) if sample_id not in done]
    failures = earlier_errors(out / ERRORS_FILE, done)
    pair_of = {sample_id: i for i, sample_id in enumerate(pairs.ids)}
    size = image_processor.crop_size["height"], image_processor.crop_size["width"]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageReportDataset(pairs, image_processor), todo),
        batch_size=batch_size,
        collate_fn=ImageReportCollator(tokenizer, size, max_text_length),
        num_workers=num_workers,
    )
    device = next(model.parameters()).device
    try:
        for batch in tqdm(loader, desc="embedding pairs", unit="batch", disable=not progress):
            keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
            inputs = {k: batch[k].to(device) for k in keys if k in batch}
            out_ = model(**inputs)
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
            failures += [
                (InputItem(sample_id, str(pairs.images[pair_of[sample_id]])), message)
                for sample_id, message in batch["skipped"]
            ]
    except BaseException:  # the pass stops (not for one image: those are zero rows): keep what it embedded
        writer.flush()
        write_errors(out / ERRORS_FILE, failures)
        raise
    writer.flush()
    write_errors(out / ERRORS_FILE, failures)
    write_manifest(out)
    stored = read_store(out, ("id", "embedding", "text_embedding"))
    position = {sample_id: row for row, sample_id in enumerate(stored["id"])}
    order = [position[sample_id] for sample_id in pairs.ids]
    images = torch.from_numpy(stored["embedding"][order])
    return images, torch.from_numpy(stored["text_embedding"][order]), images.abs().sum(dim=1) > 0


def earlier_errors(path: Path, stored: set[str]) -> list[tuple[InputItem, str]]:
    """The rows of a store's errors.csv whose pairs are stored (as unreadable): a re-run does not embed them again,
    so their reports stand."""
    if not path.is_file() or not stored:
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = {csv_cell(sample_id) for sample_id in stored}  # ids are written spreadsheet-escaped
    return [
        (InputItem(row["id"], row["path"] or ""), row["message"] or "")
        for row in rows
        if row.get("id") in kept  # a row cut short by a kill has no id, or its path and message are None
    ]


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(temporary)` to a hidden temporary name beside `path`, then an atomic rename: a run killed at any moment
    leaves `path` whole or untouched (and a `.tmp-*` file that the next run removes)."""
    temporary = path.with_name(f".tmp-{path.name}")
    write(temporary)
    os.replace(temporary, path)
    return path


def check_pairs(pairs: PairTable, manifest: str | os.PathLike, table: Any, options: CurateOptions) -> None:
    """What would stop a curation pass after it had written: duplicate ids, a missing label column, fewer pairs than
    one super-batch. A ValueError naming the manifest."""
    suffix = Path(manifest).suffix.lower()
    if suffix == ".csv":  # the rows a spreadsheet shows (the header is row 1)
        rows, unit = [row + 2 for row in pairs.rows], "rows"
    elif suffix == ".jsonl":
        rows, unit = [row + 1 for row in pairs.rows], "lines"
    else:
        rows, unit = list(pairs.rows), "row indices"
    check_unique_ids(pairs.ids, manifest, rows, unit)
    missing = [c for c in options.label_columns or [] if c not in table.columns]
    if missing:
        raise ValueError(f"{manifest}: no label column(s) {missing}; its columns are {list(table.columns)}.")
    if len(pairs) < options.super_batch_size:
        raise ValueError(
            f"{manifest}: {len(pairs)} pairs make no full super-batch of {options.super_batch_size}; lower "
            "--super-batch-size."
        )


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
    frame = read_manifest(manifest, options.encoding)
    pairs = load_pairs(frame, image_root=options.image_root, where=manifest)
    table = frame.iloc[pairs.rows].reset_index(drop=True)  # the pairs' rows, in their order: one table from here on
    check_pairs(pairs, manifest, table, options)  # before anything is written
    model = CheXficientModel.from_pretrained(model_path).to(resolve_device(options.device)).eval()
    processor = CheXficientProcessor.from_pretrained(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / EMBEDDINGS_DIR):  # what a killed run left: no other run writes here
        remove_temporaries(folder)
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
    if not bool(valid.any()):
        raise ValueError(
            f"{manifest}: none of its {len(pairs)} images could be decoded; the reasons are in "
            f"{out / EMBEDDINGS_DIR / ERRORS_FILE}."
        )
    run = curate_embeddings(
        image_embeds, text_embeds, valid, config, super_batch_size=options.super_batch_size, seed=options.seed
    )
    kept = run.kept.numpy()
    indices = np.flatnonzero(kept).tolist()
    subset_path = write_subset_rows(table.iloc[indices], out, Path(manifest).suffix)
    record = curated_subset_record(indices, [pairs.ids[i] for i in indices], len(pairs), source=Path(manifest).name)
    write_atomically(out / SUBSET_FILENAME, lambda path: path.write_text(json.dumps(record)))

    readable = np.flatnonzero(run.valid.numpy())
    random_subset = np.zeros(len(kept), dtype=bool)
    generator = np.random.default_rng(options.seed)
    random_subset[generator.choice(readable, size=min(int(kept.sum()), len(readable)), replace=False)] = True
    labels = options.label_columns if options.label_columns is not None else label_columns(table)
    report = subset_report(run, table, labels, random_subset)
    subsets = {"pool": run.valid.numpy(), "curated": kept, "random": random_subset}
    samples = subset_samples(
        concat_normalized(image_embeds, text_embeds), subsets, options.knn_sample_rows, options.seed
    )
    sizes = {name: int(chosen.sum()) for name, chosen in subsets.items()}
    report = spread_report(report, samples, out, set_sizes=sizes, max_rows=options.knn_sample_rows)
    report["settings"] = {"super_batch_size": options.super_batch_size, "seed": options.seed, **asdict(config)}
    report["subset_manifest"] = subset_path.name
    report["unreadable"] = int(len(pairs) - run.valid.sum())
    if report["unreadable"]:
        report["errors_file"] = f"{EMBEDDINGS_DIR}/{ERRORS_FILE}"
    write_atomically(out / "report.json", lambda path: path.write_text(json.dumps(report, indent=2)))
    write_atomically(out / "report.md", lambda path: path.write_text(report_markdown(report)))
    return report


def write_subset_rows(rows: Any, out: Path, suffix: str) -> Path:
    """The kept rows of the manifest, every column, as `out/subset.<suffix>` (csv unless the input was parquet or
    jsonl)."""
    suffix = suffix.lower() if suffix.lower() in SUBSET_SUFFIXES else ".csv"

    def write(path: Path) -> None:
        if suffix == ".parquet":
            rows.to_parquet(path, index=False)
        elif suffix == ".jsonl":
            rows.to_json(path, orient="records", lines=True)
        else:
            rows.to_csv(path, index=False)

    return write_atomically(out / f"subset{suffix}", write)


__all__ = [
    "CurateOptions",
    "CurationRun",
    "curate_archive",
    "curate_embeddings",
    "curation_step",
    "check_pairs",
    "embed_pairs",
    "one_intra_op_thread",
    "write_atomically",
    "write_subset_rows",
]
