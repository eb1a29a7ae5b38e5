"""`chexficient classify`: zero-shot probabilities per image (the paper's "{finding}" vs "no {finding}" protocol).

Writes CSV (id, path, one column per label) or JSON (a list of {id, path, probabilities}); unreadable files go to
`OUT.errors.csv` and the run goes on.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import InputItem, discover_inputs
from ..data.manifests import DEFAULT_ENCODING
from .embed import csv_cell, errors_path, write_errors
from .engine import InferenceEngine, parse_labels


@dataclass
class ClassifySummary:
    classified: int
    failed: int
    seconds: float
    output: str
    errors_file: str | None

    def line(self) -> str:
        report = f"; errors in {self.errors_file}" if self.errors_file else ""
        rate = self.classified / self.seconds if self.seconds > 0 else 0.0
        return (
            f"classified {self.classified}, failed {self.failed} in {self.seconds:.1f} s ({rate:.2f} images/s) "
            f"-> {self.output}{report}"
        )


def write_probabilities(out: Path, labels: Sequence[str], items: Sequence[InputItem], probs: np.ndarray) -> None:
    """CSV (.csv) or JSON (.json) output of per-image probabilities."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".json":
        records = [
            {"id": item.id, "path": item.path, "probabilities": {label: float(p) for label, p in zip(labels, row)}}
            for item, row in zip(items, probs)
        ]
        tmp.write_text(json.dumps({"labels": list(labels), "results": records}, indent=1))
    else:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "path", *map(csv_cell, labels)])
            writer.writerows(
                [csv_cell(item.id), csv_cell(item.path), *(f"{p:.6f}" for p in row)] for item, row in zip(items, probs)
            )
    os.replace(tmp, out)


def run_classify(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    engine: InferenceEngine,
    labels: str | Sequence[str],
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    encoding: str | None = DEFAULT_ENCODING,
) -> ClassifySummary:
    """Zero-shot classify every image of `source` (a manifest read as `encoding` text) against `labels`; returns the
    counts. An input that cannot be decoded, whatever its decoder raised, is listed in `OUT.errors.csv`."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {out}: must end in .csv or .json.")
    labels = parse_labels(labels)
    start = time.perf_counter()
    items = discover_inputs(source, encoding=encoding)
    done_items: list[InputItem] = []
    rows: list[np.ndarray] = []
    failures: list[tuple[InputItem, str]] = []
    text_embeds = engine.label_embeds(labels) if items else None  # once for the run, not per batch
    loader = engine.make_loader(items, batch_size, num_workers if items else 0)
    with tqdm(total=len(items), unit="img", desc="classify", disable=not progress, dynamic_ncols=True) as bar:
        for batch, embeddings in engine.iter_embeddings(loader):
            failures += [(items[index], message) for index, message in batch.failed]
            if embeddings is not None:
                rows.append(engine.classify_embeds(embeddings, text_embeds=text_embeds))
                done_items += [items[index] for index in batch.indices]
            bar.update(len(batch.indices) + len(batch.failed))
    probs = np.concatenate(rows) if rows else np.zeros((0, len(labels)), np.float32)
    write_probabilities(out, labels, done_items, probs)
    report = write_errors(errors_path(out), failures)
    return ClassifySummary(
        len(done_items), len(failures), time.perf_counter() - start, str(out), str(report) if report else None
    )


__all__ = ["ClassifySummary", "run_classify", "write_probabilities"]
