"""`chexficient curate --embeddings`: curate a store of precomputed image and report embeddings without the model,
as the paper's online curator sees its data: a stream of super-batches. Nothing holds the pool's [N, 2D] matrix;
`curate_store` says what is held, the order and the warm-up. Each super-batch's decision is `curation_step`, the
one the model path (`chexficient.inference.curate`) takes too.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..curation.config import CurationConfig
from ..curation.curator import PrototypeCurator, warmup_indices
from ..curation.functions import SelectionResult, concat_normalized
from ..data.subsets import curated_subset_record, write_curated_subset
from .curate import CurateOptions, curation_step, one_intra_op_thread
from .curation_report import (
    PositionSample,
    Reservoir,
    counts_report,
    report_markdown,
    spread_report,
)
from .store import ParquetSink, column_matrix, shard_paths


STORE_SUBSET = "subset.parquet"  # curate_store: the kept rows with their cluster and flags
STORE_DECISIONS = "decisions.parquet"  # curate_store: every considered row with its cluster, flags and decision
READ_ROWS = 8192  # rows per record batch read from the store (a row group is read in pieces of this size)
WRITE_ROWS = 65536  # rows per row group of the written Parquet files
TRIM_EVERY = 16  # super-batches between two returns of the C heap's free pages to the system (`trim_heap`)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; a no-op elsewhere). A pass allocates
    and frees temporaries of varying sizes every super-batch (torch, numpy); glibc keeps the freed, fragmented
    pages, and the resident memory of a 200k-row pass grew by 1.2 GB without this (measured), by nothing with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ----- curating a store of embeddings, streamed ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoreBlock:
    """One Parquet row group of a store: the unit the stream reads (and `--shuffle` reorders)."""

    path: Path
    row_group: int
    start: int  # position of its first row in the store's order (shards by name, rows in file order)
    rows: int


def store_blocks(emb_dir: str | os.PathLike) -> tuple[list[StoreBlock], Any]:
    """The row groups of a store in its order, and its Arrow schema, from the Parquet footers only (no data read).
    A store without report embeddings is refused: curation needs [image ; report] pairs."""
    import pyarrow.parquet as pq

    emb_dir = Path(emb_dir)
    shards = shard_paths(emb_dir)
    if not shards:
        raise FileNotFoundError(
            f"--embeddings {emb_dir}: no embedding store there (no part-*.parquet shards); write one with "
            f"`chexficient embed INPUT --model DIR --out {emb_dir} --text-column COLUMN`."
        )
    blocks, schema, start = [], None, 0
    for path in shards:
        metadata = pq.ParquetFile(path).metadata
        shard_schema = metadata.schema.to_arrow_schema()
        missing = [name for name in ("id", "embedding") if name not in shard_schema.names]
        if missing:
            raise ValueError(f"--embeddings {emb_dir}: {path.name} has no {missing} column; not a CheXficient store.")
        if "text_embedding" not in shard_schema.names:
            raise ValueError(
                f"--embeddings {emb_dir}: this store has no report embeddings ({path.name} has no text_embedding "
                "column); re-run `chexficient embed INPUT --model DIR --out NEW_DIR --text-column COLUMN` (a new "
                "folder: a re-run into this one skips the ids it holds) and curate NEW_DIR."
            )
        if schema is None:
            schema = shard_schema
        elif any(shard_schema.field(n).type != schema.field(n).type for n in ("embedding", "text_embedding")):
            raise ValueError(f"--embeddings {emb_dir}: {path.name} holds embeddings of another width than its others.")
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if rows:
                blocks.append(StoreBlock(path, group, start, rows))
                start += rows
    return blocks, schema


def _read_block(block: StoreBlock, columns: Sequence[str], batch_rows: int = READ_ROWS) -> Iterator[Any]:
    """A row group as tables of at most `batch_rows` rows, with each row's store position (`position`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = block.start
    for batch in pq.ParquetFile(block.path).iter_batches(
        batch_size=batch_rows, row_groups=[block.row_group], columns=list(columns)
    ):
        table = pa.Table.from_batches([batch])
        yield table.append_column("position", pa.array(np.arange(start, start + len(table), dtype=np.int64)))
        start += len(table)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _read_ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, produced by a background thread up to `depth` ahead (Parquet decoding releases the GIL: the store is
    read while the previous super-batches are curated)."""
    done, stop = object(), threading.Event()
    buffer: queue.Queue = queue.Queue(maxsize=depth)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="chexficient-store-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def stream_super_batches(
    blocks: Sequence[StoreBlock],
    columns: Sequence[str],
    size: int,
    *,
    shuffle_seed: int | None = None,
    shuffle_rows: int = 32768,
) -> Iterator[tuple[Any, bool]]:
    """The store as super-batches of `size` rows (Arrow tables with a `position` column), each with True, then the
    last incomplete one (if any rows are left) with False.

    Without `shuffle_seed`, the store's order. With it, the row groups in a seeded random order and, within a window
    of `shuffle_rows` rows (what is held), the rows in a seeded random order: a whole pass needs no more memory."""
    import pyarrow as pa

    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    if rng is not None:
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    pending = None
    for table in _read_ahead(table for block in blocks for table in _read_block(block, columns)):
        pending = table if pending is None else pa.concat_tables([pending, table])
        if rng is not None:
            if pending.num_rows < shuffle_rows:
                continue
            pending = pending.take(rng.permutation(pending.num_rows))
        full = pending.num_rows - pending.num_rows % size
        for begin in range(0, full, size):
            yield pending.slice(begin, size), True
        pending = pending.slice(full).combine_chunks()
    if pending is None or pending.num_rows == 0:
        return
    if rng is not None:
        pending = pending.take(rng.permutation(pending.num_rows))
    full = pending.num_rows - pending.num_rows % size
    for begin in range(0, full, size):
        yield pending.slice(begin, size), True
    if full < pending.num_rows:
        yield pending.slice(full), False


def _pairs(table: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [n, D], report embeddings [n, D]) of a table of store rows, as writable float32 tensors."""
    return (
        torch.from_numpy(np.array(column_matrix(table.column("embedding")), dtype=np.float32)),
        torch.from_numpy(np.array(column_matrix(table.column("text_embedding")), dtype=np.float32)),
    )


