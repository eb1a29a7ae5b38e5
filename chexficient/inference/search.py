"""`chexficient search`: nearest stored images (or reports) of an image, a report text or an embedding.

`SearchEngine` holds a loaded index (`chexficient.inference.faiss_index.load_index`: memory-mapped where FAISS allows it),
its row -> (id, path) table, and, for image and text queries, an `InferenceEngine` whose embeddings have the index's
width. Image queries are decoded by the model's image processor, as `chexficient embed` decodes them (PNG, JPEG,
16-bit, DICOM); a file that cannot be read is a `ValueError` naming it. Queries are L2-normalised, so every score is
a cosine similarity. `search_vectors` takes a whole batch in one FAISS call (the fast path for many queries).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..data.images import DECODE_ERRORS, decode_error_message, preprocess_image
from .faiss_index import LoadedIndex, load_index


MAX_K = 1000  # results per query: the CLI and the server refuse more


@dataclass(frozen=True)
class SearchHit:
    """One result: its rank (1 = best), cosine score, and the stored row's id and path."""

    rank: int
    score: float
    id: str
    path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_k(k: int, limit: int = MAX_K) -> int:
    """`k` as an int in 1..`limit`; a ValueError otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise ValueError(f"k must be an integer from 1 to {limit}, got {k!r}.")
    return int(k)


class SearchEngine:
    """Search an index folder with embeddings, images or texts.

    `model_dir` (or an already loaded `engine`) embeds image and text queries; without one only `search_vectors`
    works. `nprobe` (IVF) and `ef_search` (HNSW) override the search breadth tuned at build time. `mmap=False` reads
    the whole index into memory.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model_dir: str | os.PathLike | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        *,
        engine: Any = None,
        mmap: bool = True,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
    ):
        self.index: LoadedIndex = load_index(index_dir, mmap=mmap, threads=threads)
        self.index.set_breadth(nprobe, ef_search)
        self.index_dir = os.fspath(index_dir)
        if engine is None and model_dir is not None:
            from .engine import InferenceEngine

            engine = InferenceEngine.from_pretrained(model_dir, device, dtype)
        self.engine = engine
        if engine is not None and engine.projection_dim != self.index.dim:
            raise ValueError(
                f"the model {getattr(engine, 'model_dir', None) or ''} embeds into {engine.projection_dim} dimensions "
                f"but the index {index_dir} holds {self.index.dim}-d vectors; use the model that embedded the store."
            )

    @property
    def rows(self) -> int:
        return self.index.rows

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def kind(self) -> str:
        return self.index.kind

    def info(self) -> dict[str, Any]:
        """What the server's /health reports about the index."""
        record = self.index.record
        return {
            "path": self.index_dir,
            "kind": self.kind,
            "rows": self.rows,
            "dim": self.dim,
            "factory": record.get("factory"),
            "column": record.get("column"),
            "nprobe": record.get("nprobe"),
            "ef_search": record.get("ef_search"),
            "load_mode": self.index.load_mode,
        }

    # ----- queries ------------------------------------------------------------------------------------------------

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """The top-k hits of each query embedding ([Q, D] or [D]); one FAISS call for the whole batch."""
        k = check_k(k)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}] embeddings, got shape {tuple(queries.shape)}.")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("every query embedding must be finite and non-zero.")
        scores, rows = self.index.search(queries / norms, k)
        valid = rows >= 0
        ids, paths = self.index.lookup(rows[valid])
        hits: list[list[SearchHit]] = []
        position = 0
        for query_scores, query_valid in zip(scores, valid):
            count = int(query_valid.sum())
            hits.append(
                [
                    SearchHit(rank + 1, float(score), ids[position + rank], paths[position + rank])
                    for rank, score in enumerate(query_scores[:count])
                ]
            )
            position += count
        return hits

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings [n, D] of report-style `texts` with the query model."""
        engine = self._require_engine("text")
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(text, str) or not text.strip() for text in texts):
            raise ValueError("each text query must be a non-empty string.")
        return engine.embed_texts(list(texts))

    def embed_images(self, sources: Sequence[Any], names: Sequence[str] | None = None) -> np.ndarray:
        """Image embeddings [n, D] of files, bytes or arrays, decoded by the model's image processor; a source that
        cannot be decoded raises a ValueError naming it."""
        engine = self._require_engine("image")
        names = list(names) if names is not None else [_name(source, i) for i, source in enumerate(sources)]
        pixels = []
        for source, name in zip(sources, names):
            try:
                pixels.append(np.asarray(preprocess_image(engine.image_processor, source, name), dtype=np.float32))
            except DECODE_ERRORS as error:
                raise ValueError(decode_error_message(error, name)) from error
        if not pixels:
            raise ValueError("give at least one image query.")
        return engine.embed_numpy(np.stack(pixels))

    def search_texts(self, texts: Sequence[str], k: int = 10) -> list[list[SearchHit]]:
        """The top-k stored rows of each text query (report text -> images: cross-modal retrieval)."""
        return self.search_vectors(self.embed_texts(texts), check_k(k))

    def search_images(
        self, sources: Sequence[Any], k: int = 10, names: Sequence[str] | None = None
    ) -> list[list[SearchHit]]:
        """The top-k stored rows of each image query (paths, bytes or arrays the image processor reads)."""
        return self.search_vectors(self.embed_images(sources, names), check_k(k))

    def _require_engine(self, what: str) -> Any:
        if self.engine is None:
            raise ValueError(f"{what} queries need a model: give --model DIR (the model that embedded the store).")
        return self.engine


def _name(source: Any, position: int) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"query {position}"


def format_hits(query: str, hits: Sequence[SearchHit]) -> str:
    """A query's hits as a small table: rank, score, id, path."""
    lines = [f"# {query}", f"{'rank':>4}  {'score':>7}  id\tpath"]
    lines += [f"{hit.rank:>4}  {hit.score:>7.4f}  {hit.id}\t{hit.path}" for hit in hits]
    return "\n".join(lines)


__all__ = ["MAX_K", "SearchEngine", "SearchHit", "check_k", "format_hits"]
