"""Images in, pixel values out, for every program: finding inputs (folders, manifests, path lists), decoding them in
DataLoader workers, and one error policy.

The policy: one input never sinks a batch. Any exception raised while reading, decoding or preprocessing one input
(`DECODE_ERRORS`: every `Exception`, `MemoryError` included; never `KeyboardInterrupt` or `SystemExit`) becomes that
input's error record, in the DataLoader workers as in the main process; the caller reports it (`errors.csv`) and
goes on. The message names the input: the image processor's own failures are `ValueError`s that name it; any other
type (a decoder's `AssertionError` or `NotImplementedError`, a `MemoryError`, a bug) is reported with its type,
"PATH: cannot decode (AssertionError: ...)", and its traceback is logged at debug level (`chexficient -v`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset

from .manifests import DEFAULT_ENCODING, check_unique_ids, encoding_error, text_codec


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".csv", ".txt")
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")
# what one input may raise and be reported for, the run going on: anything but an interrupt or an exit
DECODE_ERRORS: tuple[type[Exception], ...] = (Exception,)


@dataclass(frozen=True)
class InputItem:
    """One image to process: a stable `id` (unique within a run), the file's `path`, and its report `text` when a
    manifest's text column was asked for."""

    id: str
    path: str
    text: str | None = None


# ----- decoding --------------------------------------------------------------------------------------------------


def preprocess_image(image_processor: Any, source: Any, name: str) -> np.ndarray:
    """One image -> pixel values [3, H, W] float32 with the model's image processor.

    CheXficient's processor decodes every format itself. Any other HF image processor gets the image decoded by
    CheXficient's loader (PNG, JPEG, 16-bit, DICOM) and converted to 8-bit RGB first.
    """
    if hasattr(image_processor, "process_one"):
        return image_processor.process_one(source, name=name)
    from image_processing_chexficient import load_image

    image = load_image(source, name)
    if not isinstance(image, PIL.Image.Image):  # float array in [0, 1] from high-bit-depth data
        image = PIL.Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).squeeze())
    return image_processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]


def decode_error_message(error: BaseException, name: str) -> str:
    """The error record of an input that failed with `error`: the processor's `ValueError` as it is (it names the
    input), any other type with its type; always naming the input `name`."""
    text = str(error).strip()
    if isinstance(error, ValueError):
        message = text or type(error).__name__
    else:
        message = f"cannot decode ({type(error).__name__}{': ' + text if text else ''})"
        logger.debug("%s: %s", name, message, exc_info=error)
    return message if name and name in message else f"{name}: {message}"


def decode_image(image_processor: Any, source: Any, name: str) -> tuple[np.ndarray | None, str | None]:
    """(pixel values [3, H, W], None), or (None, the reason naming `name`) for an input that raised anything
    (`DECODE_ERRORS`)."""
    try:
        return np.asarray(preprocess_image(image_processor, source, name), dtype=np.float32), None
    except DECODE_ERRORS as error:
        return None, decode_error_message(error, name)


# ----- finding inputs --------------------------------------------------------------------------------------------


def _read_input_manifest(
    manifest: Path, text_column: str | None = None, encoding: str | None = DEFAULT_ENCODING
) -> tuple[list[InputItem], list[int], str]:
    """(items, the row or line number of each, "rows" or "lines") of a CSV (a path column, optional `id` and
    `text_column`) or TXT (one path a line) manifest in `encoding`; relative paths from its folder."""
    base = manifest.parent
    if text_column is not None and manifest.suffix.lower() != ".csv":
        raise ValueError(f"{manifest}: a text column needs a .csv manifest.")
    codec = text_codec(encoding)
    items: list[InputItem] = []
    numbers: list[int] = []
    try:
        if manifest.suffix.lower() == ".txt":
            for number, line in enumerate(manifest.read_text(encoding=codec).splitlines(), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    path = Path(line) if Path(line).is_absolute() else base / line
                    items.append(InputItem(line, str(path)))
                    numbers.append(number)
            return items, numbers, "lines"
        with manifest.open(newline="", encoding=codec) as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            column = next((c for c in PATH_COLUMNS if c in fields), None)
            if column is None:
                raise ValueError(
                    f"{manifest}: no image path column; expected one of {list(PATH_COLUMNS)}, got {fields}."
                )
            if text_column is not None and text_column not in fields:
                raise ValueError(f"{manifest}: no text column {text_column!r}; its columns are {fields}.")
            for row_number, row in enumerate(reader, start=2):
                value = (row.get(column) or "").strip()
                if not value:
                    raise ValueError(f"{manifest}: row {row_number} has an empty {column!r} field.")
                path = Path(value) if Path(value).is_absolute() else base / value
                text = " ".join((row.get(text_column) or "").split()) if text_column is not None else None
                items.append(InputItem((row.get("id") or "").strip() or value, str(path), text))
                numbers.append(row_number)
    except UnicodeDecodeError as error:
        raise encoding_error(manifest, encoding, error) from error
    return items, numbers, "rows"


def discover_inputs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    text_column: str | None = None,
    encoding: str | None = DEFAULT_ENCODING,
) -> list[InputItem]:
    """Images to process, in a stable order.

    `source` is a folder (searched recursively for .png/.jpg/.jpeg/.dcm/.dicom; ids are paths relative to it), a
    .csv manifest (a `path`/`image`/`file` column, optional `id`, and `text_column` when given), a .txt manifest (one
    path a line), a single image file, or a list of paths (ids are the paths as given). Manifests are read as
    `encoding` text (UTF-8 by default); one that is not is a ValueError naming the file and the line of its first bad
    byte. Duplicate ids are an error naming them (`check_unique_ids`, the check `chexficient curate` makes too).
    """
    if text_column is not None and not (
        isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".csv"
    ):
        raise ValueError(f"--text-column {text_column!r} reads report texts from a .csv manifest, not {source!r}.")
    where, numbers, unit = "the inputs", None, "items"
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        where = str(root)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            items = [InputItem(p.relative_to(root).as_posix(), str(p)) for p in files]
        elif root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
            items, numbers, unit = _read_input_manifest(root, text_column, encoding)
        elif root.is_file():
            items = [InputItem(root.name, str(root))]
        else:
            raise FileNotFoundError(f"{root}: no such file or folder.")
    else:
        items = [InputItem(os.fspath(p), os.fspath(p)) for p in source]
    check_unique_ids([item.id for item in items], where, numbers, unit)
    return items


