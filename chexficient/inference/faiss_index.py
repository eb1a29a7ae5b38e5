"""An index folder on disk (`index.faiss`, `ids.parquet`, `index.json`, `vectors.f32`): reading it, memory-mapped
where FAISS allows it, and searching it; shared by `chexficient index` (its self-check) and `SearchEngine`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .index_plan import IVF_KINDS, default_threads
from .store import read_format_record


logger = logging.getLogger(__name__)

INDEX_FORMAT = "chexficient-index/1"
INDEX_FILE = "index.faiss"
RECORD_FILE = "index.json"
IDS_FILE = "ids.parquet"
VECTORS_FILE = "vectors.f32"
RERANK_CHUNK_BYTES = 256 * 2**20  # re-ranking gathers at most this much of candidate vectors at a time


# ----- searching an index (shared by the build's self-check and `SearchEngine`) ---------------------------------


@dataclass
class LoadedIndex:
    """A FAISS index with its record, its row -> (id, path) table, and, for re-ranked IVF-PQ, its vectors."""

    index: Any
    record: dict[str, Any]
    ids: Any  # pyarrow.Table with `id` and `path`, one contiguous chunk
    vectors: np.ndarray | None = None  # np.memmap [rows, dim] for re-ranking
    load_mode: str = "read"  # "mmap" (whole file mapped), "mmap_invlists" (IVF lists mapped) or "read"

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def rerank(self) -> int:
        return int(self.record.get("rerank") or 0) if self.vectors is not None else 0

    def set_breadth(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set IVF's nprobe / HNSW's efSearch (None keeps the recorded, tuned value)."""
        set_breadth(self.index, self.kind, nprobe, ef_search)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], rows [Q, k]) best first; rows are -1 (scores -inf) where fewer than k were found."""
        return search_index(self.index, queries, k, self.vectors, self.rerank)

    def lookup(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        """The ids and paths of index rows (non-negative)."""
        import pyarrow as pa

        taken = self.ids.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return taken.column("id").to_pylist(), taken.column("path").to_pylist()


def set_breadth(index: Any, kind: str, nprobe: int | None = None, ef_search: int | None = None) -> None:
    import faiss

    if kind in IVF_KINDS and nprobe is not None:
        ivf = faiss.extract_index_ivf(index)
        if not 1 <= nprobe:
            raise ValueError(f"--nprobe must be >= 1, got {nprobe}.")
        ivf.nprobe = min(int(nprobe), int(ivf.nlist))
    if kind == "hnsw" and ef_search is not None:
        if ef_search < 1:
            raise ValueError(f"--ef-search must be >= 1, got {ef_search}.")
        faiss.downcast_index(index).hnsw.efSearch = int(ef_search)


def search_index(
    index: Any, queries: np.ndarray, k: int, vectors: np.ndarray | None = None, rerank: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product; with `vectors` and `rerank`, the top `k * rerank` candidates re-scored exactly."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), int(index.ntotal)))
    if vectors is None or rerank <= 1:
        scores, rows = index.search(queries, k)
        scores[rows < 0] = -np.inf
        return scores, rows
    wanted = min(k * rerank, int(index.ntotal))
    chunk = max(1, RERANK_CHUNK_BYTES // (wanted * index.d * 4))  # queries whose candidates are gathered at once
    parts = [_rerank(index, queries[i : i + chunk], k, wanted, vectors) for i in range(0, len(queries), chunk)]
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _rerank(
    index: Any, queries: np.ndarray, k: int, wanted: int, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    _, candidates = index.search(queries, wanted)
    found = candidates >= 0
    gathered = np.asarray(vectors[np.where(found, candidates, 0)])  # [Q, wanted, D] read from the memory map
    exact = np.einsum("qcd,qd->qc", gathered, queries)
    exact[~found] = -np.inf
    best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(candidates, best, axis=1)
    scores = np.take_along_axis(exact, best, axis=1).astype(np.float32)
    rows[~np.isfinite(scores)] = -1
    return scores, rows


# ----- loading --------------------------------------------------------------------------------------------------


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """An index folder's `index.json`, checked."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: not a CheXficient index (no {RECORD_FILE}); build one with `chexficient index`.")
    return read_format_record(path, INDEX_FORMAT, "index record")


