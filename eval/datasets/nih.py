"""NIH ChestX-ray14: 15 labels (14 findings + No Finding) from the pipe-separated `Finding Labels` column.

Layout (root = the folder passed to the loader): `Data_Entry_2017*.csv` + `test_list.txt` ("test") /
`train_val_list.txt` ("train" = "trainval"); images in root/images, root/data or root/images_0xx/images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chexficient.data.labels import LABELS

from .containers import ClassificationSet, DatasetLayoutError
from .layout import _check_split, _first_existing, _missing, _need_file, _normalise, _read_csv


def _nih(root: Path, split: str = "test") -> ClassificationSet:
    name = "nih"
    _check_split(name, split, ("test", "train", "trainval"))
    labels = LABELS[name]
    entry = _first_existing(
        name, [root / "Data_Entry_2017.csv", root / "Data_Entry_2017_v2020.csv"], "Data_Entry_2017.csv"
    )
    frame = _read_csv(name, entry, ("Image Index", "Finding Labels"), str_columns=("Image Index",))
    list_file = _need_file(name, root / ("test_list.txt" if split == "test" else "train_val_list.txt"), "split list")
    wanted = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    findings = dict(zip(frame["Image Index"], frame["Finding Labels"].fillna("")))
    index = {_normalise(label): c for c, label in enumerate(labels)}
    folders = [d for d in (root / "images", root / "data") if d.is_dir()]
    folders += sorted(d / "images" for d in root.glob("images_*") if (d / "images").is_dir())
    folders += sorted(d for d in root.glob("images_*") if d.is_dir() and not (d / "images").is_dir())
    if not folders:
        raise DatasetLayoutError(
            f"{name}: missing image folder; looked for {os.fspath(root / 'images')}, {os.fspath(root / 'data')}, "
            f"{os.fspath(root / 'images_0xx' / 'images')}"
        )
    location = {}
    for folder in folders:
        for entry_name in os.listdir(folder):
            location.setdefault(entry_name, folder)
    targets = np.zeros((len(wanted), len(labels)), np.float32)
    paths = []
    for row, image in enumerate(wanted):
        if image not in findings:
            raise DatasetLayoutError(f"{name}: image {image!r} of {os.fspath(list_file)} has no row in {entry}")
        if image not in location:
            raise _missing(name, f"image {image!r} (searched {', '.join(map(os.fspath, folders))})", root / image)
        paths.append(os.fspath(location[image] / image))
        for finding in str(findings[image]).split("|"):
            if not finding.strip():
                continue
            if _normalise(finding) not in index:
                raise ValueError(f"{name}: unknown finding {finding!r} for {image} in {entry}")
            targets[row, index[_normalise(finding)]] = 1.0
    return ClassificationSet(name, list(labels), paths, targets, wanted)
