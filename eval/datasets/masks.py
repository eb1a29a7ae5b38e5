"""Segmentation mask encodings: mask images (GIF/PNG), the SIIM-ACR run-length codec and polygon rasterising.

Masks are bool arrays [H, W]; sizes are PIL's (width, height).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    with PIL.Image.open(path) as image:
        return image.size


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W] mask -> bool mask at `size` = (width, height), nearest neighbour."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    image = PIL.Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize(size, PIL.Image.Resampling.NEAREST)) > 127


def _read_binary_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image (GIF/PNG, any mode) -> bool [H, W] (nonzero = foreground), resized to `size` if given."""
    with PIL.Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    return mask if size is None else _resize_mask(mask, size)


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """SIIM-ACR run-length string -> bool [height, width].

    The SIIM convention: pixels are numbered column by column (the transposed image, row-major), each pair is
    (offset from the end of the previous run, run length), and '-1' or an empty string means an empty mask.
    """
    flat = np.zeros(height * width, dtype=bool)
    text = str(rle).strip()
    if text in ("", "-1"):
        return flat.reshape(height, width)
    numbers = np.asarray(text.split(), dtype=np.int64)
    position = 0
    for offset, length in zip(numbers[0::2], numbers[1::2]):
        position += int(offset)
        flat[position : position + int(length)] = True
        position += int(length)
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """Bool [H, W] -> SIIM-ACR relative run-length string ('-1' when empty); the inverse of `rle_decode`."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    if not flat.any():
        return "-1"
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    previous_end = np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s - p} {e - s}" for s, e, p in zip(starts, ends, previous_end))


def _rasterise_polygons(polygons: Sequence[object], size: tuple[int, int]) -> np.ndarray:
    """Polygons (lists of {'x','y'} dicts or [x, y] pairs) -> bool [H, W] at `size` = (width, height)."""
    canvas = PIL.Image.new("L", size, 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = []
        for point in polygon if isinstance(polygon, list) else []:
            if isinstance(point, dict):
                points.append((float(point["x"]), float(point["y"])))
            else:
                points.append((float(point[0]), float(point[1])))
        if len(points) >= 3:
            draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas) > 0