def map_vectors(folder: Path, rows: int, dim: int) -> np.ndarray:
    path = folder / VECTORS_FILE
    expected = rows * dim * 4
    if not path.is_file() or path.stat().st_size != expected:
        raise ValueError(f"{path}: missing or not {rows} x {dim} float32 ({expected} bytes).")
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))


def read_faiss_index(path: str | os.PathLike, kind: str, mmap: bool = True) -> tuple[Any, str]:
    """(index, how it was loaded). With `mmap`, FAISS >= 1.11 maps the whole file without copying
    (`IO_FLAG_MMAP_IFC`: flat vectors, IVF lists, HNSW graph and vectors alike; "mmap"); older FAISS maps only IVF
    inverted lists (`IO_FLAG_MMAP`, as OnDiskInvertedLists; "mmap_invlists") and reads flat and HNSW indexes into
    memory ("read"), as it does without `mmap`. A mapped file must not change while it is in use; `build_index`
    replaces an index folder by renaming, which leaves the mapped files of a running reader intact."""
    import faiss

    name = os.fspath(path)
    if mmap:
        zero_copy = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
        if zero_copy is not None:
            try:
                return faiss.read_index(name, zero_copy), "mmap"
            except RuntimeError as error:
                logger.info("%s: no zero-copy mapping (%s); trying the IVF list mapping.", name, error)
        if kind in IVF_KINDS:
            try:
                return faiss.read_index(name, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), "mmap_invlists"
            except RuntimeError as error:
                logger.info("%s: cannot map the IVF lists (%s); reading it into memory.", name, error)
    return faiss.read_index(name), "read"


def load_index(folder: str | os.PathLike, mmap: bool = True, threads: int | None = None) -> LoadedIndex:
    """Load an index folder (memory-mapped where FAISS allows it, see `read_faiss_index`), its ids and paths and,
    for re-ranked IVF-PQ, its memory-mapped vectors; the recorded (tuned) search breadth is set."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    record = read_record(folder)
    faiss.omp_set_num_threads(threads or default_threads())
    try:
        index, mode = read_faiss_index(folder / INDEX_FILE, record["kind"], mmap)
    except RuntimeError as error:
        raise ValueError(
            f"{folder / INDEX_FILE}: cannot read the FAISS index ({str(error).splitlines()[0]})."
        ) from error
    ids = pq.read_table(folder / IDS_FILE, columns=["id", "path"])
    ids = pa.table({name: ids.column(name).cast(pa.large_string()).combine_chunks() for name in ("id", "path")})
    if not (index.ntotal == ids.num_rows == record["rows"]) or index.d != record["dim"]:
        raise ValueError(
            f"{folder}: the index has {index.ntotal} x {index.d}, {IDS_FILE} {ids.num_rows} rows and {RECORD_FILE} "
            f"{record['rows']} x {record['dim']}; rebuild it."
        )
    vectors = map_vectors(folder, record["rows"], record["dim"]) if record.get("rerank") else None
    loaded = LoadedIndex(index, record, ids, vectors, mode)
    loaded.set_breadth(record.get("nprobe"), record.get("ef_search"))
    return loaded


def index_summary(record: dict[str, Any]) -> str:
    """One line: kind, rows, parameters, self-check recall, seconds."""
    parameters = ", ".join(
        f"{name}={record[name]}"
        for name in ("nlist", "nprobe", "m", "nbits", "rerank", "hnsw_m", "ef_search")
        if record.get(name) not in (None, 0, False)
    )
    check = record.get("self_check") or {}
    recall = f"; recall@10 {check['recall_at_10']:.3f} (self-check)" if check else "; exact"
    return (
        f"indexed {record['rows']} x {record['dim']} as {record['kind']} ({record['factory']}"
        f"{'; ' + parameters if parameters else ''}){recall} in {record['seconds']['total']:.1f} s"
    )


__all__ = [
    "IDS_FILE",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "RECORD_FILE",
    "VECTORS_FILE",
    "LoadedIndex",
    "index_summary",
    "load_index",
    "map_vectors",
    "read_faiss_index",
    "read_record",
    "search_index",
    "set_breadth",
]