def read_rows_at(blocks: Sequence[StoreBlock], positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and report embeddings of the rows at `positions` (store order), in the order of `positions`: one
    streamed pass that reads only the row groups holding one of them and keeps only those rows."""
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    images: torch.Tensor | None = None
    texts: torch.Tensor | None = None
    tables = (
        table
        for block in blocks
        if np.searchsorted(wanted, block.start) < np.searchsorted(wanted, block.start + block.rows)
        for table in _read_block(block, ("embedding", "text_embedding"))
    )
    for table in _read_ahead(tables):
        first = int(table.column("position")[0].as_py())
        low, high = np.searchsorted(wanted, [first, first + table.num_rows])
        if low == high:
            continue
        image, text = _pairs(table.take(wanted[low:high] - first))
        if images is None:
            images = image.new_zeros(len(positions), image.shape[1])
            texts = text.new_zeros(len(positions), text.shape[1])
        images[order[low:high]] = image
        texts[order[low:high]] = text
    if images is None or texts is None:
        raise ValueError("no rows at the given positions.")
    return images, texts


def _decision_table(table: Any, keep: torch.Tensor, selection: SelectionResult, valid: torch.Tensor, step: int):
    """The rows of one super-batch with their store position, step, prototype (nearest, -1 for a row whose image
    embedding is zero), distance to it, the curator's flags and the decision."""
    import pyarrow as pa

    valid_ = valid.numpy()
    columns = {name: table.column(name) for name in ("id", "path", "text") if name in table.column_names}
    columns.update(
        {
            "index": table.column("position"),
            "step": pa.array(np.full(table.num_rows, step, dtype=np.int32)),
            "prototype": pa.array(np.where(valid_, selection.cluster_ids.numpy(), -1).astype(np.int32)),
            "distance": pa.array(selection.distances.float().numpy()),
            "outlier": pa.array(selection.outlier.numpy()),
            "support": pa.array(selection.support.numpy()),
            "central": pa.array(selection.central_selected.numpy()),
            "kept": pa.array(keep.numpy()),
        }
    )
    return pa.table(columns)


def curate_store(
    emb_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: CurationConfig | None = None,
    options: CurateOptions | None = None,
) -> dict[str, Any]:
    """Curate a store of precomputed image and report embeddings without the model; returns the report.

    The order. The curator walks the store as a stream of super-batches of `options.super_batch_size` rows, as the
    paper's online curator sees its data: by default in the store's order (shards by name, rows in file order; a
    row's index is its position there), or with `options.shuffle` the row groups in a seeded random order and the
    rows within windows of `options.shuffle_rows` (use it when the store is sorted by source or patient). The last
    incomplete super-batch is not considered, as in the trainer. Each super-batch goes through `curation_step`, the
    trainer's decision and prototype update: on the same rows in the same order, `curate_embeddings(...,
    shuffle=False)` keeps the same ids.

    The warm-up. The prototypes start from k-means on the trainer's warm-up sample (`warmup_indices`: a seeded
    sample of `config.warmup_samples` rows of the whole store, not its first rows), read by a first streamed pass
    that keeps only those rows. Rows whose image embedding is all zeros (how `curate` stores an unreadable image)
    are never candidates.

    Outputs. `OUT/subset.parquet`: the kept rows (id, path, the report text when the store holds it: a training
    manifest) with their index, step, prototype (cluster), distance to it and flags (support, central, outlier);
    `OUT/decisions.parquet`: every considered row's decision (unless `options.decisions` is False);
    `OUT/curated_subset.json` (ids and indices); `OUT/report.json`, `OUT/report.md` and the figures. Both Parquet
    files are written as the stream goes.

    Memory. O(super-batch · D) for the curation, one Parquet read window (`READ_ROWS` rows, or `shuffle_rows`), the
    report's three samples of at most `options.knn_sample_rows` rows of 2D floats (pool and random subset drawn by
    position before the pass, the curated subset by reservoir sampling) and a few bytes per row (the curator's mask,
    the sampled positions); never the pool's [N, 2D] matrix.
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    config = config or CurationConfig()
    options = options or CurateOptions()
    blocks, schema = store_blocks(emb_dir)
    num_rows = sum(block.rows for block in blocks)
    size, seed = options.super_batch_size, options.seed
    steps = num_rows // size
    if steps == 0:
        raise ValueError(f"{num_rows} rows make no full super-batch of {size}; lower --super-batch-size.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dim = schema.field("embedding").type.list_size + schema.field("text_embedding").type.list_size
    columns = [name for name in ("id", "path", "text") if name in schema.names] + ["embedding", "text_embedding"]

    # the report's samples, drawn by position before the pass: the pool's, and the random subset's in draw order
    # (its first `kept` draws are a uniform random subset of the size of the curated one); the curated subset's by
    # reservoir sampling of the kept rows
    m = num_rows if options.knn_sample_rows is None else min(options.knn_sample_rows, num_rows)
    draws = np.random.default_rng([seed, 1])
    pool_sample = PositionSample(num_rows, m, dim, draws)
    random_sample = PositionSample(num_rows, m, dim, draws)
    curated_rows = Reservoir(options.knn_sample_rows, seed)

    curator = PrototypeCurator(config, num_samples=num_rows)
    num_clusters = config.num_prototypes
    cluster_pairs = np.zeros(num_clusters, dtype=np.int64)
    cluster_kept = np.zeros(num_clusters, dtype=np.int64)
    readable = considered = kept_count = step = 0
    kept_rows: list[Any] = []  # (id, index) of the kept rows, Arrow tables
    sinks = [ParquetSink(out / STORE_SUBSET, WRITE_ROWS)] + (
        [ParquetSink(out / STORE_DECISIONS, WRITE_ROWS)] if options.decisions else []
    )

    progress = tqdm(total=steps, desc="curating", unit="super-batch", disable=not options.progress)
    try:
        with one_intra_op_thread():
            warm = warmup_indices(num_rows, config.warmup_samples, seed).numpy()
            images, texts = read_rows_at(blocks, warm)
            ok = images.abs().sum(dim=1) > 0
            curator.initialize(images[ok], texts[ok], generator=torch.Generator().manual_seed(seed))
            del images, texts
            trim_heap()
            shuffle_seed = seed * 1_000_003 + 2 if options.shuffle else None
            batches = stream_super_batches(
                blocks, columns, size, shuffle_seed=shuffle_seed, shuffle_rows=options.shuffle_rows
            )
            for table, complete in batches:
                images, texts = _pairs(table)
                positions = table.column("position").to_numpy()
                valid = images.abs().sum(dim=1) > 0
                readable += int(valid.sum())
                if complete:
                    ids = torch.from_numpy(positions.copy())
                    keep, selection, kept = curation_step(curator, images, texts, ids, valid, seed, step)
                    clusters = selection.cluster_ids.numpy()[valid.numpy()]
                    cluster_pairs += np.bincount(clusters, minlength=num_clusters)
                    cluster_kept += np.bincount(selection.cluster_ids.numpy()[keep.numpy()], minlength=num_clusters)
                    considered += len(positions)  # as `curate_archive` counts: every row of a full super-batch
                    kept_count += int(keep.sum())
                    decided = _decision_table(table, keep, selection, valid, step)
                    chosen = decided.filter(decided.column("kept"))
                    sinks[0].append(chosen.drop_columns(["kept"]))
                    if options.decisions:
                        sinks[1].append(
                            decided.drop_columns([n for n in ("path", "text") if n in decided.column_names])
                        )
                    kept_rows.append(chosen.select(["id", "index"]))
                    curated_rows.add(kept.numpy())
                    step += 1
                    progress.update(1)
                    if step % TRIM_EVERY == 0:
                        trim_heap()
                usable = valid.numpy()
                pool_hit, random_hit = pool_sample.hits(positions, usable), random_sample.hits(positions, usable)
                if pool_hit.any() or random_hit.any():
                    features = concat_normalized(images, texts).numpy()
                    pool_sample.gather(positions, pool_hit, features)
                    random_sample.gather(positions, random_hit, features)
        for sink in sinks:
            sink.close()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    finally:
        progress.close()

    kept_table = pa.concat_tables(kept_rows) if kept_rows else pa.table({"id": [], "index": pa.array([], pa.int64())})
    positions = kept_table.column("index").to_numpy()
    order = np.argsort(positions, kind="stable")
    ids = kept_table.column("id").take(order).to_pylist()
    record = curated_subset_record(positions[order].tolist(), ids, num_rows, Path(emb_dir).name)
    write_curated_subset(out, record)
    del kept_table, kept_rows, ids, record

    samples = {
        "pool": torch.from_numpy(pool_sample.rows()),
        "curated": torch.from_numpy(curated_rows.sample(dim)),
        "random": torch.from_numpy(random_sample.rows()[: min(kept_count, readable)]),
    }
    report = counts_report(
        pairs=num_rows,
        readable=readable,
        considered=considered,
        kept=kept_count,
        steps=step,
        cluster_pairs=cluster_pairs,
        cluster_kept=cluster_kept,
    )
    report["source"] = "store"
    sizes = {"pool": readable, "curated": kept_count, "random": min(kept_count, readable)}
    report = spread_report(report, samples, out, set_sizes=sizes, max_rows=options.knn_sample_rows)
    report["settings"] = {
        "super_batch_size": size,
        "seed": seed,
        "order": "shuffled" if options.shuffle else "store",
        **({"shuffle_rows": options.shuffle_rows} if options.shuffle else {}),
        **asdict(config),
    }
    report["subset_manifest"] = STORE_SUBSET
    if options.decisions:
        report["decisions"] = STORE_DECISIONS
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


__all__ = ["StoreBlock", "curate_store", "read_rows_at", "store_blocks", "stream_super_batches"]
