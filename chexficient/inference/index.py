"""`chexficient index`: a FAISS index over an embedding store, built by streaming the store and loaded memory-mapped.

    INDEX/
      index.faiss     the FAISS index (inner product: cosine on the store's L2-normalised embeddings)
      ids.parquet     row number -> id, path (one row per indexed vector, in index order)
      vectors.f32     IVF-PQ with re-ranking only: the float32 vectors [rows, dim], read memory-mapped
      index.json      the kind and every parameter, why it was chosen, the self-check recall, timings, the store

Kinds: `flat` (exact), `ivf_flat`, `ivf_pq` (optionally OPQ-rotated; its top `k * rerank` candidates re-scored
exactly from `vectors.f32`) and `hnsw` (HNSW graph over flat vectors). `auto` picks:

  * flat      when the vectors take at most `EXACT_MAX_BYTES` (64 MB, ~31k rows of 512-d) and fit the budget: an
              exact query reads every vector (measured on 2 busy cores: 9 ms at 51 MB, 24 ms at 102 MB, 40 ms at
              205 MB) and needs no training;
  * ivf_pq    otherwise: nlist = 4 sqrt(N), 4-bit PQ codes of the largest m (a divisor of dim, at most dim/4) that
              fits the budget (at most dim/2: dim/4 bytes), scored by FAISS's fast-scan kernels, and the top k x 8 re-scored exactly from
              `vectors.f32` (memory-mapped, not resident). At 1.2M x 512 on 2 cores it answered 1,000 batched
              queries at recall@10 0.96 about 37x faster than IVF-Flat at the same nprobe (IVF-Flat reads ~N/nlist
              full vectors per list probed), so `auto` takes it over IVF-Flat even when IVF-Flat fits the budget;
              `--kind ivf_flat` builds that one.
HNSW inserts every vector into a graph, slowly on few cores (200k x 512 took 83 s on 2 cores, IVF-PQ 50 s, and it
grows faster than linearly), so `auto` never picks it; ask for it.

IVF kinds are trained on a seeded random sample of the store (`train_sample` rows, read by streaming) and filled
batch by batch, so nothing but the index holds the vectors. After the fill the search breadth (IVF nprobe, HNSW
efSearch) is tuned: the smallest value whose leave-one-out recall@10 against exact search (computed during the
fill, on `tune_queries` stored rows) reaches `target_recall`; the table of measured recalls goes to `index.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .faiss_index import (
    IDS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    RECORD_FILE,
    VECTORS_FILE,
    LoadedIndex,
    map_vectors,
)
from .index_plan import EXACT_MAX_BYTES, IVF_KINDS, IndexOptions, default_threads, parse_bytes, plan_index
from .store import describe_shards, iter_batches, read_manifest, shard_paths


logger = logging.getLogger(__name__)

KMEANS_ITERATIONS = 10  # IVF coarse k-means; more moves recall little and costs build time linearly
MAX_PROBE_SHARE = 1 / 8  # tuning stops at nprobe = nlist / 8: past that, an IVF scans too much to be worth it
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512)


# ----- building -------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    """The training sample and the self-check queries, drawn in one streaming pass."""

    train: np.ndarray
    queries: np.ndarray
    query_ids: list[str] = field(default_factory=list)


def _sample_store(
    store: Path, column: str, rows: int, dim: int, train_rows: int, query_rows: int, seed: int, batch_rows: int
) -> _Sample:
    rng = np.random.default_rng(seed)
    if not train_rows and not query_rows:
        return _Sample(np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32))
    train_at = np.sort(rng.choice(rows, size=train_rows, replace=False)) if train_rows else np.zeros(0, np.int64)
    query_at = np.sort(rng.choice(rows, size=query_rows, replace=False)) if query_rows else np.zeros(0, np.int64)
    train = np.empty((len(train_at), dim), np.float32)
    queries = np.empty((len(query_at), dim), np.float32)
    query_ids: list[str] = []
    begin = filled = taken = 0
    for batch in iter_batches(store, ("id", column), batch_rows):
        matrix = batch[column]
        end = begin + len(matrix)
        picked = train_at[(train_at >= begin) & (train_at < end)] - begin
        train[filled : filled + len(picked)] = matrix[picked]
        filled += len(picked)
        asked = query_at[(query_at >= begin) & (query_at < end)] - begin
        queries[taken : taken + len(asked)] = matrix[asked]
        query_ids += [batch["id"][i] for i in asked]
        taken += len(asked)
        begin = end
    return _Sample(train[:filled], queries[:taken], query_ids)


@dataclass
class _ExactTopK:
    """Exact top-(k+1) neighbours of fixed queries, merged batch by batch during the fill (BLAS matmuls)."""

    queries: np.ndarray
    k: int
    scores: np.ndarray = field(init=False)
    rows: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scores = np.full((len(self.queries), self.k), -np.inf, np.float32)
        self.rows = np.full((len(self.queries), self.k), -1, np.int64)

    def add(self, matrix: np.ndarray, first_row: int) -> None:
        if not len(self.queries) or not len(matrix):
            return
        scores = self.queries @ matrix.T
        keep = min(self.k, scores.shape[1])
        best = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        scores = np.concatenate([self.scores, np.take_along_axis(scores, best, axis=1)], axis=1)
        rows = np.concatenate([self.rows, best + first_row], axis=1)
        best = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        self.scores = np.take_along_axis(scores, best, axis=1)
        self.rows = np.take_along_axis(rows, best, axis=1)


def leave_one_out_recall(found: np.ndarray, truth: np.ndarray, self_rows: np.ndarray, k: int) -> float:
    """Mean recall@k of `found` against `truth` (rows, best first), each query's own row left out of both."""
    hits = []
    for got, want, own in zip(found, truth, self_rows):
        got = [row for row in got if row >= 0 and row != own][:k]
        want = [row for row in want if row >= 0 and row != own][:k]
        if want:
            hits.append(len(set(got) & set(want)) / len(want))
    return float(np.mean(hits)) if hits else 1.0


