"""The curated subset file (`curated_subset.json`) written beside a model: one record format for every writer.

Pretraining writes the ids it curated from its manifest; the converter writes the indices stored in a reference
checkpoint. Both go through `write_curated_subset`, and `read_curated_subset` also accepts the older converter
record (`num_ids`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


SUBSET_FILENAME = "curated_subset.json"
SUBSET_FORMAT = "chexficient-curated-subset/1"


def curated_subset_record(
    indices: Sequence[int],
    ids: Sequence[str | int] | None = None,
    num_candidates: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The record: curated `indices` into the candidate list, their `ids` (the indices when unknown), counts, source."""
    indices = [int(i) for i in indices]
    ids = list(ids) if ids is not None else list(indices)
    if len(ids) != len(indices):
        raise ValueError(f"curated subset: {len(ids)} ids for {len(indices)} indices.")
    return {
        "format": SUBSET_FORMAT,
        "num_curated": len(indices),
        "num_candidates": num_candidates,
        "ratio": len(indices) / num_candidates if num_candidates else None,
        "source": source,
        "ids": ids,
        "indices": indices,
    }


def write_curated_subset(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write `record` as `folder/curated_subset.json`; returns the path."""
    path = Path(folder) / SUBSET_FILENAME
    path.write_text(json.dumps(record))
    return path


def read_curated_subset(path: str | os.PathLike) -> dict[str, Any]:
    """Read a subset file (a folder or the file itself) as a current-format record."""
    path = Path(path)
    if path.is_dir():
        path = path / SUBSET_FILENAME
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable curated subset file ({error}).") from error
    if not isinstance(record, dict) or "ids" not in record:
        raise ValueError(f"{path}: no 'ids' field; not a curated subset file.")
    if "num_curated" not in record:  # the converter's first record format
        return curated_subset_record(record["ids"], source=record.get("source"))
    return record


__all__ = ["SUBSET_FILENAME", "curated_subset_record", "read_curated_subset", "write_curated_subset"]
