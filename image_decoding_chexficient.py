"""CheXficient image decoding: PNG, JPEG, 8- and 16-bit, DICOM, raw bytes, PIL images, arrays and tensors to arrays.

Travels with the weights next to `image_processing_chexficient.py`, which turns what is decoded here into
`pixel_values`. A decoded image is an 8-bit PIL image ("L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1];
high-bit-depth data (16-bit PNG, DICOM) is never clipped to 8 bits.

Decoding is defensive; every limit is checked from the file's header, before any pixel data is decoded:
- a pixel budget (`max_image_pixels`, 60 MP by default) on the decoded image and, when the caller resizes, on the
  resized one; an aspect-ratio limit (`max_aspect_ratio`, 20:1 by default), since a thin image resized to a short
  side of 378 px is huge; images Pillow only warns about as possible decompression bombs are refused;
- DICOM: deflated data is inflated in bounded pieces, never beyond what Rows x Columns x frames x samples x bytes
  and a small margin account for; the file itself may not be much larger than that; parsing is bounded in reads;
- truncated files are errors even where `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is set, and so are JPEGs whose scan
  data stops early (an end-of-image marker appended to a cut file included) and PNGs whose data ends early;
- non-finite pixel values (a DICOM rescale or window that overflows or divides by zero) are errors;
- only `IMAGE_FORMATS` are read with Pillow, always in that order, so that no decode depends on what was opened
  before in the same process; a multi-frame file gives its first frame, with a warning (multi-frame DICOM is
  refused: it is a volume or a series, not a radiograph).
Every failure is a `ValueError` (or a subclass) naming the file; decoders' own exceptions are converted at the
boundary. DICOM goes through the modality LUT, then the VOI LUT or window; pydicom is imported on first use.
Compressed DICOM needs the decoders of `pip install "pylibjpeg[all]"` (JPEG Lossless, JPEG-LS, 12-bit JPEG,
JPEG 2000).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageFile
import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# Largest image decoded, in pixels (width x height, times frames for DICOM): a 43 x 43 cm detector at 0.1 mm is about
# 18.5 MP, so 60 MP leaves headroom while refusing decompression bombs. `None` disables the check (Pillow's own
# `PIL.Image.MAX_IMAGE_PIXELS` still applies to PNG/JPEG).
DEFAULT_MAX_IMAGE_PIXELS = 60_000_000
# Largest ratio of an image's long side to its short side. Chest radiographs are within 1:2, long-leg and spine
# stitches within about 1:5; beyond 20:1 the resize to the model's short side (378 px) allocates the long side in
# proportion (a 1 x 20000 PNG of 122 bytes became 378 x 7,560,000 pixels). `None` disables the check.
DEFAULT_MAX_ASPECT_RATIO = 20.0
# The formats Pillow may read, tried in this order (each identified by its own signature). A fixed list keeps every
# decode independent of what was opened before: Pillow's default order is the order in which its plugins were
# imported, and formats without a signature (TGA, ...) claim files meant for others once imported.
IMAGE_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "GIF", "WEBP", "PPM")
# Decoders for compressed DICOM transfer syntaxes that pydicom and Pillow do not cover.
DICOM_DECODERS_HINT = 'pip install "pylibjpeg[all]"'
_JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}  # JPEG, JPEG Lossless, JPEG-LS
_J2K_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 201, 202, 203)}  # JPEG 2000, HTJ2K
_JPEG_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: gray, RGB, palette, gray + alpha, RGBA
_ADAM7_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_BLOCK_PIXELS = 1 << 18  # DICOM values are mapped in float64 blocks of this many pixels, written into float32
_DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the dataset is one deflate stream
_EXPLICIT_SYNTAX = b"1.2.840.10008.1.2.1\x00"  # Explicit VR Little Endian, padded to an even length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # float, double and integer pixel data
_DICOM_META_LIMIT = 1 << 20  # bytes read for the File Meta Information
# A deflated dataset is inflated up to its pixel data within _DICOM_HEADER_LIMIT bytes, and then up to its pixel bytes
# (Rows x Columns x frames x samples x bytes) and _DICOM_TRAILER_LIMIT more; beyond either it is refused. A file
# (deflated or not) may hold at most _DICOM_SIZE_MARGIN bytes beyond twice its pixel bytes.
_DICOM_HEADER_LIMIT = 16 << 20
_DICOM_TRAILER_LIMIT = 1 << 20
_DICOM_SIZE_MARGIN = 64 << 20
# Reads pydicom may make to parse one DICOM (about two per element): bounds the parse time of a file made of
# millions of empty elements (a 30 MB one took 19 s of CPU) to well under a second.
_DICOM_MAX_READS = 100_000
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # a marker, not a stuffed 0xFF or a restart marker
_JPEG_PADDING = b"\x00" * 16  # see `_complete_jpeg`

ImageSource = str | os.PathLike | bytes | PIL.Image.Image | np.ndarray | torch.Tensor
# A decoded image: an 8-bit PIL image (mode "L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1].
DecodedImage = PIL.Image.Image | np.ndarray


def describe_source(source: Any, name: str | None = None) -> str:
    """How errors name an input: `name` if given, else the path, else the type (and shape) of the object."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"{type(source).__name__} of shape {tuple(source.shape)}"
    return type(source).__name__


