"""Device-side preprocessing: decode in DataLoader workers, resize / crop / normalise on the GPU.

The CPU path (`chexficient.data.images`) runs the whole image processor in the workers and ships float32 pixel values
[3, 378, 378]. This path stops the workers after decoding: each image travels as its decoded integer array [C, H, W]
(uint8 for 8-bit files, 16-bit for 16-bit PNG and DICOM, whose windowed [0, 1] values are quantised to 1/65535),
half or less of the float32 bytes of the same image, and the engine's device runs
`CheXficientImageProcessor.preprocess_tensor` (antialiased bicubic resize, centre crop, normalisation) on whole
groups of same-size images at once. On a GPU this takes the resize, the costliest step of the CPU pipeline, off the
decode workers.

The numbers differ slightly from the PIL pipeline (torch's antialiased bicubic is not PIL's filter bit for bit; a
test bounds the embedding difference). The error policy is the CPU path's: an input that cannot be decoded becomes
an error record (`chexficient.data.images.DECODE_ERRORS`), reported by the caller and skipped.

16-bit data travels as int16 (the same bits; torch's uint16 has few kernels, CUDA's even fewer) and is widened back
to unsigned on the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader

from ..data.images import ImageDataset, InputItem, ordered_loader


PREPROCESS_MODES = ("cpu", "gpu")
# Images per `preprocess_tensor` call: bounds the float32 working set of very large radiographs on the device.
DEFAULT_CHUNK_IMAGES = 32


def decode_raw(image_processor: Any, source: Any, name: str) -> np.ndarray:
    """One image -> its decoded pixels [C, H, W] (C 1 or 3) as uint8 (8-bit inputs) or uint16 (anything deeper).

    Decoding is the image processor's (`load_image`: PNG, JPEG, 16-bit, DICOM with its LUTs and windows, the pixel
    budget); nothing is resized here.
    """
    if hasattr(image_processor, "load_image"):
        image = image_processor.load_image(source, name)
    else:  # another HF image processor: CheXficient's decoder, the default pixel budget
        from image_processing_chexficient import load_image

        image = load_image(source, name)
    if isinstance(image, PIL.Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.uint8)
    else:  # float32 [H, W, C] in [0, 1] from 16-bit PNG or DICOM
        array = np.asarray(image, dtype=np.float32)
        array = np.rint(np.clip(array, 0.0, 1.0) * 65535.0).astype(np.uint16)
    if array.ndim == 2:
        array = array[..., None]
    array = np.ascontiguousarray(array.transpose(2, 0, 1))
    return array if array.flags.writeable else array.copy()  # PIL's buffer is read-only; torch wants to own it


class RawImageDataset(ImageDataset):
    """Decodes one image per item to its integer pixels; a failure becomes an error record, never an exception.

    Takes the same arguments as `ImageDataset`. Records are `{"index", "image" (uint8 or int16 tensor [C, H, W], or
    None), "bits" (8 or 16), "error"}`.
    """

    failed_fields = {"image": None, "bits": 0}

    def decode(self, source: Any, name: str) -> dict[str, Any]:
        array = decode_raw(self.image_processor, source, name)
        if array.dtype == np.uint16:
            return {"image": torch.from_numpy(array.view(np.int16)), "bits": 16}
        return {"image": torch.from_numpy(array), "bits": 8}


@dataclass
class RawImageGroup:
    """Images of one shape and bit depth: `positions` [n] (long) into the batch's `indices`, `images` [n, C, H, W].

    Both are built in the DataLoader workers and pinned together, so the device gets its row indices by an
    asynchronous copy too."""

    positions: torch.Tensor
    images: torch.Tensor
    bits: int


@dataclass
class RawImageBatch:
    """A collated batch of decoded (not yet preprocessed) images, grouped by shape; failures by dataset index.

    `indices` lists the decoded images in batch order, like `chexficient.data.images.ImageBatch`.
    """

    indices: list[int]
    groups: list[RawImageGroup]
    failed: list[tuple[int, str]]

    def pin_memory(self) -> RawImageBatch:
        """Called by DataLoader(pin_memory=True): page-lock the decoded pixels and their row indices for
        asynchronous copies."""
        for group in self.groups:
            group.images = group.images.pin_memory()
            group.positions = group.positions.pin_memory()
        return self


def collate_raw_images(records: list[dict[str, Any]]) -> RawImageBatch:
    """Group the decoded images by (channels, height, width, bit depth); keep the errors of those that failed."""
    good = [r for r in records if r["error"] is None]
    buckets: dict[tuple[int, ...], list[int]] = {}
    for position, record in enumerate(good):
        buckets.setdefault((*record["image"].shape, record["bits"]), []).append(position)
    groups = [
        RawImageGroup(
            torch.tensor(positions, dtype=torch.long), torch.stack([good[p]["image"] for p in positions]), key[-1]
        )
        for key, positions in buckets.items()
    ]
    failed = [(r["index"], r["error"]) for r in records if r["error"] is not None]
    return RawImageBatch([r["index"] for r in good], groups, failed)


def make_raw_image_loader(
    items: Sequence[InputItem | str | os.PathLike],
    image_processor: Any,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    reader: Callable[[int], Any] | None = None,
) -> DataLoader:
    """Ordered DataLoader of `RawImageBatch`es; decoding runs in `num_workers` processes (0: in this one)."""
    dataset = RawImageDataset(items, image_processor, reader)
    return ordered_loader(dataset, collate_raw_images, batch_size, num_workers, pin_memory)


def to_unit_float(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Device-side: 16-bit data (carried as int16) -> float32 in [0, 1]; 8-bit data is left as uint8, which
    `preprocess_tensor` rescales itself."""
    if bits == 8:
        return images
    if bits != 16:
        raise ValueError(f"unsupported bit depth {bits}.")
    unsigned = images.to(torch.int32).bitwise_and_(0xFFFF)  # int16 -> the original uint16 values
    return unsigned.to(torch.float32).div_(65535.0)


def preprocess_raw_batch(
    image_processor: Any,
    batch: RawImageBatch,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
) -> torch.Tensor | None:
    """Pixel values [len(batch.indices), 3, crop_h, crop_w] on `device` in `dtype`, in the batch's order; None when
    nothing in the batch decoded. Copies are asynchronous from pinned memory; each shape group is preprocessed in
    chunks of at most `chunk_images` images."""
    if not batch.indices:
        return None
    out: torch.Tensor | None = None
    for group in batch.groups:
        images = group.images.to(device, non_blocking=True)
        positions = group.positions.to(device, non_blocking=True)
        for begin in range(0, images.shape[0], chunk_images):
            chunk = to_unit_float(images[begin : begin + chunk_images], group.bits)
            pixels = image_processor.preprocess_tensor(chunk)
            if out is None:
                out = torch.empty((len(batch.indices), *pixels.shape[1:]), device=device, dtype=dtype)
            elif pixels.shape[1:] != out.shape[1:]:
                raise ValueError(
                    f"images of one batch preprocess to different shapes ({tuple(pixels.shape[1:])} vs "
                    f"{tuple(out.shape[1:])}); keep the image processor's centre crop on."
                )
            out.index_copy_(0, positions[begin : begin + chunk_images], pixels.to(dtype))
    return out


__all__ = [
    "DEFAULT_CHUNK_IMAGES",
    "PREPROCESS_MODES",
    "RawImageBatch",
    "RawImageDataset",
    "RawImageGroup",
    "collate_raw_images",
    "decode_raw",
    "make_raw_image_loader",
    "preprocess_raw_batch",
    "to_unit_float",
]