def _tune(
    loaded: LoadedIndex, exact: _ExactTopK, self_rows: np.ndarray, target: float, fixed: int | None, k: int = 10
) -> dict[str, Any]:
    """The smallest search breadth reaching `target` recall@k (or the given one, measured); the table of recalls."""
    kind = loaded.kind
    if kind in IVF_KINDS:
        nlist = int(loaded.record["nlist"])
        cap = max(1, int(nlist * MAX_PROBE_SHARE))
        steps = [fixed] if fixed else sorted({min(2**p, cap) for p in range(0, int(math.log2(cap)) + 2)})
        name = "nprobe"
    else:
        steps = [fixed] if fixed else list(EF_SEARCH_STEPS)
        name = "ef_search"
    table: dict[str, float] = {}
    chosen = steps[-1]
    for step in steps:
        loaded.set_breadth(**{name: step})
        _, rows = loaded.search(exact.queries, k + 1)
        table[str(step)] = recall = leave_one_out_recall(rows, _ordered(exact), self_rows, k)
        chosen = step
        if recall >= target:
            break
    loaded.set_breadth(**{name: chosen})
    reached = table[str(chosen)] >= target
    if not reached:
        logger.warning(
            "index: recall@%d %.3f at %s=%d is below the target %.2f; the data may have little cluster structure "
            "(try --kind flat, or a larger --%s at query time).",
            k,
            table[str(chosen)],
            name,
            chosen,
            target,
            name.replace("_", "-"),
        )
    return {
        "parameter": name,
        "value": chosen,
        "recall_at_10": table[str(chosen)],
        "target": target,
        "reached": reached,
        "table": table,
        "queries": len(exact.queries),
        "method": "leave-one-out recall@10 of stored rows against exact inner-product search",
    }


def _ordered(exact: _ExactTopK) -> np.ndarray:
    order = np.argsort(-exact.scores, axis=1, kind="stable")
    return np.take_along_axis(exact.rows, order, axis=1)


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside `out`; `out` itself must be absent, empty or an earlier index."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / RECORD_FILE).is_file())):
        raise ValueError(f"--out {out}: exists and is not an index folder; give a new folder.")
    temporary = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    return temporary


def _publish(temporary: Path, out: Path) -> None:
    """Replace `out` by the finished folder (a reader of the old index keeps its open, mapped files)."""
    if out.exists():
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, out)


