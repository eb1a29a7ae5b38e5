"""Finding inputs (folders, manifests, path lists) and decoding them in DataLoader workers without ever raising."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".csv", ".txt")
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")


@dataclass(frozen=True)
class InputItem:
    """One image to process: a stable `id` (unique within a run) and the file's `path`."""

    id: str
    path: str


def _read_manifest(manifest: Path) -> list[InputItem]:
    """A CSV (a path column, optional `id`) or TXT (one path a line) manifest; relative paths from its folder."""
    base = manifest.parent
    items: list[InputItem] = []
    if manifest.suffix.lower() == ".txt":
        for line in manifest.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line) if Path(line).is_absolute() else base / line
                items.append(InputItem(line, str(path)))
        return items
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        column = next((c for c in PATH_COLUMNS if c in fields), None)
        if column is None:
            raise ValueError(f"{manifest}: no image path column; expected one of {list(PATH_COLUMNS)}, got {fields}.")
        for row_number, row in enumerate(reader, start=2):
            value = (row.get(column) or "").strip()
            if not value:
                raise ValueError(f"{manifest}: row {row_number} has an empty {column!r} field.")
            path = Path(value) if Path(value).is_absolute() else base / value
            items.append(InputItem((row.get("id") or "").strip() or value, str(path)))
    return items


def discover_inputs(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputItem]:
    """Images to process, in a stable order.

    `source` is a folder (searched recursively for .png/.jpg/.jpeg/.dcm/.dicom; ids are paths relative to it), a
    .csv manifest (a `path`/`image`/`file` column, optional `id`), a .txt manifest (one path a line), a single image
    file, or a list of paths (ids are the paths as given). Duplicate ids are an error.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            items = [InputItem(p.relative_to(root).as_posix(), str(p)) for p in files]
        elif root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
            items = _read_manifest(root)
        elif root.is_file():
            items = [InputItem(root.name, str(root))]
        else:
            raise FileNotFoundError(f"{root}: no such file or folder.")
    else:
        items = [InputItem(os.fspath(p), os.fspath(p)) for p in source]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"duplicate input id {item.id!r} (path {item.path}); ids must be unique.")
        seen.add(item.id)
    return items


class ImageDataset(Dataset):
    """Decodes and preprocesses one image per item; a failure becomes an error record, never an exception.

    Each item is `{"index", "pixel_values" (float32 [3, H, W] or None), "error" (str or None)}`.
    """

    def __init__(self, items: Sequence[InputItem], image_processor: Any):
        self.items = list(items)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            array = self.image_processor.process_one(item.path, name=item.path)
        except (ValueError, OSError, ImportError) as error:  # the processor names the file in its message
            return {"index": index, "pixel_values": None, "error": str(error)}
        return {"index": index, "pixel_values": torch.from_numpy(array), "error": None}


@dataclass
class Batch:
    """A collated batch: the decoded images and the failures, both by dataset index."""

    indices: list[int]
    pixel_values: torch.Tensor | None
    failed: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-lock the pixels for asynchronous host-to-device copies."""
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


def collate(records: list[dict[str, Any]]) -> Batch:
    """Stack the images that decoded; keep the errors of those that did not."""
    good = [r for r in records if r["error"] is None]
    pixels = torch.stack([r["pixel_values"] for r in good]) if good else None
    return Batch([r["index"] for r in good], pixels, [(r["index"], r["error"]) for r in records if r["error"]])


def make_loader(
    items: Sequence[InputItem], image_processor: Any, batch_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """Ordered DataLoader of `Batch`es; decoding runs in `num_workers` processes (0: in this one)."""
    return DataLoader(
        ImageDataset(items, image_processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


__all__ = ["IMAGE_SUFFIXES", "Batch", "ImageDataset", "InputItem", "collate", "discover_inputs", "make_loader"]
