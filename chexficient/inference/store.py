"""The embedding store: a folder of Parquet shards plus a small manifest, written by any number of processes and read
as a stream.

    EMB_DIR/
      part-<writer>-<seq>.parquet   id, path, [text], embedding, [text_embedding]  (fixed-size float32 lists)
      manifest.json                 format, dim, columns, shards with their row counts, the model and its settings
      errors.csv                    the inputs that could not be read (id, path, message)

Each shard is written to a hidden temporary name and renamed when complete, so a shard exists only whole: a process
killed at any moment loses at most the rows it had not yet written, and a re-run embeds exactly those (each id once).
Every writer (a rank of `torchrun`, a Ray actor) has its own name prefix, so writers never collide. Nothing holds
the whole matrix: writers flush every `shard_rows` rows and readers stream record batches (`pyarrow.dataset`).
A single safetensors or Parquet file is an explicit export (`export_embeddings`) for sets that fit.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


STORE_FORMAT = "chexficient-embeddings/2"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.csv"
SHARD_GLOB = "part-*.parquet"
SAFETENSORS_KEY = "embeddings"
# safetensors refuses a JSON header above 100 MB; ids and paths live in that header (metadata), so this is the limit
SAFETENSORS_HEADER_LIMIT = 100_000_000
EXPORT_SUFFIXES = (".safetensors", ".parquet")


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """The complete shards of a store, in name order (temporary files of a writer at work are hidden: `.tmp-*`)."""
    folder = Path(folder)
    return sorted(folder.glob(SHARD_GLOB)) if folder.is_dir() else []


def _dataset(folder: str | os.PathLike, shards: Sequence[Path] | None = None):
    import pyarrow.dataset as ds

    shards = list(shards) if shards is not None else shard_paths(folder)
    return ds.dataset([str(path) for path in shards], format="parquet")


def read_format_record(path: Path, expected_format: str, what: str) -> dict[str, Any]:
    """A JSON record (a store manifest, an index record) whose `format` must be `expected_format`; a ValueError
    naming the file and `what` it should be otherwise."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a CheXficient {what} ({error}).") from error
    if record.get("format") != expected_format:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {expected_format!r}.")
    return record


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The store's manifest; a store killed before its manifest was written is described from its shards."""
    path = Path(folder) / MANIFEST_FILE
    if path.is_file():
        return read_format_record(path, STORE_FORMAT, "store manifest")
    return describe_shards(folder)


