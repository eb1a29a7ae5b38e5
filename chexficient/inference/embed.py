"""`chexficient embed`: embed a folder, manifest or list of images into a resumable parquet or safetensors file.

Rows are written in chunks to `OUT.parts/` while the run goes, and merged into OUT at the end, so an interrupted run
keeps everything up to its last chunk; a re-run skips every id already in OUT (or its parts) and appends the rest.
Unreadable files are listed in `OUT.errors.csv` (id, path, message) and the run goes on.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.images import InputItem, discover_inputs
from .engine import InferenceEngine


FORMATS = ("parquet", "safetensors")
SAFETENSORS_KEY = "embeddings"


def infer_format(out: str | os.PathLike, fmt: str | None) -> str:
    """The explicit `fmt`, else the output's suffix (.parquet / .safetensors), else parquet."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}.")
        return fmt
    suffix = Path(out).suffix.lower().lstrip(".")
    return suffix if suffix in FORMATS else "parquet"


def errors_path(out: str | os.PathLike) -> Path:
    """Where a run's unreadable inputs are reported: `OUT.errors.csv`."""
    return Path(f"{os.fspath(out)}.errors.csv")


def write_errors(path: Path, failures: Sequence[tuple[InputItem, str]]) -> Path | None:
    """Write (id, path, message) rows; remove a stale report when nothing failed."""
    if not failures:
        path.unlink(missing_ok=True)
        return None
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "message"])
        writer.writerows([csv_cell(item.id), csv_cell(item.path), csv_cell(message)] for item, message in failures)
    return path


def csv_cell(value: str) -> str:
    """A text cell safe to open in a spreadsheet: a leading =, +, - or @ (a formula) is escaped with a quote."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@") else value


# ----- storage ---------------------------------------------------------------------------------------------------


def _write_file(path: Path, fmt: str, ids: list[str], paths: list[str], embeddings: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = pa.array(embeddings.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(0, embeddings.size + 1, max(embeddings.shape[1], 1), dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, flat) if len(ids) else pa.array([], pa.list_(pa.float32()))
        table = pa.table({"id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()), "embedding": column})
        pq.write_table(table, tmp)
    else:
        import torch
        from safetensors.torch import save_file

        metadata = {"ids": json.dumps(ids), "paths": json.dumps(paths), "format": "chexficient-embeddings"}
        save_file({SAFETENSORS_KEY: torch.from_numpy(embeddings)}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read(path: Path, fmt: str) -> tuple[list[str], list[str], np.ndarray]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"id", "path", "embedding"} - set(table.column_names)
        if missing:
            raise ValueError(f"missing column(s) {sorted(missing)}")
        ids, paths = table.column("id").to_pylist(), table.column("path").to_pylist()
        values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return ids, paths, values.astype(np.float32).reshape(len(ids), -1) if ids else np.zeros((0, 0), np.float32)
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
        if SAFETENSORS_KEY not in handle.keys() or "ids" not in metadata:
            raise ValueError(f"no {SAFETENSORS_KEY!r} tensor or no ids in its metadata")
        embeddings = handle.get_tensor(SAFETENSORS_KEY).astype(np.float32)
    ids = json.loads(metadata["ids"])
    return ids, json.loads(metadata.get("paths", "[]")) or list(ids), embeddings


def read_embeddings(path: str | os.PathLike, fmt: str | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, paths, embeddings [N, D] float32) from a file written by `chexficient embed`."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        return _read(path, infer_format(path, fmt))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"{path}: cannot read it as CheXficient embeddings ({error}); move it away or choose another --out."
        ) from error


def read_ids(path: str | os.PathLike, fmt: str | None = None) -> tuple[list[str], int | None]:
    """(ids, embedding width) of an embeddings file without loading its embeddings."""
    path = Path(path)
    fmt = infer_format(path, fmt)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id"])
            ids = table.column("id").to_pylist()
            if not ids:
                return ids, None
            first = pq.ParquetFile(path).read_row_group(0, columns=["embedding"]).column("embedding")[0]
            return ids, len(first)
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            shape = handle.get_slice(SAFETENSORS_KEY).get_shape() if SAFETENSORS_KEY in handle.keys() else None
        if shape is None or "ids" not in metadata:
            raise ValueError(f"no {SAFETENSORS_KEY!r} tensor or no ids in its metadata")
        return json.loads(metadata["ids"]), int(shape[1]) if len(shape) == 2 else None
    except Exception as error:  # pyarrow, safetensors and json each raise their own types
        raise ValueError(
            f"{path}: cannot read it as CheXficient embeddings ({error}); move it away or choose another --out."
        ) from error


@dataclass
class EmbeddingStore:
    """The output file plus its in-progress chunk files, read back on resume and merged at the end."""

    path: Path
    fmt: str
    chunk_rows: int = 1024
    _ids: list[str] = field(default_factory=list)
    _paths: list[str] = field(default_factory=list)
    _rows: list[np.ndarray] = field(default_factory=list)
    _dim: int | None = None

    @property
    def parts_dir(self) -> Path:
        return Path(f"{self.path}.parts")

    def _sources(self) -> list[Path]:
        parts = sorted(self.parts_dir.glob(f"part-*.{self.fmt}")) if self.parts_dir.is_dir() else []
        return ([self.path] if self.path.exists() else []) + parts

    def existing_ids(self) -> set[str]:
        """Ids already embedded by earlier (possibly interrupted) runs; reads ids and shapes, not the embeddings."""
        done: set[str] = set()
        for source in self._sources():
            ids, dim = read_ids(source, self.fmt)
            if ids and self._dim is None:
                self._dim = dim
            done.update(ids)
        return done

    def append(self, ids: list[str], paths: list[str], embeddings: np.ndarray) -> None:
        if self._dim is not None and embeddings.shape[1] != self._dim:
            raise ValueError(
                f"{self.path}: holds {self._dim}-d embeddings but this model gives {embeddings.shape[1]}-d; "
                "use another --out for another model."
            )
        self._dim = embeddings.shape[1]
        self._ids.extend(ids)
        self._paths.extend(paths)
        self._rows.append(embeddings)
        if len(self._ids) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one complete chunk file."""
        if not self._ids:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        number = len(list(self.parts_dir.glob(f"part-*.{self.fmt}")))
        _write_file(
            self.parts_dir / f"part-{number:06d}.{self.fmt}",
            self.fmt,
            self._ids,
            self._paths,
            np.concatenate(self._rows),
        )
        self._ids, self._paths, self._rows = [], [], []

    def finalize(self) -> int:
        """Merge OUT and every chunk into OUT (atomically), each id once; returns the total number of rows.

        Exactly once whatever the moment of a kill: the chunks are removed only after OUT is replaced, and a run
        killed in between leaves OUT and chunks holding the same ids, which the next merge keeps once (OUT's row).
        """
        self.flush()
        sources = self._sources()
        if not sources:
            return 0
        if sources == [self.path]:
            return len(read_embeddings(self.path, self.fmt)[0])
        ids: list[str] = []
        paths: list[str] = []
        arrays: list[np.ndarray] = []
        seen: set[str] = set()
        for source in sources:
            part_ids, part_paths, embeddings = read_embeddings(source, self.fmt)
            fresh = [i for i, sample_id in enumerate(part_ids) if sample_id not in seen]
            seen.update(part_ids)
            if fresh:
                ids += [part_ids[i] for i in fresh]
                paths += [part_paths[i] for i in fresh]
                arrays.append(embeddings[fresh])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(self.path, self.fmt, ids, paths, np.concatenate(arrays) if arrays else np.zeros((0, 0)))
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return len(ids)