# ----- dataset and loader ----------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Decodes and preprocesses one image per item; a failure becomes an error record, never an exception.

    `items` are `InputItem`s or paths. With `reader`, the source of item i is `reader(i)` (raw bytes, an array, ...)
    and the item only names it. Each record is `{"index", "pixel_values" (float32 tensor [3, H, W] or None),
    "error" (str or None)}`.
    """

    def __init__(
        self,
        items: Sequence[InputItem | str | os.PathLike],
        image_processor: Any,
        reader: Callable[[int], Any] | None = None,
    ):
        self.items = [
            item if isinstance(item, InputItem) else InputItem(os.fspath(item), os.fspath(item)) for item in items
        ]
        self.image_processor = image_processor
        self.reader = reader

    def __len__(self) -> int:
        return len(self.items)

    # the record's image fields of an item that failed; a subclass that decodes to other fields names its own
    failed_fields: dict[str, Any] = {"pixel_values": None}

    def decode(self, source: Any, name: str) -> dict[str, Any]:
        """The record's image fields of one source; raises for an unreadable input (anything: `DECODE_ERRORS`)."""
        pixels = preprocess_image(self.image_processor, source, name)
        return {"pixel_values": torch.from_numpy(np.asarray(pixels, dtype=np.float32))}

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            source = self.reader(index) if self.reader is not None else item.path
            return {"index": index, **self.decode(source, item.path), "error": None}
        except DECODE_ERRORS as error:  # in a DataLoader worker too: one input's failure is its own record
            return {"index": index, **self.failed_fields, "error": decode_error_message(error, item.path)}


@dataclass
class ImageBatch:
    """A collated batch: the decoded images and the failures, both by dataset index."""

    indices: list[int]
    pixel_values: torch.Tensor | None
    failed: list[tuple[int, str]]

    def pin_memory(self) -> ImageBatch:
        """Called by DataLoader(pin_memory=True): page-lock the pixels for asynchronous host-to-device copies."""
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


def collate_images(records: list[dict[str, Any]]) -> ImageBatch:
    """Stack the images that decoded; keep the errors of those that did not."""
    good = [r for r in records if r["error"] is None]
    pixels = torch.stack([r["pixel_values"] for r in good]) if good else None
    return ImageBatch([r["index"] for r in good], pixels, [(r["index"], r["error"]) for r in records if r["error"]])


def make_image_loader(
    items: Sequence[InputItem | str | os.PathLike],
    image_processor: Any,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    reader: Callable[[int], Any] | None = None,
) -> DataLoader:
    """Ordered DataLoader of `ImageBatch`es; decoding runs in `num_workers` processes (0: in this one)."""
    dataset = ImageDataset(items, image_processor, reader)
    return ordered_loader(dataset, collate_images, batch_size, num_workers, pin_memory)


def ordered_loader(
    dataset: Dataset, collate_fn: Callable, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader that keeps the dataset's order (results are matched back to inputs by index)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


__all__ = [
    "DECODE_ERRORS",
    "IMAGE_SUFFIXES",
    "ImageBatch",
    "ImageDataset",
    "InputItem",
    "collate_images",
    "decode_error_message",
    "decode_image",
    "discover_inputs",
    "make_image_loader",
    "ordered_loader",
    "preprocess_image",
]