def describe_shards(folder: str | os.PathLike, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a store's shards as they are on disk: names, row counts (from the Parquet footers), width."""
    import pyarrow.parquet as pq

    shards = []
    schema = None
    for path in shard_paths(folder):
        metadata = pq.ParquetFile(path).metadata
        shards.append({"name": path.name, "rows": metadata.num_rows})
        schema = schema or metadata.schema.to_arrow_schema()
    columns = list(schema.names) if schema is not None else []
    dim = schema.field("embedding").type.list_size if schema is not None and "embedding" in columns else None
    return {
        "format": STORE_FORMAT,
        "rows": sum(shard["rows"] for shard in shards),
        "dim": dim,
        "columns": columns,
        "shards": shards,
        "model": model or {},
    }


def write_manifest(folder: str | os.PathLike, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the store's complete shards in `manifest.json` (atomically); keeps the model record it had."""
    folder = Path(folder)
    previous = folder / MANIFEST_FILE
    if model is None and previous.is_file():
        model = json.loads(previous.read_text()).get("model")
    manifest = describe_shards(folder, model)
    _atomic_write_text(previous, json.dumps(manifest, indent=2) + "\n")
    return manifest


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files that killed writers left (`.tmp-*`); call it only when no writer is at work."""
    removed = 0
    for path in Path(folder).glob(".tmp-*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    temporary.write_text(text)
    os.replace(temporary, path)


def embedding_column(values: np.ndarray):
    """[N, D] float32 as a Parquet fixed-size list column."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), values.shape[1])


def column_matrix(column: Any) -> np.ndarray:
    """A fixed-size (or plain) list column of floats as [N, D] float32, without a copy where Arrow allows."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else len(column[0])
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), width)


@dataclass
class ShardWriter:
    """Appends rows to a store and writes them as complete shards of `shard_rows` rows.

    `writer` names this writer's shards (`part-<writer>-<seq>.parquet`); give each concurrent process its own (the
    default is a random token, so runs and ranks never collide)."""

    folder: Path
    writer: str = field(default_factory=lambda: secrets.token_hex(4))
    shard_rows: int = 4096
    dim: int | None = None
    _columns: dict[str, list[Any]] = field(default_factory=dict)
    _rows: int = 0
    _sequence: int = 0
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if "-" in self.writer or "/" in self.writer:
            raise ValueError(f"writer name {self.writer!r}: use letters, digits and underscores.")
        self.folder.mkdir(parents=True, exist_ok=True)

    def append(
        self,
        ids: Sequence[str],
        paths: Sequence[str],
        embeddings: np.ndarray,
        texts: Sequence[str] | None = None,
        text_embeddings: np.ndarray | None = None,
    ) -> None:
        """Buffer rows: image embeddings [n, D], and optionally each row's report text and its embedding [n, D]."""
        if self.dim is not None and embeddings.shape[1] != self.dim:
            raise ValueError(
                f"{self.folder}: holds {self.dim}-d embeddings but this model gives {embeddings.shape[1]}-d; "
                "use another --out for another model."
            )
        self.dim = int(embeddings.shape[1])
        batch: dict[str, Any] = {"id": list(ids), "path": list(paths), "embedding": [np.asarray(embeddings)]}
        if texts is not None:
            batch["text"] = list(texts)
        if text_embeddings is not None:
            batch["text_embedding"] = [np.asarray(text_embeddings)]
        if self._columns and set(batch) != set(self._columns):
            raise ValueError(f"{self.folder}: rows with columns {sorted(batch)} after {sorted(self._columns)}.")
        for name, values in batch.items():
            self._columns.setdefault(name, []).extend(values)
        self._rows += len(ids)
        if self._rows >= self.shard_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered rows as one complete shard (temporary name, then an atomic rename)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return None
        arrays = {}
        for name in ("id", "path", "text", "embedding", "text_embedding"):
            if name not in self._columns:
                continue
            values = self._columns[name]
            if name.endswith("embedding"):
                arrays[name] = embedding_column(np.concatenate(values))
            else:
                arrays[name] = pa.array(values, pa.string())
        path = self.folder / f"part-{self.writer}-{self._sequence:05d}.parquet"
        temporary = self.folder / f".tmp-{path.name}"
        pq.write_table(pa.table(arrays), temporary)
        os.replace(temporary, path)
        self.written.append(path.name)
        self._sequence += 1
        self._columns, self._rows = {}, 0
        return path


class ParquetSink:
    """Rows appended as Arrow tables, written by a streaming `ParquetWriter` in row groups of `row_group_rows` rows to a
    hidden temporary file, renamed into place by `close()` (a killed run leaves no partial file under the name)."""

    def __init__(self, path: Path, row_group_rows: int = 65536):
        self.path, self.row_group_rows = path, row_group_rows
        self.temporary = path.with_name(f".tmp-{path.name}")
        self.writer: Any = None
        self.pending: list[Any] = []
        self.rows = 0

    def append(self, table: Any) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.temporary, table.schema)
        self.writer.write_table(table, row_group_size=self.row_group_rows)
        self.pending, self.rows = [], 0

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            os.replace(self.temporary, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.temporary.unlink(missing_ok=True)


def stored_ids(folder: str | os.PathLike) -> set[str]:
    """Ids already in the store's complete shards; reads the `id` column only."""
    shards = shard_paths(folder)
    if not shards:
        return set()
    try:
        return set(_dataset(folder, shards).to_table(columns=["id"]).column("id").to_pylist())
    except Exception as error:  # pyarrow raises its own types for a damaged file
        raise ValueError(f"{folder}: cannot read its shards as CheXficient embeddings ({error}).") from error


def stored_dim(folder: str | os.PathLike) -> int | None:
    """The width of the store's embeddings (None for an empty store)."""
    return describe_shards(folder).get("dim")


def iter_batches(
    folder: str | os.PathLike, columns: Sequence[str] = ("id", "path", "embedding"), batch_rows: int = 65536
) -> Iterator[dict[str, Any]]:
    """Stream the store: dicts of `columns` per record batch, embedding columns as [n, D] float32, text as lists.
    Shard by shard, so memory holds one batch (a dataset scanner reads ahead several files at once)."""
    import pyarrow.parquet as pq

    for shard in shard_paths(folder):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows, columns=list(columns)):
            yield {
                name: column_matrix(batch.column(name))
                if name.endswith("embedding")
                else batch.column(name).to_pylist()
                for name in columns
            }


