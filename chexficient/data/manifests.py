"""Manifests of image-report pairs and labels (CSV / JSONL / parquet) and the report text read from them; label-only
datasets get template pseudo-reports built from their labels, as the paper builds them."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def clean_text(value: Any) -> str:
    """A report field as a single-line string ('' for missing / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def report_text(findings: Any, impression: Any) -> str:
    """The training text of a report: findings then impression, as the released model was trained."""
    return " ".join(part for part in (clean_text(findings), clean_text(impression)) if part)


# Label-only datasets: one sentence per label, as the paper builds pseudo-reports.
_PSEUDO_POSITIVE = ["There is {c}.", "Findings consistent with {c}.", "{c} is present.", "Evidence of {c}."]
_PSEUDO_NEGATIVE = ["There is no {c}.", "No evidence of {c}.", "{c} is absent."]
_PSEUDO_UNCERTAIN = ["{c} cannot be excluded.", "Possible {c}.", "Questionable {c}."]
_PSEUDO_NO_FINDING = ["No acute cardiopulmonary abnormality.", "The chest radiograph is normal."]


def pseudo_report_from_labels(labels: Mapping[str, float | None], rng: np.random.Generator) -> str:
    """Template report from structured labels: 1 positive, 0 negative, -1 uncertain, None/NaN skipped."""

    def present(value):
        return value is not None and not (isinstance(value, float) and np.isnan(value))

    no_finding = {k for k in labels if k.strip().lower() == "no finding"}
    others = {k: v for k, v in labels.items() if k not in no_finding}
    if any(present(labels[k]) and labels[k] == 1 for k in no_finding) and not any(
        present(v) and v != 0 for v in others.values()
    ):
        return str(rng.choice(_PSEUDO_NO_FINDING))
    sentences = []
    for name, value in others.items():
        if not present(value):
            continue
        pool = _PSEUDO_POSITIVE if value == 1 else _PSEUDO_UNCERTAIN if value == -1 else _PSEUDO_NEGATIVE
        sentences.append(str(rng.choice(pool)).format(c=name.lower()).capitalize())
    return " ".join(sentences)


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


__all__ = ["clean_text", "pseudo_report_from_labels", "read_manifest", "report_text"]