def _is_dicom_bytes(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


class ImageTooLargeError(ValueError):
    """An image whose header promises more pixels than the budget (`max_image_pixels`), before or after the resize,
    or than Pillow's decompression-bomb threshold allows, or a DICOM whose (inflated) data exceeds what its header
    accounts for; raised before the pixel data is decoded. Also raised for running out of memory decoding."""


class ImageAspectRatioError(ImageTooLargeError):
    """An image thinner than `max_aspect_ratio` allows (long side / short side), refused from its header: resized to
    the model's short side, its long side would grow in proportion."""


def check_pixel_budget(width: int, height: int, where: str, max_pixels: int | None, frames: int = 1) -> None:
    """Raise `ImageTooLargeError` naming `where` when width x height (x frames) exceeds `max_pixels` (None: no
    limit)."""
    pixels = int(width) * int(height) * int(frames)
    if max_pixels is None or pixels <= max_pixels:
        return
    size = f"{width}x{height}" + (f"x{frames} frames" if frames != 1 else "")
    raise ImageTooLargeError(
        f"{where}: {size} = {pixels / 1e6:.1f} MP exceeds the {max_pixels / 1e6:.1f} MP limit (max_image_pixels); "
        "raise max_image_pixels if this image is genuine."
    )


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `shortest_edge`, the longer one truncated (torchvision)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def check_image_shape(
    width: int,
    height: int,
    where: str,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    shortest_edge: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """Refuse, from its header size, an image thinner than `max_aspect_ratio` (`ImageAspectRatioError`) or whose
    resize to `shortest_edge` on its short side would exceed `max_pixels` (`ImageTooLargeError`); None: no limit."""
    short, long = min(width, height), max(width, height)
    if short <= 0:
        return  # empty images are refused where they are decoded
    if max_aspect_ratio is not None and long > max_aspect_ratio * short:
        raise ImageAspectRatioError(
            f"{where}: {width}x{height} has an aspect ratio of {long / short:.1f}:1, beyond the "
            f"{max_aspect_ratio:g}:1 limit (max_aspect_ratio); raise max_aspect_ratio if this image is genuine."
        )
    if shortest_edge is None or max_pixels is None:
        return
    new_height, new_width = resize_output_size(height, width, shortest_edge)
    if new_height * new_width > max_pixels:
        raise ImageTooLargeError(
            f"{where}: {width}x{height} resized to {shortest_edge} px on its short side would be "
            f"{new_width}x{new_height} = {new_height * new_width / 1e6:.1f} MP, over the {max_pixels / 1e6:.1f} MP "
            "limit (max_image_pixels)."
        )


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What one decode may allocate: the pixel budget, the aspect-ratio limit and the short side of the resize that
    follows (None: not resized)."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    shortest_edge: int | None = None

    def check(self, width: int, height: int, where: str, frames: int = 1) -> None:
        check_pixel_budget(width, height, where, self.max_pixels, frames=frames)
        check_image_shape(width, height, where, self.max_aspect_ratio, self.shortest_edge, self.max_pixels)


_truncation_lock = threading.Lock()
_truncation_state = {"depth": 0, "saved": False}


def _check_pillow_bomb_limit(width: int, height: int, where: str) -> None:
    """Pillow's decompression-bomb threshold (`PIL.Image.MAX_IMAGE_PIXELS`, read, never changed) as a `ValueError`.

    Pillow itself only warns between one and two times the threshold. Checking its condition here, rather than turning
    the warning into an error with `warnings.catch_warnings`, leaves the process-wide warning filters alone, which
    `catch_warnings` cannot promise when threads decode at the same time.
    """
    limit, pixels = PIL.Image.MAX_IMAGE_PIXELS, max(1, width) * max(1, height)
    if limit is not None and pixels > limit:
        raise ImageTooLargeError(
            f"{where}: refused as a possible decompression bomb ({width}x{height} = {pixels} pixels exceeds Pillow's "
            f"limit of {limit} pixels, PIL.Image.MAX_IMAGE_PIXELS)."
        )


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Within: truncated files fail, even where `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is set.

    Pillow reads the flag at decode time and has no per-call switch, so it is held False while any decode of ours
    runs (reference-counted across threads) and restored after the last one.
    """
    with _truncation_lock:
        if _truncation_state["depth"] == 0:
            _truncation_state["saved"] = PIL.ImageFile.LOAD_TRUNCATED_IMAGES
        _truncation_state["depth"] += 1
        PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _truncation_lock:
            _truncation_state["depth"] -= 1
            if _truncation_state["depth"] == 0:
                PIL.ImageFile.LOAD_TRUNCATED_IMAGES = _truncation_state["saved"]


def _float_image(array: np.ndarray, where: str, owned: bool = False) -> np.ndarray:
    """Validate a float image in [0, 1] and return it as float32 [H, W, C]; `owned` arrays are clipped in place."""
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: image contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"{where}: float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "pass uint8/uint16 data or scale it first."
        )
    return np.clip(array, 0.0, 1.0, out=array if owned and array.flags.writeable else None)


def _divide(array: np.ndarray, scale: float) -> np.ndarray:
    """array / scale into one new float32 buffer (numpy casts in small chunks: no full-size intermediate)."""
    out = np.empty(array.shape, dtype=np.float32)
    return np.divide(array, np.float32(scale), out=out, dtype=np.float32, casting="unsafe")


def _from_array(array: np.ndarray, where: str, channels_first: bool, limits: _Limits = _Limits()) -> DecodedImage:
    """Array (HW, HWC or CHW) of uint8, uint16 or float in [0, 1] -> decoded image."""
    if array.size == 0:
        raise ValueError(f"{where}: image is empty (shape {tuple(array.shape)}).")
    if array.ndim == 3 and channels_first:
        array = np.moveaxis(array, 0, -1)
    elif array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{where}: expected a 2-D or 3-D image, got shape {tuple(array.shape)}.")
    limits.check(array.shape[1], array.shape[0], where)
    channels = array.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise ValueError(
            f"{where}: unsupported number of channels {channels} (shape {tuple(array.shape)}); expected 1 (gray), "
            "2 (gray + alpha), 3 (RGB) or 4 (RGBA)."
        )
    array = array[..., :1] if channels in (1, 2) else array[..., :3]  # drop alpha
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array))
    if array.dtype == np.bool_:
        return PIL.Image.fromarray(np.ascontiguousarray(array[..., 0].astype(np.uint8) * 255))
    if np.issubdtype(array.dtype, np.unsignedinteger) or np.issubdtype(array.dtype, np.signedinteger):
        low = array.min()
        if low < 0:
            raise ValueError(f"{where}: integer images must be non-negative, got a minimum of {low}.")
        bits = 16 if array.max() <= 65535 else 32
        return _divide(array, 2**bits - 1)
    if np.issubdtype(array.dtype, np.floating):
        return _float_image(array, where)
    raise ValueError(f"{where}: unsupported dtype {array.dtype}.")


def _from_pil(image: PIL.Image.Image, where: str, limits: _Limits = _Limits()) -> DecodedImage:
    """Any PIL mode -> 8-bit "L"/"RGB" image, or float [H, W, 1] for 16/32-bit grayscale modes."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where}: image is empty ({image.width}x{image.height}).")
    limits.check(image.width, image.height, where)
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode.startswith("I;16") or mode == "I":
        # "I;16*" and "I" (how Pillow opens 16-bit PNGs): native uint16/int32 bytes, then one float32 buffer
        return _from_array(np.asarray(image), where, channels_first=False, limits=limits)
    if mode == "F":
        return _float_image(np.asarray(image)[..., None], where)
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    return image.convert("RGB")  # RGBA (alpha dropped), P, CMYK, YCbCr, ...


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) onto [0, 1]; `_window_settings` has checked center and width."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows to inf far below the center: 1 / (1 + inf) = 0, the limit
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:  # C.11.2.1.2.1 with w = 1: a threshold at c - 0.5 (the formula's middle branch is empty)
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: Any) -> Any:
    """First value of a possibly multi-valued DICOM element."""
    try:
        return value[0] if not isinstance(value, (str, bytes)) else value
    except (TypeError, IndexError):
        return value


def _header_float(dataset: Any, keyword: str, where: str, default: float | None = None) -> float:
    """A finite number from a DICOM header (the first of several values); `default` when absent or empty."""
    value = dataset.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{where}: DICOM {keyword} is empty.")
        return default
    try:
        number = float(_first(value))
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{where}: invalid DICOM {keyword} {value!r}.") from error
    if not math.isfinite(number):
        raise ValueError(f"{where}: invalid DICOM {keyword} {value!r}: not a finite number.")
    return number


def _window_settings(dataset: Any, where: str) -> tuple[float, float, str]:
    """(center, width, function) of the first window, refused where the standard forbids them: non-finite values, a
    width below 1 for LINEAR (C.11.2.1.2.1) or not above 0 for LINEAR_EXACT and SIGMOID (C.11.2.1.3). Such a
    window would divide by zero (NaN pixels) or map every pixel to black or white."""
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    center = _header_float(dataset, "WindowCenter", where)
    width = _header_float(dataset, "WindowWidth", where)
    least = "greater than 0" if function in ("LINEAR_EXACT", "SIGMOID") else "at least 1"
    if (width <= 0) if function in ("LINEAR_EXACT", "SIGMOID") else (width < 1):
        raise ValueError(
            f"{where}: invalid DICOM WindowWidth {width:g} for VOILUTFunction {function}: the standard requires it "
            f"to be {least} (PS3.3 C.11.2.1)."
        )
    return center, width, function


def _check_rescale(dataset: Any, where: str) -> None:
    """RescaleSlope and RescaleIntercept, where present, must be finite, and the slope non-zero (a zero slope maps
    every pixel to one value: a blank image)."""
    if "ModalityLUTSequence" in dataset:
        return  # pydicom applies the LUT, whose entries are integers
    slope = _header_float(dataset, "RescaleSlope", where, default=1.0)
    _header_float(dataset, "RescaleIntercept", where, default=0.0)
    if slope == 0:
        raise ValueError(f"{where}: invalid DICOM RescaleSlope 0: every pixel would map to one value.")


def _pydicom(where: str) -> Any:
    """pydicom with its pixel and encapsulation modules, imported on first use (an optional dependency)."""
    try:
        import pydicom
        import pydicom.encaps
        import pydicom.pixels
    except ImportError as error:
        raise ImportError(f"{where}: reading DICOM needs pydicom (`pip install pydicom`).") from error
    return pydicom


def _header_int(dataset: Any, keyword: str, default: int, where: str) -> int:
    """An integer element of a DICOM header (`default` when absent or empty)."""
    value = dataset.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: invalid DICOM {keyword} {value!r}.") from error


def _check_dicom_decoder(dataset: Any, where: str) -> str:
    """Fail early, saying what to install, when no decoder for the file's compressed transfer syntax is present.

    Returns a hint to append to decoding errors ("" when the recommended decoders are installed).
    """
    get_decoder = _pydicom(where).pixels.get_decoder
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return ""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise ValueError(f"{where}: DICOM transfer syntax {syntax.name} ({syntax}) is not supported.") from error
    if not decoder.is_available:
        raise ValueError(
            f"{where}: no decoder is installed for DICOM transfer syntax {syntax.name} ({syntax}); "
            f"install one with `{DICOM_DECODERS_HINT}`."
        )
    if {"pylibjpeg", "gdcm"} & set(decoder.available_plugins):
        return ""
    return f"; for {syntax.name} ({syntax}) install the full decoders with `{DICOM_DECODERS_HINT}`"


def _codestream_size(fragment: bytes, jpeg2000: bool) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS frame header (SOF) or a JPEG 2000 SIZ segment; None if not found."""
    if jpeg2000:
        at = fragment.find(b"\xff\x4f\xff\x51")  # SOC then SIZ, possibly inside a JP2 wrapper
        if at < 0 or len(fragment) < at + 24:
            return None
        x, y, x_offset, y_offset = struct.unpack_from(">4I", fragment, at + 8)
        return x - x_offset, y - y_offset
    if fragment[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(fragment) and fragment[at] == 0xFF:
        marker = fragment[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in _JPEG_SOF_MARKERS:
            if at + 9 > len(fragment):
                return None
            height, width = struct.unpack_from(">HH", fragment, at + 5)
            return width, height
        elif marker == 0xDA:  # scan before any frame header
            return None
        else:
            at += 2 + struct.unpack_from(">H", fragment, at + 2)[0]
    return None


def _check_codestream(dataset: Any, rows: int, columns: int, where: str, limits: _Limits) -> None:
    """Refuse a JPEG / JPEG 2000 codestream that is over budget, disagrees with Rows x Columns, or is cut short.

    Decoders size their output from the codestream, not from the DICOM header, and pydicom notices a mismatch only
    after decoding, so a small file could otherwise make them allocate gigabytes. libjpeg (pylibjpeg) zero-fills a
    truncated JPEG / JPEG-LS scan without an error, so those must end with their end-of-image marker.
    """
    syntax = str(getattr(dataset, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax not in _JPEG_SYNTAXES and syntax not in _J2K_SYNTAXES:
        return
    try:
        items = _pydicom(where).encaps.generate_fragments(dataset.PixelData)
        next(items)  # the Basic Offset Table
        first = last = next(items)
        for fragment in items:
            last = fragment
    except Exception:  # unparsable: left to the decoder, which fails on its own
        return
    size = _codestream_size(first, jpeg2000=syntax in _J2K_SYNTAXES)
    if size is not None:
        limits.check(*size, where)
        if size != (columns, rows):
            raise ValueError(
                f"{where}: the compressed image is {size[0]}x{size[1]} but the DICOM header says {columns}x{rows}."
            )
    if syntax in _JPEG_SYNTAXES and not last[-16:].rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        raise ValueError(f"{where}: truncated compressed pixel data (the JPEG stream has no end-of-image marker).")


def _voi_lut(dataset: Any, where: str) -> tuple[np.ndarray, int, int]:
    """The first VOI LUT: (table as float64, first value mapped, bits per entry).

    Read here rather than applied with pydicom's `apply_voi_lut`, whose uint8 / uint16 index arithmetic wraps inputs
    beyond the entry type (any 8-bit LUT of more than 256 entries, 16-bit modality outputs above 65535).
    """
    item = dataset.VOILUTSequence[0]
    try:
        entries, first_mapped, bits = (int(value) for value in item.LUTDescriptor)
        data = item.LUTData
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: invalid DICOM VOI LUT ({error}).") from error
    entries = entries or 2**16  # PS3.3 C.11.2.1.1: 0 means 65536 entries
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
        syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
        little = syntax.is_little_endian if syntax is not None else dataset.original_encoding[1] is not False
        table = np.frombuffer(data, dtype="<u2" if little else ">u2", count=len(data) // 2)
    else:  # US: one value or a list
        table = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if table.size < entries or not 1 <= bits <= 16:
        raise ValueError(
            f"{where}: invalid DICOM VOI LUT ({table.size} entries of data, descriptor {entries}, {bits} bits)."
        )
    return table[:entries].astype(np.float64), first_mapped, bits


def _dicom_monochrome(pixels: np.ndarray, dataset: Any, invert: bool, where: str) -> np.ndarray:
    """Grayscale stored values -> float32 [H, W] in [0, 1], air dark.

    The modality LUT, VOI LUT or window are computed in float64 (as pydicom does) on blocks of rows, written into a
    single float32 output: peak memory is the stored pixels, the output and a few MB, whatever the image size.
    Non-finite values (a rescale beyond the float range) are an error naming the fields, never NaN pixels.
    """
    apply_modality_lut = _pydicom(where).pixels.apply_modality_lut
    height, width = pixels.shape[:2]
    step = max(1, _BLOCK_PIXELS // max(width, 1))
    blocks = [slice(top, top + step) for top in range(0, height, step)]
    _check_rescale(dataset, where)

    def modality(rows: slice) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.asarray(apply_modality_lut(pixels[rows], dataset), dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(
                f"{where}: DICOM RescaleSlope {dataset.get('RescaleSlope')} and RescaleIntercept "
                f"{dataset.get('RescaleIntercept')} take pixel values beyond the floating-point range."
            )
        return values

    transform: Callable[[slice], np.ndarray]
    if "VOILUTSequence" in dataset:
        table, first_mapped, bits = _voi_lut(dataset, where)
        lut_scale = float(2**bits - 1)

        def transform(rows: slice) -> np.ndarray:
            # C.11.2.1.1: inputs below the first mapped value take the first entry, above the last the last entry
            index = np.clip(np.floor(modality(rows)) - first_mapped, 0, table.size - 1).astype(np.intp)
            return np.clip(table[index] / lut_scale, 0.0, 1.0)

    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, window_width, function = _window_settings(dataset, where)

        def transform(rows: slice) -> np.ndarray:
            return _window(modality(rows), center, window_width, function)

    else:
        extremes = [(float(values.min()), float(values.max())) for values in map(modality, blocks)]
        low, high = min(e[0] for e in extremes), max(e[1] for e in extremes)
        if not math.isfinite(high - low):
            raise ValueError(
                f"{where}: DICOM pixel values span [{low:.4g}, {high:.4g}] after RescaleSlope and RescaleIntercept, "
                "beyond the floating-point range."
            )

        def transform(rows: slice) -> np.ndarray:
            values = modality(rows)
            return (values - low) / (high - low) if high > low else np.zeros_like(values)

    image = np.empty((height, width), dtype=np.float32)
    for rows in blocks:
        values = transform(rows)
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: the DICOM window or VOI LUT gives non-finite pixel values.")
        image[rows] = 1.0 - values if invert else values
    return image


class _DicomReadLimit(ValueError):
    """A DICOM that needs more reads to parse than `_DICOM_MAX_READS`."""


class _BoundedReader:
    """The binary file-like object pydicom parses, refusing more than `_DICOM_MAX_READS` reads."""

    def __init__(self, raw: BinaryIO, where: str):
        self._raw, self._where, self._reads = raw, where, 0

    def read(self, size: int | None = -1) -> bytes:
        self._reads += 1
        if self._reads > _DICOM_MAX_READS:
            raise _DicomReadLimit(
                f"{self._where}: refused: parsing this DICOM took over {_DICOM_MAX_READS} reads (millions of "
                "elements, or data that is not DICOM)."
            )
        return self._raw.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _dicom_meta(head: bytes, where: str) -> tuple[int, str | None, list[tuple[int, bytes, bytes]]]:
    """The File Meta Information at the start of `head` (group 0002, always explicit VR little endian): (offset of
    the dataset that follows, its transfer syntax or None, the elements as (tag, VR, value)).

    A file with the "DICM" prefix must continue with this group: without it pydicom would parse any bytes, a 30 MB
    file of zeros as four million empty elements.
    """
    prefixed = _is_dicom_bytes(head)
    at = 132 if prefixed else 0
    syntax, elements = None, []
    while at + 8 <= len(head) and head[at : at + 2] == b"\x02\x00":
        tag = 0x20000 | struct.unpack_from("<H", head, at + 2)[0]
        vr = head[at + 4 : at + 6]
        if vr in _LONG_VRS:
            length, start = (struct.unpack_from("<I", head, at + 8)[0] if at + 12 <= len(head) else -1), at + 12
        elif vr.isalpha() and vr.isupper():
            length, start = struct.unpack_from("<H", head, at + 6)[0], at + 8
        else:  # implicit VR, which some writers use for the meta group too
            vr, (length,), start = b"", struct.unpack_from("<I", head, at + 4), at + 8
        if length < 0 or start + length > len(head):
            raise ValueError(f"{where}: malformed or oversized DICOM File Meta Information.")
        elements.append((tag, vr, head[start : start + length]))
        if tag == 0x00020010:
            syntax = head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        at = start + length
    if prefixed and not elements:
        raise ValueError(
            f"{where}: not a valid DICOM file: its DICM prefix is not followed by File Meta Information (group 0002)."
        )
    return at, syntax, elements


def _explicit_meta(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    """Preamble, prefix and File Meta Information re-encoded with the Explicit VR Little Endian transfer syntax."""
    encoded = b""
    for tag, vr, value in elements:
        if tag == 0x00020000:
            continue  # the group length, recomputed below
        if tag == 0x00020010:
            vr, value = b"UI", _EXPLICIT_SYNTAX
        vr = vr or b"UN"
        head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr)
        if vr in _LONG_VRS:
            encoded += head + struct.pack("<HI", 0, len(value)) + value
        else:
            encoded += head + struct.pack("<H", len(value)) + value
    group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(encoded))
    return b"\x00" * 128 + b"DICM" + group_length + encoded


def _pixel_bytes(header: Any, where: str) -> int:
    """Bytes of native pixel data the header's Rows x Columns x frames x samples x BitsAllocated account for."""
    rows, columns = _header_int(header, "Rows", 0, where), _header_int(header, "Columns", 0, where)
    frames = max(_header_int(header, "NumberOfFrames", 1, where), 1)
    samples = min(max(_header_int(header, "SamplesPerPixel", 1, where), 1), 4)
    bits = min(max(_header_int(header, "BitsAllocated", 16, where), 1), 64)
    return rows * columns * frames * samples * -(-bits // 8)


def _inflate_dicom(
    stream: BinaryIO, offset: int, meta: list[tuple[int, bytes, bytes]], where: str, limits: _Limits
) -> bytes:
    """A Deflated Explicit VR Little Endian file as an Explicit VR Little Endian one, inflated in bounded pieces.

    pydicom inflates the whole dataset before reading a byte of it (a 1 MB file took 4 GB). Here the header is
    inflated first, 1 MiB at a time up to `_DICOM_HEADER_LIMIT`, until pydicom reaches the pixel data in it; its
    Rows x Columns x frames are checked against the limits, then the rest is inflated up to the pixel bytes the
    header accounts for plus `_DICOM_TRAILER_LIMIT`; anything beyond is refused.
    """
    pydicom = _pydicom(where)
    inflater, body, ended = zlib.decompressobj(-zlib.MAX_WBITS), bytearray(), False
    stream.seek(offset)

    def inflate_to(limit: int) -> None:
        nonlocal ended
        try:
            while len(body) < limit and not inflater.eof:
                data = inflater.unconsumed_tail or stream.read(1 << 20)
                if not data:
                    break
                body.extend(inflater.decompress(data, min(limit - len(body), 1 << 22)))
        except zlib.error as error:
            raise ValueError(f"{where}: corrupt deflated DICOM data ({error}).") from error
        ended = inflater.eof or (not inflater.unconsumed_tail and len(body) < limit)

    def header(data: bytes) -> tuple[Any, int] | None:
        """(the header, offset of the pixel data element's value) once `data` reaches the pixel data."""
        fp, found = io.BytesIO(data), []

        def stop(tag: int, vr: str | None, length: int) -> bool:
            if tag in _PIXEL_TAGS:
                found.append(fp.tell())
                return True
            if ended:
                return False
            if length == 0xFFFFFFFF:  # stop (and inflate more) unless its end is in reach
                return data.find(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", fp.tell()) < 0
            return fp.tell() + length > len(data)

        try:
            dataset = pydicom.filereader.read_dataset(
                _BoundedReader(fp, where), is_implicit_VR=False, is_little_endian=True, stop_when=stop, defer_size=4096
            )
        except _DicomReadLimit:
            raise
        except Exception as error:
            raise ValueError(f"{where}: not a readable DICOM file ({error}).") from error
        return (dataset, found[0]) if found else (dataset, len(data)) if ended else None

    size = 1 << 20
    while True:
        inflate_to(size)
        parsed = header(bytes(body))
        if parsed is not None:
            break
        if size >= _DICOM_HEADER_LIMIT:
            raise ImageTooLargeError(
                f"{where}: refused: the deflated DICOM header inflates beyond {_DICOM_HEADER_LIMIT >> 20} MiB "
                "before its pixel data."
            )
        size *= 4
    dataset, pixels_at = parsed
    rows, columns = _header_int(dataset, "Rows", 0, where), _header_int(dataset, "Columns", 0, where)
    limits.check(columns, rows, where, frames=max(_header_int(dataset, "NumberOfFrames", 1, where), 1))
    allowed = pixels_at + _pixel_bytes(dataset, where) + _DICOM_TRAILER_LIMIT
    inflate_to(allowed + 1)
    if len(body) > allowed:
        raise ImageTooLargeError(
            f"{where}: refused: the deflated DICOM data inflates beyond the {allowed} bytes that its {columns}x{rows} "
            "header accounts for."
        )
    return _explicit_meta(meta) + bytes(body)


@contextlib.contextmanager
def _binary_stream(source: str | os.PathLike | bytes) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    else:
        with open(source, "rb") as handle:
            yield handle


def decode_dicom(
    source: str | os.PathLike | bytes,
    where: str,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    resize_shortest_edge: int | None = None,
) -> np.ndarray:
    """A single-frame DICOM -> float32 [H, W, 1 or 3] in [0, 1], air dark.

    Checks Rows x Columns x NumberOfFrames against `max_pixels` and the shape against `max_aspect_ratio` (and the
    resize to `resize_shortest_edge`, when given) before any pixel data is read, inflated or decoded. Applies the
    modality LUT (rescale slope/intercept), then the VOI LUT or the first window (min-max scaling when the file has
    neither), and inverts MONOCHROME1.
    """
    return _decode_dicom(source, where, _Limits(max_pixels, max_aspect_ratio, resize_shortest_edge))


def _decode_dicom(source: str | os.PathLike | bytes, where: str, limits: _Limits) -> np.ndarray:
    pydicom = _pydicom(where)
    with _binary_stream(source) as stream:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        offset, syntax, meta = _dicom_meta(stream.read(_DICOM_META_LIMIT), where)
        if syntax == _DEFLATED_SYNTAX:
            data = _inflate_dicom(stream, offset, meta, where, limits)
            size, stream = len(data), io.BytesIO(data)

        def read(stop_before_pixels: bool) -> Any:
            stream.seek(0)
            try:  # header only: values over 64 KiB (private blobs) are skipped, not read
                return pydicom.dcmread(
                    _BoundedReader(stream, where),
                    force=True,
                    stop_before_pixels=stop_before_pixels,
                    defer_size=1 << 16 if stop_before_pixels else None,
                )
            except _DicomReadLimit:
                raise
            except Exception as error:  # pydicom raises many types on corrupt files
                raise ValueError(f"{where}: not a readable DICOM file ({error}).") from error

        header = read(stop_before_pixels=True)
        rows, columns = _header_int(header, "Rows", 0, where), _header_int(header, "Columns", 0, where)
        frames = max(_header_int(header, "NumberOfFrames", 1, where), 1)
        limits.check(columns, rows, where, frames=frames)
        if frames > 1:
            raise ValueError(
                f"{where}: multi-frame DICOM ({frames} frames) is not supported; pass a single radiograph."
            )
        expected = _pixel_bytes(header, where)
        if size > 2 * expected + _DICOM_SIZE_MARGIN:
            raise ImageTooLargeError(
                f"{where}: refused: the DICOM file holds {size} bytes, far more than its {columns}x{rows} image "
                f"({expected} bytes of pixels) needs."
            )
        dataset = read(stop_before_pixels=False)
    if "PixelData" not in dataset:
        raise ValueError(f"{where}: DICOM file has no pixel data.")
    _check_codestream(dataset, rows, columns, where, limits)
    hint = _check_dicom_decoder(dataset, where)
    try:
        with _strict_pillow():  # pydicom may decode JPEG / JPEG 2000 frames with Pillow
            pixels = dataset.pixel_array
    except Exception as error:
        raise ValueError(f"{where}: cannot decode DICOM pixel data ({error}){hint}.") from error
    if pixels.size == 0:
        raise ValueError(f"{where}: DICOM pixel data is empty.")
    limits.check(pixels.shape[1], pixels.shape[0], where)  # the decoded size, should it differ

    try:
        photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if not photometric.startswith("MONOCHROME"):
            bits = _header_int(dataset, "BitsStored", 8, where)
            return _float_image(_divide(pixels, 2**bits - 1), where, owned=True).reshape(*pixels.shape[:2], -1)
        return _dicom_monochrome(pixels, dataset, invert=photometric == "MONOCHROME1", where=where)[..., None]
    except ValueError:
        raise
    except Exception as error:  # pydicom's LUT functions on malformed LUT elements
        raise ValueError(f"{where}: cannot apply the DICOM LUTs ({type(error).__name__}: {error}).") from error


# What decoders raise on malformed input besides ValueError; `load_image` turns them into a ValueError naming the file.
_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    NotImplementedError,
    AssertionError,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,
    RuntimeError,
    BufferError,
)


def load_image(
    source: ImageSource,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    resize_shortest_edge: int | None = None,
) -> DecodedImage:
    """Decode one image from a path, raw bytes, PIL image, numpy array [H, W(, C)] or tensor [(C,) H, W].

    Returns an 8-bit PIL image ("L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1]. Images larger than
    `max_pixels` (width x height), thinner than `max_aspect_ratio` (long side / short side) or, when the caller
    will resize the short side to `resize_shortest_edge`, larger than `max_pixels` once resized, are refused from
    their header, before decoding (None: no limit). Every failure is a `ValueError` naming the input and the
    reason, whatever the decoder raised (`ImageTooLargeError` for the limits and for running out of memory).
    """
    where = describe_source(source, name)
    limits = _Limits(max_pixels, max_aspect_ratio, resize_shortest_edge)
    try:
        return _load(source, where, limits)
    except ValueError as error:
        if where in str(error):
            raise
        raise ValueError(f"{where}: {error}") from error
    except MemoryError as error:
        raise ImageTooLargeError(f"{where}: ran out of memory decoding this image.") from error
    except _DECODER_ERRORS as error:
        raise ValueError(f"{where}: cannot decode this image ({type(error).__name__}: {error}).") from error


def _load(source: ImageSource, where: str, limits: _Limits) -> DecodedImage:
    if isinstance(source, PIL.Image.Image):
        return _from_pil(source, where, limits)
    if isinstance(source, torch.Tensor):
        if source.ndim in (2, 3):
            height, width = source.shape[-2:] if source.ndim == 3 else source.shape
            limits.check(width, height, where)  # before any device-to-host copy
        return _from_array(source.detach().cpu().numpy(), where, channels_first=source.ndim == 3, limits=limits)
    if isinstance(source, np.ndarray):
        return _from_array(source, where, channels_first=False, limits=limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{where}: no such file.")
        if path.stat().st_size == 0:
            raise ValueError(f"{where}: empty file (0 bytes).")
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _decode_dicom(path, where, limits)
        with path.open("rb") as handle:
            head = handle.read(132)
        if _is_dicom_bytes(head):
            return _decode_dicom(path, where, limits)
        return _open_pil(path, where, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError(f"{where}: empty input (0 bytes).")
        if _is_dicom_bytes(data):
            return _decode_dicom(data, where, limits)
        return _open_pil(data, where, limits)
    raise ValueError(f"{where}: unsupported input type {type(source).__name__}.")


def _pillow_formats() -> list[str]:
    """`IMAGE_FORMATS` that this Pillow build reads, in that order (Pillow raises KeyError for an unknown one)."""
    PIL.Image.init()  # registers every plugin once, as Pillow itself does on its first unidentified file
    return [name for name in IMAGE_FORMATS if name in PIL.Image.OPEN]


def _open_pil(source: Path | bytes, where: str, limits: _Limits) -> DecodedImage:
    """Open (header only), check the limits, then decode strictly: bombs and truncated data are errors."""
    try:
        with (
            _strict_pillow(),
            PIL.Image.open(
                io.BytesIO(source) if isinstance(source, bytes) else source, formats=_pillow_formats()
            ) as image,
        ):
            limits.check(image.width, image.height, where)
            _check_pillow_bomb_limit(image.width, image.height, where)  # what Pillow only warned about
            if image.format in ("JPEG", "MPO"):
                complete = _complete_jpeg(source, where, image.width, image.height, len(image.getbands()))
                if complete is not None and image.format == "JPEG":
                    with PIL.Image.open(_ByteView(complete), formats=["JPEG"]) as whole:
                        whole.load()
                        return _from_pil(whole, where, limits)
            image.load()  # decode now, so that truncated files fail here
            if image.format == "PNG" and not _last_row_written(image):
                with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as stream:
                    _check_png_data(stream, where)
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                logger.warning("%s: multi-frame image (%d frames), using the first frame.", where, frames)
            decoded = _from_pil(image, where, limits)
            # a multi-frame image keeps reading its file: detach the first frame before the file is closed
            return decoded.copy() if decoded is image and frames > 1 else decoded
    except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as error:  # the warning: -W error
        size = _png_header_size(source)
        size = f"{size[0]}x{size[1]}, " if size else ""
        raise ImageTooLargeError(
            f"{where}: refused as a possible decompression bomb ({size}{str(error).rstrip('.')})."
        ) from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(
            f"{where}: not a recognised image file (read: {', '.join(IMAGE_FORMATS)} and DICOM)."
        ) from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{where}: corrupt or truncated image ({error}).") from error


def _jpeg_structure(data: memoryview) -> tuple[int | None, list[int], list[tuple[list[int], int, int, int, int]], int]:
    """The first image of a JPEG: (its frame marker (SOFn), its component ids, its scans as (component ids, first
    and last coefficient, successive approximation high and low bits), and where its last scan's entropy-coded
    data ends (the first marker after it, or the end of `data`))."""
    sof, components, scans, at, end = None, [], [], 2, len(data)
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        length = struct.unpack_from(">H", data, at + 2)[0]
        segment = data[at + 4 : at + 2 + length]
        at += 2 + length
        if marker in _JPEG_SOF_MARKERS and sof is None and len(segment) >= 6:
            sof, count = marker, segment[5]
            components = [segment[6 + 3 * i] for i in range(count) if 6 + 3 * i < len(segment)]
        elif marker == 0xDA and segment and len(segment) >= 4 + 2 * segment[0]:
            count = segment[0]
            first, last, approximation = segment[1 + 2 * count : 4 + 2 * count]
            scans.append(
                ([segment[1 + 2 * i] for i in range(count)], first, last, approximation >> 4, approximation & 15)
            )
            marker_at = _JPEG_MARKER.search(data, at)
            at = end = marker_at.start() if marker_at else len(data)
    return sof, components, scans, end


class _ByteView(io.RawIOBase):
    """A read-only, seekable binary file over a buffer, which it does not copy."""

    def __init__(self, view: memoryview):
        super().__init__()
        self._view, self._at = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), len(self._view) - self._at))
        buffer[:count] = self._view[self._at : self._at + count]
        self._at += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._at = max(0, offset + (0, self._at, len(self._view))[whence])
        return self._at

    def tell(self) -> int:
        return self._at


def _complete_jpeg(source: Path | bytes, where: str, width: int, height: int, bands: int) -> memoryview | None:
    """Refuse a JPEG whose scan data stops early, even where an end-of-image marker was appended to the cut.

    libjpeg (through Pillow) reports data that simply ends, but pads a scan that meets a marker early with zeros,
    silently: a file cut in half with its end-of-image marker re-appended decodes with a constant bottom half.
    - Progressive (and other multi-scan) JPEGs: every component and coefficient must be coded to the last bit by
      some scan; a cut drops the later scans.
    - Single-scan (baseline and extended) JPEGs, nearly all of them: returned as the bytes to decode instead of the
      file, its scan data followed by a few zero bytes and no marker, so that libjpeg either finishes the image
      within them (the data was complete, the pixels are identical) or asks for more data, which Pillow reports as
      truncation (a cut of up to about the last block's worth of data can go unnoticed).
    None: decode the file as it is. Holds one copy of the compressed data.
    """
    cap = 16 * width * height * bands + (16 << 20)  # no encoding of the image, plus metadata, comes near it
    if isinstance(source, bytes):
        buffer, data = None, memoryview(source)[:cap]
    else:
        with open(source, "rb") as handle:
            size = min(os.fstat(handle.fileno()).st_size, cap)
            buffer = bytearray(size + len(_JPEG_PADDING))
            data = memoryview(buffer)[: handle.readinto(memoryview(buffer)[:size])]
    sof, components, scans, end = _jpeg_structure(data)
    if sof is None or not scans or not components:
        return None  # left to Pillow
    if end >= cap:
        raise ValueError(
            f"{where}: refused: the JPEG's scan data runs past {cap} bytes, far more than its size needs."
        )
    if sof in (0xC2, 0xC6, 0xCA, 0xCE):  # progressive: coefficient bands, refined down to bit 0
        coded = {(c, k) for ids, first, last, _, low in scans if low == 0 for c in ids for k in range(first, last + 1)}
        missing = any((c, k) not in coded for c in components for k in range(64))
    else:
        missing = not set(components) <= {c for ids, *_ in scans for c in ids}
    if missing:
        raise ValueError(
            f"{where}: truncated image: the JPEG stops after {len(scans)} scan(s), before all of its image data."
        )
    if sof not in (0xC0, 0xC1) or len(scans) != 1 or set(scans[0][0]) != set(components):
        return None
    if buffer is None:
        return memoryview(bytes(data[:end]) + _JPEG_PADDING)
    buffer[end : end + len(_JPEG_PADDING)] = _JPEG_PADDING  # in place: the bytes after `end` are not needed
    return memoryview(buffer)[: end + len(_JPEG_PADDING)]


def _png_header_size(source: Path | bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, read without Pillow; None for anything else."""
    if isinstance(source, bytes):
        head = source[:24]
    else:
        with open(source, "rb") as handle:
            head = handle.read(24)
    if not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _png_data_size(header: bytes) -> int:
    """Bytes of filtered scanlines a PNG's IHDR promises (filter byte + packed samples per row, per Adam7 pass)."""
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    bits = _PNG_CHANNELS.get(color_type, 4) * bit_depth

    def size(columns: int, rows: int) -> int:
        return rows * (1 + (columns * bits + 7) // 8) if columns > 0 and rows > 0 else 0

    if not interlace:
        return size(width, height)
    return sum(size(-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in _ADAM7_PASSES)


def _last_row_written(image: PIL.Image.Image) -> bool:
    """Whether a decoded, non-interlaced image's last row holds a non-zero value: its decoder got that far.

    Pillow decodes into zeroed memory row by row, so a PNG cut short ends in zero rows; only then (or when interlaced)
    is the costlier `_check_png_data` needed.
    """
    if image.info.get("interlace"):
        return False
    extrema = image.crop((0, image.height - 1, image.width, image.height)).getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return any(high > 0 for _, high in bands)


def _check_png_data(stream: BinaryIO, where: str) -> None:
    """Raise a `ValueError` when a PNG's image data (its IDAT chunks) is shorter than its header promises.

    Pillow zero-fills the rows of a PNG whose zlib stream ends early, even with `LOAD_TRUNCATED_IMAGES` off, so the
    stream is inflated once more here, in bounded pieces, counting bytes (Adler-32 checked by zlib on the way).
    """
    if stream.read(8) != _PNG_SIGNATURE:
        return
    expected, produced, in_data = None, 0, False
    inflater = zlib.decompressobj()
    try:
        while not inflater.eof:
            head = stream.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IHDR":
                expected, length = _png_data_size(stream.read(length)), 0
            elif kind == b"IDAT" and expected is not None:
                in_data = True
                for start in range(0, length, 1 << 20):
                    data = stream.read(min(1 << 20, length - start))
                    while not inflater.eof and produced <= expected:  # at most 4 MB out at a time
                        out = len(inflater.decompress(data, 1 << 22))
                        produced, data = produced + out, inflater.unconsumed_tail
                        if not data and out < 1 << 22:  # input used up, no output held back
                            break
                length = 0  # the chunk's data is read; its CRC follows
            elif in_data:
                break  # IDAT chunks are consecutive: the image data is over
            stream.seek(length + 4, io.SEEK_CUR)  # the rest of the chunk and its CRC
    except (zlib.error, struct.error) as error:
        raise ValueError(f"{where}: corrupt PNG image data ({error}).") from error
    if expected is not None and produced < expected:
        raise ValueError(
            f"{where}: truncated image: the PNG data holds {produced} of the {expected} bytes its header promises."
        )


__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DICOM_DECODERS_HINT",
    "IMAGE_FORMATS",
    "DecodedImage",
    "ImageAspectRatioError",
    "ImageSource",
    "ImageTooLargeError",
    "check_image_shape",
    "check_pixel_budget",
    "decode_dicom",
    "describe_source",
    "load_image",
    "resize_output_size",
]
