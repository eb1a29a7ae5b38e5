"""Manifests of image-report pairs and labels (CSV / JSONL / parquet) and the report text read from them."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def clean_text(value: Any) -> str:
    """A report field as a single-line string ('' for missing / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def report_text(findings: Any, impression: Any) -> str:
    """The training text of a report: findings then impression, as the released model was trained."""
    return " ".join(part for part in (clean_text(findings), clean_text(impression)) if part)


def read_manifest(path: str | os.PathLike):
    """Read a CSV, JSONL or parquet manifest into a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=True)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise ValueError(f"manifest {path}: unsupported format {suffix!r} (use .csv, .jsonl or .parquet).")


__all__ = ["clean_text", "read_manifest", "report_text"]