def build_index(store: str | os.PathLike, out: str | os.PathLike, options: IndexOptions | None = None) -> dict:
    """Build an index of the store's `options.column` into the folder `out`; returns its record (`index.json`)."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    options = options or IndexOptions()
    started = time.perf_counter()
    store, out = Path(store), Path(out)
    if not shard_paths(store):
        raise ValueError(f"{store}: not an embedding store (no part-*.parquet shards); run `chexficient embed` first.")
    shards = describe_shards(store)
    if not options.column.endswith("embedding") or options.column not in shards["columns"]:
        raise ValueError(
            f"--column {options.column}: give an embedding column of the store (its columns: {shards['columns']})."
        )
    rows = shards["rows"]
    dim = pq.ParquetFile(shard_paths(store)[0]).schema_arrow.field(options.column).type.list_size
    plan = plan_index(rows, dim, options)
    threads = options.threads or default_threads()
    faiss.omp_set_num_threads(threads)
    seconds: dict[str, float] = {}

    tuned = plan.kind != "flat"
    query_rows = min(rows, options.tune_queries) if tuned else 0
    clock = time.perf_counter()
    sample = _sample_store(
        store, options.column, rows, dim, plan.train_sample, query_rows, options.seed, options.batch_rows
    )
    seconds["sample"] = time.perf_counter() - clock

    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = options.ef_construction
    if plan.kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = options.seed
        clock = time.perf_counter()
        index.train(sample.train)
        seconds["train"] = time.perf_counter() - clock
    sample.train = sample.train[:0]  # free it before the fill

    temporary = _prepare_out(out)
    try:
        exact = _ExactTopK(sample.queries, 11)
        wanted = set(sample.query_ids)
        self_rows = {}
        vectors_file = (temporary / VECTORS_FILE).open("wb") if plan.rerank else None
        schema = pa.schema([("id", pa.string()), ("path", pa.string())])
        clock = time.perf_counter()
        begin = 0
        with (
            pq.ParquetWriter(temporary / IDS_FILE, schema) as ids_writer,
            tqdm(total=rows, unit="row", desc=f"index ({plan.kind})", disable=not options.progress) as bar,
        ):
            for batch in iter_batches(store, ("id", "path", options.column), options.batch_rows):
                matrix = np.ascontiguousarray(batch[options.column], dtype=np.float32)
                index.add(matrix)
                ids_writer.write_table(pa.table({"id": batch["id"], "path": batch["path"]}, schema=schema))
                if vectors_file is not None:
                    vectors_file.write(matrix.tobytes())
                exact.add(matrix, begin)
                if wanted:
                    self_rows.update((name, begin + i) for i, name in enumerate(batch["id"]) if name in wanted)
                begin += len(matrix)
                bar.update(len(matrix))
        if vectors_file is not None:
            vectors_file.close()
        seconds["fill"] = time.perf_counter() - clock
        if begin != rows or index.ntotal != rows:
            raise RuntimeError(f"{store}: read {begin} rows, expected {rows}; did the store change during the build?")

        record: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "kind": plan.kind,
            "factory": plan.factory,
            "metric": "inner_product",
            "rows": rows,
            "dim": dim,
            "column": options.column,
            "nlist": plan.nlist,
            "nprobe": None,
            "m": plan.m,
            "nbits": plan.nbits,
            "opq": plan.opq,
            "rerank": plan.rerank,
            "hnsw_m": plan.hnsw_m,
            "ef_construction": options.ef_construction if plan.kind == "hnsw" else None,
            "ef_search": None,
        }
        self_check = None
        if tuned:
            clock = time.perf_counter()
            vectors = map_vectors(temporary, rows, dim) if plan.rerank else None
            loaded = LoadedIndex(index, record, None, vectors)
            own = np.array([self_rows.get(name, -1) for name in sample.query_ids], dtype=np.int64)
            fixed = options.nprobe if plan.kind in IVF_KINDS else options.ef_search
            self_check = _tune(loaded, exact, own, options.target_recall, fixed)
            record["nprobe" if plan.kind in IVF_KINDS else "ef_search"] = self_check["value"]
            seconds["tune"] = time.perf_counter() - clock
            del loaded, vectors
        clock = time.perf_counter()
        faiss.write_index(index, str(temporary / INDEX_FILE))
        seconds["write"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        record.update(
            choice={
                "requested": options.kind,
                "memory_budget_bytes": parse_bytes(options.memory_budget),
                "estimated_bytes": plan.estimated_bytes,
                "exact_max_bytes": EXACT_MAX_BYTES,
                "reason": plan.reason,
            },
            training={
                "sample_rows": plan.train_sample if plan.kind in IVF_KINDS else 0,
                "seed": options.seed,
                "kmeans_iterations": KMEANS_ITERATIONS if plan.kind in IVF_KINDS else None,
            },
            self_check=self_check,
            seconds={name: round(value, 3) for name, value in seconds.items()},
            files={"index": INDEX_FILE, "ids": IDS_FILE, "vectors": VECTORS_FILE if plan.rerank else None},
            store={"path": str(store.resolve()), "manifest": read_manifest(store)},
            faiss_version=faiss.__version__,
            threads=threads,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (temporary / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        _publish(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return record


__all__ = ["build_index", "leave_one_out_recall"]
