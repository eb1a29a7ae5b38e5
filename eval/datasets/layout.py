"""Shared layout helpers: required files, folders and columns, CSV and label-column reading, image-path resolution,
image listing and deterministic splits.

Every check raises `DatasetLayoutError` naming the dataset, what is missing and the full path.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from .containers import DatasetLayoutError, PathLike


# Column spellings found in the official CSVs besides the display name and its short form (parenthesis dropped).
_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "Lung Opacity": ("Airspace Opacity",),
    "Other disease": ("Other diseases",),
    "Bronchopneumonia": ("Brocho-pneumonia", "Broncho-pneumonia"),
    "Pleuropneumonia": ("Pleuro-pneumonia",),
    "Diaphragmatic hernia": ("Diagphramatic hernia",),
}
_SPLITS = ("train", "val", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


def _missing(dataset: str, what: str, path: PathLike) -> DatasetLayoutError:
    return DatasetLayoutError(f"{dataset}: missing {what}: {os.fspath(path)}")


def _need_file(dataset: str, path: Path, what: str = "file") -> Path:
    if not path.is_file():
        raise _missing(dataset, what, path)
    return path


def _need_dir(dataset: str, path: Path, what: str = "folder") -> Path:
    if not path.is_dir():
        raise _missing(dataset, what, path)
    return path


def _first_existing(dataset: str, candidates: Sequence[Path], what: str, kind: str = "file") -> Path:
    """The first candidate that exists as a file (kind="file") or folder (kind="dir"), else DatasetLayoutError."""
    for path in candidates:
        if path.is_file() if kind == "file" else path.is_dir():
            return path
    tried = ", ".join(os.fspath(p) for p in candidates)
    raise DatasetLayoutError(f"{dataset}: missing {what}; looked for {tried}")


def _read_csv(
    dataset: str, path: Path, columns: Iterable[str] = (), str_columns: Iterable[str] = (), **kwargs
) -> pd.DataFrame:
    """Read a CSV (column names stripped of whitespace) and check that `columns` are present."""
    _need_file(dataset, path, "file")
    frame = pd.read_csv(path, dtype={c: str for c in str_columns}, **kwargs)
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in columns:
        _need_column(dataset, frame, column, path)
    return frame


def _need_column(dataset: str, frame: pd.DataFrame, column: str, path: Path) -> None:
    if column not in frame.columns:
        raise DatasetLayoutError(f"{dataset}: missing column {column!r} in {os.fspath(path)}")


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


def _label_columns(dataset: str, frame: pd.DataFrame, labels: Sequence[str], path: Path) -> list[str]:
    """The CSV column of each display label: by name, short form (no parenthesis), '_' for ' ', or known alias."""
    by_name = {_normalise(c): c for c in frame.columns}
    columns = []
    for label in labels:
        short = re.sub(r"\s*\(.*\)\s*$", "", label)
        for candidate in (label, short, *_COLUMN_ALIASES.get(label, ())):
            if _normalise(candidate) in by_name:
                columns.append(by_name[_normalise(candidate)])
                break
        else:
            raise DatasetLayoutError(f"{dataset}: missing column {short!r} (label {label!r}) in {os.fspath(path)}")
    return columns


def _targets(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Label columns -> float32 [N, C]; blanks/NaN -> 0, -1 (uncertain) kept."""
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
    return np.nan_to_num(values, nan=0.0).reshape(len(frame), len(columns))


def _path_resolver(dataset: str, example: str, bases: Sequence[Path]) -> Callable[[str], str]:
    """Find which base folder (and how many leading components to drop) makes `example` an existing path.

    Index files write image paths relative to different folders (CheXpert's 'CheXpert-v1.0-small/train/…', MIMIC's
    'files/…'); one probe with the first row decides the rule for all rows, so loading stays one stat per base.
    """
    if os.path.isabs(example) and os.path.exists(example):
        return lambda path: path
    parts = PurePosixPath(str(example).replace("\\", "/")).parts
    tried = []
    for strip in (0, 1):
        for base in bases:
            if len(parts) <= strip:
                continue
            candidate = base.joinpath(*parts[strip:])
            tried.append(os.fspath(candidate))
            if candidate.exists():
                return lambda path, base=base, strip=strip: os.fspath(
                    base.joinpath(*PurePosixPath(str(path).replace("\\", "/")).parts[strip:])
                )
    raise DatasetLayoutError(f"{dataset}: missing image {example!r}; looked for {', '.join(tried)}")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a sample id (SHA-1), for splits that do not depend on file order."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def hash_split(key: str, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> str:
    """Deterministic train/val/test assignment of `key` with the given fractions."""
    value = _hash_fraction(key)
    if value < fractions[0]:
        return "train"
    return "val" if value < fractions[0] + fractions[1] else "test"


def _splits_file(dataset: str, root: Path, ids: Sequence[str]) -> list[str] | None:
    """Splits from an optional `root/splits.csv` (id, split), or None when the file is absent."""
    path = root / "splits.csv"
    if not path.is_file():
        return None
    frame = _read_csv(dataset, path, ("id", "split"), str_columns=("id",))
    table = dict(zip(frame["id"], frame["split"].str.strip().str.lower()))
    missing = [i for i in ids if i not in table]
    if missing:
        raise DatasetLayoutError(f"{dataset}: id {missing[0]!r} has no row in {os.fspath(path)}")
    return [table[i] for i in ids]


def _check_split(dataset: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {list(allowed)}, got {split!r}.")


def _join_text(*parts: object) -> str:
    return " ".join(str(p).strip() for p in parts if isinstance(p, str) and p.strip())
