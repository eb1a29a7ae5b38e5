"""JSRT with the SCR masks: lungs, heart and clavicles segmentation, reading the raw 12-bit .IMG files itself.

Layout (root = the folder passed to the loader): `All247images/*.IMG` (or `images/*.IMG|png`) + SCR
`fold{1,2}/masks/<class>/<id>.gif` (also under `scratch/` or `SCR/`). Split: `splits.csv` (id, split) if present,
else SCR fold2 -> test and fold1 -> train, with the fold1 ids whose SHA-1 bucket is below 20% -> val.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

from .containers import SegmentationSet
from .layout import (
    _first_existing,
    _hash_fraction,
    _list_images,
    _missing,
    _need_dir,
    _need_file,
    _splits_file,
    hash_split,
)
from .masks import _image_size, _read_binary_mask


JSRT_CLASSES = ["left lung", "right lung", "heart", "left clavicle", "right clavicle"]
JSRT_SIDE = 2048


def _read_jsrt_raw(path: str) -> np.ndarray:
    """JSRT .IMG (big-endian 12-bit, square, no header) -> float32 [H, W] in [0, 1], bone bright."""
    raw = np.fromfile(path, dtype=">u2")
    side = int(round(np.sqrt(raw.size)))
    if side * side != raw.size:
        raise ValueError(f"jsrt: {path} holds {raw.size} pixels, not a square raw image.")
    # JSRT stores optical density: 0 is white. Invert so that air is dark, as in every other dataset.
    return (1.0 - np.minimum(raw.reshape(side, side), 4095).astype(np.float32) / 4095.0).astype(np.float32)


def _jsrt_size(path: str) -> tuple[int, int]:
    if path.lower().endswith(".img"):
        side = int(round(np.sqrt(os.path.getsize(path) / 2)))
        return side, side
    return _image_size(path)


def _jsrt_split(image_id: str, fold: str) -> str:
    """SCR fold2 -> test; fold1 -> train, or val for ids whose SHA-1 bucket is below 0.2; no folds -> 70/10/20."""
    if fold == "fold2":
        return "test"
    if fold == "fold1":
        return "val" if _hash_fraction(image_id) < 0.2 else "train"
    return hash_split(image_id)


def _jsrt(root: Path) -> SegmentationSet:
    name = "jsrt"
    image_dir = _first_existing(name, [root / "All247images", root / "images", root / "jsrt"], "image folder", "dir")
    images = [p for p in _list_images(image_dir) if p.suffix.lower() in (".png",)]
    images += sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".img")
    by_id: dict[str, Path] = {}
    for image in images:
        if image.suffix.lower() == ".img" or image.stem not in by_id:
            by_id[image.stem] = image
    if not by_id:
        raise _missing(name, "JSRT images (*.IMG or *.png)", image_dir)
    ids = sorted(by_id)
    mask_roots = [d for d in (root, root / "scratch", root / "SCR", root / "scr") if d.is_dir()]
    fold_dirs: dict[str, Path] = {}
    for base in mask_roots:
        for fold in ("fold1", "fold2"):
            for candidate in (base / fold / "masks", base / fold):
                if fold not in fold_dirs and (candidate / JSRT_CLASSES[0]).is_dir():
                    fold_dirs[fold] = candidate
        if not fold_dirs and (base / "masks" / JSRT_CLASSES[0]).is_dir():
            fold_dirs["all"] = base / "masks"
    if not fold_dirs:
        raise _missing(name, f"SCR masks (fold1/masks/{JSRT_CLASSES[0]}/)", root / "fold1" / "masks" / JSRT_CLASSES[0])
    listing = {fold: {p.stem: p.suffix for p in (d / JSRT_CLASSES[0]).iterdir()} for fold, d in fold_dirs.items()}
    fold_of, suffix_of = {}, {}
    for image_id in ids:
        fold = next((f for f in fold_dirs if image_id in listing[f]), None)
        if fold is None:
            first = next(iter(fold_dirs.values()))
            raise _missing(name, "SCR mask", first / JSRT_CLASSES[0] / f"{image_id}.gif")
        fold_of[image_id], suffix_of[image_id] = fold, listing[fold][image_id]
    for cls in JSRT_CLASSES:
        for folder in fold_dirs.values():
            _need_dir(name, folder / cls, f"SCR mask folder {cls!r}")
    splits = _splits_file(name, root, ids)
    if splits is None:
        splits = [_jsrt_split(i, fold_of[i]) for i in ids]
    paths = [os.fspath(by_id[i]) for i in ids]

    def mask_reader(index: int) -> np.ndarray:
        image_id = ids[index]
        size = _jsrt_size(paths[index])
        folder = fold_dirs[fold_of[image_id]]
        masks = []
        for cls in JSRT_CLASSES:
            path = folder / cls / f"{image_id}{suffix_of[image_id]}"
            masks.append(_read_binary_mask(_need_file(name, path, f"{cls} mask"), size))
        return np.stack(masks)

    def image_reader(index: int) -> np.ndarray:
        path = paths[index]
        if path.lower().endswith(".img"):
            return _read_jsrt_raw(path)
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("L"))

    return SegmentationSet(name, list(JSRT_CLASSES), paths, splits, ids, mask_reader, image_reader)
