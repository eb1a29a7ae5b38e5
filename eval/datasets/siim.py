"""SIIM-ACR pneumothorax: binary classification (any non-empty RLE) and segmentation (the RLE masks).

Layouts (root = the folder passed to the loader):
- classification: RLE CSV (`train-rle*.csv` or `stage_2_train.csv`; ImageId, EncodedPixels) +
  `png-images-{split}[-512]/`.
- segmentation: RLE CSV + `png-images-{train,val,test}[-512]/` (split from the folder) or `png_images/` (split from
  `splits.csv`, else by SHA-1 bucket 70/10/20). The RLE canvas is 1024x1024; masks are resized to the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chexficient.data.labels import LABELS

from .containers import ClassificationSet, DatasetLayoutError, SegmentationSet
from .layout import _SPLITS, _check_split, _first_existing, _list_images, _missing, _read_csv, _splits_file, hash_split
from .masks import _image_size, _resize_mask, rle_decode


# SIIM-ACR encodes masks on the 1024 x 1024 DICOM grid (height, width).
SIIM_RLE_SHAPE = (1024, 1024)
_SIIM_CSVS = ("train-rle_zhihong.csv", "train-rle.csv", "stage_2_train.csv")


def _siim_rle_table(name: str, root: Path) -> tuple[Path, dict[str, list[str]]]:
    """ImageId -> its RLE strings ('-1' = no pneumothorax), from the first SIIM RLE CSV found."""
    csv = _first_existing(name, [root / f for f in _SIIM_CSVS], "RLE CSV")
    frame = _read_csv(name, csv, ("ImageId", "EncodedPixels"), str_columns=("ImageId", "EncodedPixels"))
    table: dict[str, list[str]] = {}
    for image_id, rle in zip(frame["ImageId"].str.strip(), frame["EncodedPixels"].fillna("-1")):
        table.setdefault(image_id, []).append(str(rle).strip())
    return csv, table


def _siim_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split in _SPLITS:
        for folder in (f"png-images-{split}-512", f"png-images-{split}", f"{split}_png"):
            if (root / folder).is_dir():
                found[split] = root / folder
                break
    return found


def _siim_images(name: str, folder: Path, table: dict[str, list[str]], csv: Path) -> list[Path]:
    images = _list_images(folder)
    for image in images:
        if image.stem not in table:
            raise DatasetLayoutError(f"{name}: image {os.fspath(image)} has no row in {os.fspath(csv)}")
    return images


def _siim_ptx(root: Path, split: str = "test") -> ClassificationSet:
    name = "siim_ptx"
    _check_split(name, split, _SPLITS)
    csv, table = _siim_rle_table(name, root)
    folder = _siim_split_dirs(root).get(split)
    if folder is None:
        raise _missing(
            name, f"image folder png-images-{split}-512 (or png-images-{split})", root / f"png-images-{split}-512"
        )
    images = _siim_images(name, folder, table, csv)
    targets = np.array([[float(any(r != "-1" for r in table[p.stem]))] for p in images], np.float32).reshape(-1, 1)
    return ClassificationSet(
        name, list(LABELS[name]), [os.fspath(p) for p in images], targets, [p.stem for p in images]
    )


def _siim_segmentation(root: Path) -> SegmentationSet:
    name = "siim_ptx"
    csv, table = _siim_rle_table(name, root)
    split_dirs = _siim_split_dirs(root)
    images: list[Path] = []
    splits: list[str] = []
    if split_dirs:
        for split, folder in split_dirs.items():
            found = _siim_images(name, folder, table, csv)
            images += found
            splits += [split] * len(found)
    else:
        folder = _first_existing(
            name,
            [root / "png_images", root / "images", root / "png-images", root / "png-images-512"],
            "image folder (png-images-{train,val,test}[-512] or png_images)",
            "dir",
        )
        images = _siim_images(name, folder, table, csv)
        ids = [p.stem for p in images]
        splits = _splits_file(name, root, ids) or [hash_split(i) for i in ids]
    paths = [os.fspath(p) for p in images]
    ids = [p.stem for p in images]

    def mask_reader(index: int) -> np.ndarray:
        mask = np.zeros(SIIM_RLE_SHAPE, dtype=bool)
        for rle in table[ids[index]]:
            mask |= rle_decode(rle, *SIIM_RLE_SHAPE)
        return _resize_mask(mask, _image_size(paths[index]))[None]

    return SegmentationSet(name, ["Pneumothorax"], paths, splits, ids, mask_reader)
