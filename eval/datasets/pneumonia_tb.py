"""Single-label binary sets: Pneumonia 2017 (pediatric, NORMAL vs PNEUMONIA) and TBX11K (tuberculosis vs not).

Layouts (root = the folder passed to the loader):
- pneumonia2017: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*` (root may also be chest_xray or one split).
- tbx11k: `lists/TBX11K_{train,val}.txt` + `imgs/<line>`; "test" reads the val list (test labels are not public).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import numpy as np

from chexficient.data.labels import LABELS

from .containers import ClassificationSet
from .layout import _SPLITS, _check_split, _first_existing, _list_images, _missing, _need_dir, _need_file


def _pneumonia2017(root: Path, split: str = "test") -> ClassificationSet:
    name = "pneumonia2017"
    _check_split(name, split, _SPLITS)
    if (root / "NORMAL").is_dir() and (root / "PNEUMONIA").is_dir():
        folder = root
    else:
        folder = _first_existing(name, [root / "chest_xray" / split, root / split], f"{split} folder", kind="dir")
    paths, targets, ids = [], [], []
    for cls, target in (("NORMAL", 0.0), ("PNEUMONIA", 1.0)):
        for image in _list_images(_need_dir(name, folder / cls, f"{cls} folder")):
            paths.append(os.fspath(image))
            targets.append([target])
            ids.append(f"{cls}/{image.stem}")
    return ClassificationSet(name, list(LABELS[name]), paths, np.array(targets, np.float32).reshape(-1, 1), ids)


def _tbx11k(root: Path, split: str = "test") -> ClassificationSet:
    name = "tbx11k"
    _check_split(name, split, ("test", "val", "train"))
    list_file = _need_file(name, root / "lists" / f"TBX11K_{'train' if split == 'train' else 'val'}.txt", "list")
    images = _need_dir(name, root / "imgs", "image folder")
    lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    targets = []
    for line in lines:
        category = line.split("/", 1)[0].lower()
        if category not in ("tb", "health", "sick"):
            raise ValueError(f"{name}: line {line!r} of {os.fspath(list_file)} is not tb/, health/ or sick/.")
        targets.append([float(category == "tb")])
    paths = [os.fspath(images / line) for line in lines]
    if paths and not os.path.exists(paths[0]):
        raise _missing(name, "image", paths[0])
    ids = [str(PurePosixPath(line).with_suffix("")) for line in lines]
    return ClassificationSet(name, list(LABELS[name]), paths, np.array(targets, np.float32).reshape(-1, 1), ids)
