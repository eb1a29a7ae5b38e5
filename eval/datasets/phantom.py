"""Synthetic phantoms: classification, retrieval and segmentation sets for tests and demos without real data.

Layouts (root = the folder passed to the loader):
- phantom (classification): `{train,test}.csv` written by `chexficient.phantoms.write_phantom_dataset`; the label
  columns are those after `impression`.
- phantom (retrieval): `test.csv`; text = findings + " " + impression.
- phantom_segmentation: `images/<id>.png`, `masks/<class>/<id>.png`, `segmentation.csv` (id, split),
  `segmentation.json` ({"classes": [...]}).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .containers import ClassificationSet, DatasetLayoutError, RetrievalSet, SegmentationSet
from .layout import _join_text, _need_dir, _need_file, _read_csv, _targets
from .masks import _image_size, _read_binary_mask


def _phantom_frame(name: str, root: Path, split: str) -> tuple[Path, pd.DataFrame]:
    csv = root / f"{split}.csv"
    frame = _read_csv(name, csv, ("id", "path", "findings", "impression"), str_columns=("id", "path"))
    return csv, frame


def _phantom(root: Path, split: str = "test") -> ClassificationSet:
    name = "phantom"
    _csv, frame = _phantom_frame(name, root, split)
    labels = list(frame.columns[list(frame.columns).index("impression") + 1 :])
    paths = [os.fspath(root / p) for p in frame["path"]]
    return ClassificationSet(name, labels, paths, _targets(frame, labels), list(frame["id"]))


def _phantom_retrieval(root: Path) -> RetrievalSet:
    name = "phantom"
    _csv, frame = _phantom_frame(name, root, "test")
    texts = [_join_text(f, i) for f, i in zip(frame["findings"], frame["impression"])]
    return RetrievalSet(name, [os.fspath(root / p) for p in frame["path"]], texts, list(frame["id"]))


def _phantom_segmentation(root: Path) -> SegmentationSet:
    name = "phantom_segmentation"
    meta_path = _need_file(name, root / "segmentation.json")
    meta = json.loads(meta_path.read_text())
    if "classes" not in meta:
        raise DatasetLayoutError(f"{name}: missing key 'classes' in {os.fspath(meta_path)}")
    classes = [str(c) for c in meta["classes"]]
    csv = root / "segmentation.csv"
    frame = _read_csv(name, csv, ("id", "split"), str_columns=("id", "split"))
    image_dir = _need_dir(name, root / "images", "image folder")
    for cls in classes:
        _need_dir(name, root / "masks" / cls, f"mask folder for class {cls!r}")
    ids = list(frame["id"])
    paths = [os.fspath(image_dir / f"{i}.png") for i in ids]

    def mask_reader(index: int) -> np.ndarray:
        size = _image_size(paths[index])
        masks = [
            _read_binary_mask(_need_file(name, root / "masks" / c / f"{ids[index]}.png", "mask"), size)
            for c in classes
        ]
        return np.stack(masks) if masks else np.zeros((0, size[1], size[0]), dtype=bool)

    splits = [s.strip().lower() for s in frame["split"]]
    return SegmentationSet(name, classes, paths, splits, ids, mask_reader)
