"""Manifests of image-report pairs and labels (CSV / JSONL / parquet) and the report text read from them; label-only
datasets get template pseudo-reports built from their labels, as the paper builds them."""

from __future__ import annotations

import codecs
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


DEFAULT_ENCODING = "utf-8"  # manifests are UTF-8 (a byte-order mark is skipped) unless `--encoding` says otherwise


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


# ----- reading manifests: encodings and ids ------------------------------------------------------------------------


def text_codec(encoding: str | None = DEFAULT_ENCODING) -> str:
    """The Python codec that reads text in `encoding`: UTF-8 skips a byte-order mark (spreadsheets write one); an
    unknown encoding is a ValueError."""
    encoding = encoding or DEFAULT_ENCODING
    try:
        name = codecs.lookup(encoding).name
    except LookupError as error:
        raise ValueError(
            f"--encoding {encoding!r}: not a text encoding Python knows (e.g. utf-8, latin-1)."
        ) from error
    return "utf-8-sig" if name == "utf-8" else encoding


def first_undecodable(path: str | os.PathLike, encoding: str) -> tuple[int, int, bytes] | None:
    """(byte offset, line number, the bytes) of the first bytes of the file that are not `encoding` text, or None;
    streamed, in 1 MB chunks."""
    text_codec(encoding)  # a known encoding
    decoder = codecs.getincrementaldecoder(encoding or DEFAULT_ENCODING)()  # a byte-order mark is valid UTF-8 here
    offset = lines = 0  # bytes and line breaks before the chunk
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = decoder.getstate()[0]  # an incomplete character carried over from the chunk before
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = pending + chunk
                line = lines + data[: error.start].count(b"\n") + 1
                return offset - len(pending) + error.start, line, data[error.start : error.end]
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def encoding_error(path: str | os.PathLike, encoding: str | None, error: UnicodeDecodeError) -> ValueError:
    """The error for a file that is not `encoding` text: names the file, the first bad byte's offset and line, and
    what to do (never Python's "'utf-8' codec can't decode byte 0xe9 in position ..." alone)."""
    encoding = encoding or DEFAULT_ENCODING
    try:
        found = first_undecodable(path, encoding)
    except OSError:
        found = None
    if found is None:  # what the reader said, without a position in the file
        where = f"{error.object[error.start : error.end]!r} ({error.reason})"
    else:
        offset, line, data = found
        where = f"byte {' '.join(f'0x{b:02x}' for b in data[:4])} at offset {offset} (line {line})"
    return ValueError(
        f"{path}: not valid {encoding} text: {where}. Save it as UTF-8, or pass --encoding with the encoding it "
        "was written in (e.g. --encoding latin-1 or cp1252)."
    )


def check_unique_ids(
    ids: Sequence[str], where: str | os.PathLike, rows: Sequence[int] | None = None, unit: str = "rows", shown: int = 5
) -> None:
    """A ValueError naming `where` and the first `shown` duplicated ids with their `rows` (the manifest's row or line
    numbers; positions from 1 when not given), when an id appears more than once."""
    positions: dict[str, list[int]] = {}
    for position, value in enumerate(ids):
        positions.setdefault(value, []).append(rows[position] if rows is not None else position + 1)
    duplicated = [(value, at) for value, at in positions.items() if len(at) > 1]
    if not duplicated:
        return
    described = [
        f"{value!r} ({unit} {', '.join(map(str, at[:4]))}{', ...' if len(at) > 4 else ''})"
        for value, at in duplicated[:shown]
    ]
    more = f" and {len(duplicated) - shown} more" if len(duplicated) > shown else ""
    count = f"{len(duplicated)} duplicate input id{'s' if len(duplicated) > 1 else ''}"
    raise ValueError(f"{where}: {count}: {', '.join(described)}{more}; ids must be unique.")


def read_manifest(path: str | os.PathLike, encoding: str | None = DEFAULT_ENCODING):
    """Read a CSV, JSONL or parquet manifest into a pandas DataFrame; text in `encoding` (UTF-8 by default), and a
    file that is not is a ValueError naming it, the offset and the line of its first bad byte."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist.")
    suffix = path.suffix.lower()
    codec = text_codec(encoding)
    try:
        if suffix == ".csv":
            return pd.read_csv(path, keep_default_na=True, encoding=codec)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl", encoding=codec)
    except UnicodeDecodeError as error:
        raise encoding_error(path, encoding, error) from error
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise ValueError(f"manifest {path}: unsupported format {suffix!r} (use .csv, .jsonl or .parquet).")


__all__ = [
    "DEFAULT_ENCODING",
    "check_unique_ids",
    "clean_text",
    "encoding_error",
    "first_undecodable",
    "pseudo_report_from_labels",
    "read_manifest",
    "report_text",
    "text_codec",
]