def read_store(folder: str | os.PathLike, columns: Sequence[str] = ("id", "path", "embedding")) -> dict[str, Any]:
    """The whole store in memory (for sets that fit): each column as a list or an [N, D] matrix."""
    parts = list(iter_batches(folder, columns))
    if not parts:
        return {name: np.zeros((0, 0), np.float32) if name.endswith("embedding") else [] for name in columns}
    return {
        name: np.concatenate([p[name] for p in parts])
        if name.endswith("embedding")
        else sum((p[name] for p in parts), [])
        for name in columns
    }


def export_embeddings(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """One file with every row of the store: `.parquet` (streamed, any size) or `.safetensors` (ids and paths in its
    JSON header, so only for sets whose header stays under safetensors' 100 MB limit; a clear error otherwise)."""
    import pyarrow.parquet as pq

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"--export {out}: use a .safetensors or .parquet file name.")
    temporary = out.with_name(f".tmp-{out.name}")
    shards = shard_paths(folder)
    if suffix == ".parquet":
        if not shards:
            raise ValueError(f"{folder}: no shards to export.")
        with pq.ParquetWriter(temporary, pq.ParquetFile(shards[0]).schema_arrow) as writer:
            for batch in _dataset(folder, shards).to_batches():
                writer.write_batch(batch)
        os.replace(temporary, out)
        return out
    import torch
    from safetensors.torch import save_file

    table = read_store(folder)
    metadata = {"ids": json.dumps(table["id"]), "paths": json.dumps(table["path"]), "format": "chexficient-embeddings"}
    header = len(json.dumps({"__metadata__": metadata})) + 256  # the header holds the metadata JSON-escaped again
    if header > SAFETENSORS_HEADER_LIMIT:
        raise ValueError(
            f"--export {out}: {len(table['id'])} ids and paths make a {header / 1e6:.0f} MB safetensors header, over "
            f"its {SAFETENSORS_HEADER_LIMIT / 1e6:.0f} MB limit; read the Parquet store {folder} directly "
            "(chexficient.inference.store.iter_batches, pyarrow.dataset) or export a .parquet file instead."
        )
    save_file({SAFETENSORS_KEY: torch.from_numpy(table["embedding"])}, str(temporary), metadata=metadata)
    os.replace(temporary, out)
    return out


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, paths, embeddings [N, D] float32) of a store folder or of an exported .parquet / .safetensors file."""
    path = Path(path)
    try:
        if path.is_dir():
            table = read_store(path)
            return table["id"], table["path"], table["embedding"]
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id", "path", "embedding"])
            return table.column("id").to_pylist(), table.column("path").to_pylist(), column_matrix(table["embedding"])
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if SAFETENSORS_KEY not in handle.keys() or "ids" not in metadata:
                raise ValueError(f"no {SAFETENSORS_KEY!r} tensor or no ids in its metadata")
            embeddings = handle.get_tensor(SAFETENSORS_KEY).astype(np.float32)
        ids = json.loads(metadata["ids"])
        return ids, json.loads(metadata.get("paths", "[]")) or list(ids), embeddings
    except Exception as error:  # pyarrow, safetensors and json each raise their own types
        raise ValueError(f"{path}: cannot read it as CheXficient embeddings ({error}).") from error


__all__ = [
    "ParquetSink",
    "ERRORS_FILE",
    "MANIFEST_FILE",
    "STORE_FORMAT",
    "ShardWriter",
    "column_matrix",
    "describe_shards",
    "embedding_column",
    "export_embeddings",
    "iter_batches",
    "read_embeddings",
    "read_format_record",
    "read_manifest",
    "read_store",
    "remove_temporaries",
    "shard_paths",
    "stored_dim",
    "stored_ids",
    "write_manifest",
]
