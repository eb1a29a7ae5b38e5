"""`chexficient embed`: embed a folder, manifest or list of images (and, with `--text-column`, each row's report) into
the embedding store, a folder of Parquet shards (`chexficient.inference.store`).

Rows go to complete shards while the run goes, so a run killed at any moment keeps every shard it wrote, and a re-run
embeds only the ids not stored yet (each id once). Under `torchrun` or `accelerate launch` every process takes every
WORLD_SIZE-th input of the list and writes its own shards; the first process writes the manifest when all are done.
An input that cannot be read or decoded, whatever its decoder raised (`chexficient.data.images`), is listed in
`OUT/errors.csv` (id, path, a message naming the file) and the run goes on; if the run stops anyway (a crashed
DataLoader worker, Ctrl-C), the rows embedded so far are written as a shard and the failures so far to errors.csv
before the error propagates. `--export FILE` also writes one .parquet or .safetensors file at the end, for sets that
fit.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.images import InputItem, discover_inputs
from ..data.manifests import DEFAULT_ENCODING
from .engine import InferenceEngine
from .store import (
    ERRORS_FILE,
    EXPORT_SUFFIXES,
    ShardWriter,
    export_embeddings,
    remove_temporaries,
    stored_ids,
    write_manifest,
)


def errors_path(out: str | os.PathLike) -> Path:
    """Where a run's unreadable inputs are reported: `OUT.errors.csv`."""
    return Path(f"{os.fspath(out)}.errors.csv")


def write_errors(path: Path, failures: Sequence[tuple[InputItem, str]]) -> Path | None:
    """Write (id, path, message) rows; remove a stale report when nothing failed."""
    if not failures:
        path.unlink(missing_ok=True)
        return None
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "message"])
        writer.writerows([csv_cell(item.id), csv_cell(item.path), csv_cell(message)] for item, message in failures)
    return path


def csv_cell(value: str) -> str:
    """A text cell safe to open in a spreadsheet: a leading =, +, - or @ (a formula) is escaped with a quote."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@") else value


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
    shards: list[str] = field(default_factory=list)  # the shards this process wrote

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        report = f"; errors in {self.errors_file}" if self.errors_file else ""
        return (
            f"embedded {self.embedded}, skipped {self.skipped} (already in {self.output}), failed {self.failed} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); {self.total_rows} rows{report}"
        )


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) when run alone."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} does not fit WORLD_SIZE={world}.")
    return rank, world


def check_store_path(out: str | os.PathLike) -> Path:
    """`--out` as a store folder; a file name (the single-file output of 0.2) is an error that says what to do."""
    out = Path(out)
    if out.suffix.lower() in EXPORT_SUFFIXES or out.is_file():
        raise ValueError(
            f"--out {out}: the output is a folder of Parquet shards since 0.3 (resumable, any size); give a folder, "
            f"and --export {out.name} for one file at the end."
        )
    return out


def _wait_for_every_rank(world: int) -> None:
    """A barrier over the processes of a torchrun / accelerate launch (gloo: CPU or GPU alike)."""
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def _merge_rank_errors(out: Path, world: int) -> Path | None:
    """Every process's unreadable inputs in one `OUT/errors.csv` (removed when nothing failed)."""
    rows = []
    for rank in range(world):
        part = out / f".errors-r{rank:05d}.csv"
        if part.is_file():
            with part.open(newline="", encoding="utf-8") as handle:
                rows += list(csv.reader(handle))[1:]
            part.unlink()
    path = out / ERRORS_FILE
    if not rows:
        path.unlink(missing_ok=True)
        return None
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "message"])
        writer.writerows(rows)
    return path


def run_embed(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    engine: InferenceEngine,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    shard_rows: int = 4096,
    text_column: str | None = None,
    export: str | os.PathLike | None = None,
    encoding: str | None = DEFAULT_ENCODING,
) -> RunSummary:
    """Embed every input of `source` whose id is not in the store `out` yet; returns this process's counts. A
    manifest is read as `encoding` text."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = check_store_path(out)
    rank, world = process_rank()
    items = discover_inputs(source, text_column, encoding)
    mine = items[rank::world]  # by position in the whole list: the ranks' shares never overlap, whatever is stored
    done = stored_ids(out)
    todo = [item for item in mine if item.id not in done]
    writer = ShardWriter(out, writer=f"r{rank:05d}x{os.urandom(3).hex()}", shard_rows=shard_rows)
    failures: list[tuple[InputItem, str]] = []
    embedded = 0
    loader = engine.make_loader(todo, batch_size, num_workers if todo else 0)
    bar = tqdm(
        total=len(todo), unit="img", desc=f"embed (rank {rank})" if world > 1 else "embed", disable=not progress
    )
    try:
        with bar:
            for batch, embeddings in engine.iter_embeddings(loader):
                failures += [(todo[index], message) for index, message in batch.failed]
                if embeddings is not None:
                    chosen = [todo[index] for index in batch.indices]
                    texts = [item.text or "" for item in chosen] if text_column is not None else None
                    writer.append(
                        [item.id for item in chosen],
                        [item.path for item in chosen],
                        embeddings,
                        texts=texts,
                        text_embeddings=engine.embed_texts(texts) if texts is not None else None,
                    )
                    embedded += len(chosen)
                bar.update(len(batch.indices) + len(batch.failed))
                if failures:
                    bar.set_postfix(failed=len(failures))
    except BaseException:  # the run stops (not for one input: those are records): keep what it did
        writer.flush()
        if failures:
            write_errors(out / (ERRORS_FILE if world == 1 else f".errors-r{rank:05d}.csv"), failures)
        raise
    writer.flush()
    write_errors(out / f".errors-r{rank:05d}.csv", failures)
    _wait_for_every_rank(world)
    errors = total = None
    if rank == 0:
        remove_temporaries(out)  # every writer of this run is done: what is left is from killed ones
        errors = _merge_rank_errors(out, world)
        model = {"model_dir": engine.model_dir, **asdict(engine.info), "text_column": text_column}
        total = write_manifest(out, model)["rows"]
        if export is not None:
            export_embeddings(out, export)
    _wait_for_every_rank(world)
    return RunSummary(
        embedded,
        len(mine) - len(todo),
        len(failures),
        total if total is not None else len(done) + embedded,
        time.perf_counter() - start,
        str(out),
        str(errors) if errors else None,
        writer.written,
    )


__all__ = ["RunSummary", "check_store_path", "csv_cell", "errors_path", "process_rank", "run_embed", "write_errors"]