# ----- the command -----------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    embedded: int
    skipped: int
    failed: int
    total_rows: int
    seconds: float
    output: str
    errors_file: str | None

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        report = f"; errors in {self.errors_file}" if self.errors_file else ""
        return (
            f"embedded {self.embedded}, skipped {self.skipped} (already in {self.output}), failed {self.failed} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); {self.total_rows} rows{report}"
        )


def run_embed(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    engine: InferenceEngine,
    batch_size: int = 32,
    num_workers: int = 2,
    fmt: str | None = None,
    progress: bool = True,
    chunk_rows: int = 1024,
) -> RunSummary:
    """Embed every image of `source` not yet in `out`; returns the counts."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out)
    store = EmbeddingStore(out, infer_format(out, fmt), chunk_rows=chunk_rows)
    items = discover_inputs(source)
    done = store.existing_ids()
    todo = [item for item in items if item.id not in done]
    failures: list[tuple[InputItem, str]] = []
    embedded = 0
    loader = engine.make_loader(todo, batch_size, num_workers if todo else 0)
    with tqdm(total=len(todo), unit="img", desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        for batch, embeddings in engine.iter_embeddings(loader):
            failures += [(todo[index], message) for index, message in batch.failed]
            if embeddings is not None:
                chosen = [todo[index] for index in batch.indices]
                store.append([item.id for item in chosen], [item.path for item in chosen], embeddings)
                embedded += len(chosen)
            bar.update(len(batch.indices) + len(batch.failed))
            if failures:
                bar.set_postfix(failed=len(failures))
    total = store.finalize()
    report = write_errors(errors_path(out), failures)
    return RunSummary(
        embedded,
        len(items) - len(todo),
        len(failures),
        total,
        time.perf_counter() - start,
        str(out),
        str(report) if report else None,
    )


__all__ = [
    "FORMATS",
    "EmbeddingStore",
    "csv_cell",
    "RunSummary",
    "errors_path",
    "infer_format",
    "read_embeddings",
    "run_embed",
]
