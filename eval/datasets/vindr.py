"""VinDr: VinDr-CXR and VinDr-PCXR classification, and VinDr-RibCXR rib segmentation (20 ribs, polygons).

Layouts (root = the folder passed to the loader):
- vindr_cxr / vindr_pcxr: `image_labels_{split}.csv` in root or root/annotations; images `{split}_png/<id>.png`
  or `{split}/<id>.dicom`. Several reader rows per image are merged by any-positive.
- vindr_ribcxr: `{train,val,test}/img/*.png` + `{split}/Vindr_RibCXR_{split}_mask.json` (also under root/data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from chexficient.data.labels import LABELS

from .containers import ClassificationSet, DatasetLayoutError, SegmentationSet
from .layout import (
    _SPLITS,
    _check_split,
    _first_existing,
    _label_columns,
    _missing,
    _need_dir,
    _read_csv,
    _targets,
)
from .masks import _image_size, _rasterise_polygons


RIBCXR_CLASSES = [f"R{i}" for i in range(1, 11)] + [f"L{i}" for i in range(1, 11)]


def _vindr(name: str, root: Path, split: str) -> ClassificationSet:
    _check_split(name, split, ("test", "train"))
    labels = LABELS[name]
    filename = f"image_labels_{split}.csv"
    csv = _first_existing(name, [root / filename, root / "annotations" / filename], filename)
    frame = _read_csv(name, csv, ("image_id",), str_columns=("image_id",))
    columns = _label_columns(name, frame, labels, csv)
    # Training images carry one row per radiologist: a finding is positive if any reader marked it.
    values = frame[["image_id"]].copy()
    values[columns] = _targets(frame, columns)
    merged = values.groupby("image_id", sort=False)[columns].max()
    ids = [str(i) for i in merged.index]
    png_dir, dicom_dir = root / f"{split}_png", root / split
    if png_dir.is_dir():
        paths = [os.fspath(png_dir / f"{i}.png") for i in ids]
    elif dicom_dir.is_dir():
        suffix = ".dicom"
        if ids and not (dicom_dir / f"{ids[0]}.dicom").exists():
            suffix = next((s for s in (".dcm", ".png") if (dicom_dir / f"{ids[0]}{s}").exists()), ".dicom")
        paths = [os.fspath(dicom_dir / f"{i}{suffix}") for i in ids]
    else:
        raise DatasetLayoutError(
            f"{name}: missing image folder; looked for {os.fspath(png_dir)}, {os.fspath(dicom_dir)}"
        )
    if paths and not os.path.exists(paths[0]):
        raise _missing(name, "image", paths[0])
    return ClassificationSet(name, list(labels), paths, merged.to_numpy(np.float32), ids)


def _vindr_cxr(root: Path, split: str = "test") -> ClassificationSet:
    return _vindr("vindr_cxr", root, split)


def _vindr_pcxr(root: Path, split: str = "test") -> ClassificationSet:
    return _vindr("vindr_pcxr", root, split)


def _ribcxr(root: Path) -> SegmentationSet:
    name = "vindr_ribcxr"
    base = root / "data" if (root / "data").is_dir() and not (root / "train").is_dir() else root
    paths: list[str] = []
    splits: list[str] = []
    ids: list[str] = []
    polygons: list[list[list[object]]] = []
    found_any = False
    for split in _SPLITS:
        folder = base / split
        if not folder.is_dir():
            continue
        found_any = True
        image_dir = _need_dir(name, folder / "img", "image folder")
        filename = f"Vindr_RibCXR_{split}_mask.json"
        annotation = _first_existing(name, [folder / filename, root / "Annotations" / split / filename], filename)
        data = json.loads(annotation.read_text())
        if "img" not in data:
            raise DatasetLayoutError(f"{name}: missing key 'img' in {os.fspath(annotation)}")
        for rib in RIBCXR_CLASSES:
            if rib not in data:
                raise DatasetLayoutError(f"{name}: missing key {rib!r} in {os.fspath(annotation)}")
        for key in sorted(data["img"], key=lambda k: int(k) if str(k).isdigit() else str(k)):
            image = image_dir / PurePosixPath(str(data["img"][key]).replace("\\", "/")).name
            if not image.is_file():
                raise _missing(name, "image", image)
            paths.append(os.fspath(image))
            splits.append(split)
            ids.append(image.stem)
            # A missing or null rib is an empty mask; a rib is one polygon (list of points).
            polygons.append([[data[rib].get(key)] if data[rib].get(key) else [] for rib in RIBCXR_CLASSES])
    if not found_any:
        raise _missing(name, "split folders train/val/test", base / "train")

    def mask_reader(index: int) -> np.ndarray:
        size = _image_size(paths[index])
        return np.stack([_rasterise_polygons(rib, size) for rib in polygons[index]])

    return SegmentationSet(name, list(RIBCXR_CLASSES), paths, splits, ids, mask_reader)
