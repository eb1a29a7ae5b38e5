"""CheXficient image decoding: PNG, JPEG, 8- and 16-bit, DICOM, raw bytes, PIL images, arrays and tensors to arrays.

Travels with the weights next to `image_processing_chexficient.py`, which turns what is decoded here into
`pixel_values`. A decoded image is an 8-bit PIL image ("L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1];
high-bit-depth data (16-bit PNG, DICOM) is never clipped to 8 bits.

Decoding is defensive: an image's size is read from its header and checked against a pixel budget
(`max_image_pixels`, 60 MP by default) before any pixel data is decoded; images Pillow only warns about as possible
decompression bombs are refused; truncated files are errors even where `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is set.
DICOM goes through the modality LUT, then the VOI LUT or window; pydicom is imported on first use. Compressed DICOM
needs the decoders of `pip install "pylibjpeg[all]"` (JPEG Lossless, JPEG-LS, 12-bit JPEG, JPEG 2000).
"""

from __future__ import annotations

import contextlib
import io
import os
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
# Decoders for compressed DICOM transfer syntaxes that pydicom and Pillow do not cover.
DICOM_DECODERS_HINT = 'pip install "pylibjpeg[all]"'
_JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}  # JPEG, JPEG Lossless, JPEG-LS
_J2K_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 201, 202, 203)}  # JPEG 2000, HTJ2K
_JPEG_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: gray, RGB, palette, gray + alpha, RGBA
_ADAM7_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_BLOCK_PIXELS = 1 << 18  # DICOM values are mapped in float64 blocks of this many pixels, written into float32

ImageSource = str | os.PathLike | bytes | PIL.Image.Image | np.ndarray | torch.Tensor
# A decoded image: an 8-bit PIL image (mode "L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1].
DecodedImage = PIL.Image.Image | np.ndarray


def _describe(source: Any, name: str | None) -> str:
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
    """An image whose header promises more pixels than the budget (`max_image_pixels`) or than Pillow's
    decompression-bomb threshold allows; raised before the pixel data is decoded."""


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


def _from_array(
    array: np.ndarray, where: str, channels_first: bool, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> DecodedImage:
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
    check_pixel_budget(array.shape[1], array.shape[0], where, max_pixels)
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


def _from_pil(image: PIL.Image.Image, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Any PIL mode -> 8-bit "L"/"RGB" image, or float [H, W, 1] for 16/32-bit grayscale modes."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where}: image is empty ({image.width}x{image.height}).")
    check_pixel_budget(image.width, image.height, where, max_pixels)
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode.startswith("I;16") or mode == "I":
        # "I;16*" and "I" (how Pillow opens 16-bit PNGs): native uint16/int32 bytes, then one float32 buffer
        return _from_array(np.asarray(image), where, channels_first=False, max_pixels=max_pixels)
    if mode == "F":
        return _float_image(np.asarray(image)[..., None], where)
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    return image.convert("RGB")  # RGBA (alpha dropped), P, CMYK, YCbCr, ...


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) onto [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DICOM element."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


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


def _check_codestream(dataset: Any, rows: int, columns: int, where: str, max_pixels: int | None) -> None:
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
        check_pixel_budget(*size, where, max_pixels)
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
    """
    apply_modality_lut = _pydicom(where).pixels.apply_modality_lut
    height, width = pixels.shape[:2]
    step = max(1, _BLOCK_PIXELS // max(width, 1))
    blocks = [slice(top, top + step) for top in range(0, height, step)]

    def modality(rows: slice) -> np.ndarray:
        return np.asarray(apply_modality_lut(pixels[rows], dataset), dtype=np.float64)

    transform: Callable[[slice], np.ndarray]
    if "VOILUTSequence" in dataset:
        table, first_mapped, bits = _voi_lut(dataset, where)
        lut_scale = float(2**bits - 1)

        def transform(rows: slice) -> np.ndarray:
            # C.11.2.1.1: inputs below the first mapped value take the first entry, above the last the last entry
            index = np.clip(np.floor(modality(rows)) - first_mapped, 0, table.size - 1).astype(np.intp)
            return np.clip(table[index] / lut_scale, 0.0, 1.0)

    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
        center, window_width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)

        def transform(rows: slice) -> np.ndarray:
            return _window(modality(rows), center, window_width, function)

    else:
        extremes = [(float(values.min()), float(values.max())) for values in map(modality, blocks)]
        low, high = min(e[0] for e in extremes), max(e[1] for e in extremes)

        def transform(rows: slice) -> np.ndarray:
            values = modality(rows)
            return (values - low) / (high - low) if high > low else np.zeros_like(values)

    image = np.empty((height, width), dtype=np.float32)
    for rows in blocks:
        image[rows] = 1.0 - transform(rows) if invert else transform(rows)
    return image


def decode_dicom(
    source: str | os.PathLike | bytes, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A single-frame DICOM -> float32 [H, W, 1 or 3] in [0, 1], air dark.

    Checks Rows x Columns x NumberOfFrames against `max_pixels` before any pixel data is read or decoded. Applies the
    modality LUT (rescale slope/intercept), then the VOI LUT or the first window (min-max scaling when the file has
    neither), and inverts MONOCHROME1.
    """
    pydicom = _pydicom(where)

    def read(stop_before_pixels: bool) -> Any:
        handle = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        try:
            return pydicom.dcmread(handle, force=True, stop_before_pixels=stop_before_pixels)
        except Exception as error:  # pydicom raises many types on corrupt files
            raise ValueError(f"{where}: not a readable DICOM file ({error}).") from error

    header = read(stop_before_pixels=True)
    rows, columns = _header_int(header, "Rows", 0, where), _header_int(header, "Columns", 0, where)
    frames = max(_header_int(header, "NumberOfFrames", 1, where), 1)
    check_pixel_budget(columns, rows, where, max_pixels, frames=frames)
    dataset = read(stop_before_pixels=False)
    if "PixelData" not in dataset:
        raise ValueError(f"{where}: DICOM file has no pixel data.")
    if frames > 1:
        raise ValueError(f"{where}: multi-frame DICOM ({frames} frames) is not supported; pass a single radiograph.")
    _check_codestream(dataset, rows, columns, where, max_pixels)
    hint = _check_dicom_decoder(dataset, where)
    try:
        with _strict_pillow():  # pydicom may decode JPEG / JPEG 2000 frames with Pillow
            pixels = dataset.pixel_array
    except Exception as error:
        raise ValueError(f"{where}: cannot decode DICOM pixel data ({error}){hint}.") from error
    if pixels.size == 0:
        raise ValueError(f"{where}: DICOM pixel data is empty.")
    check_pixel_budget(pixels.shape[1], pixels.shape[0], where, max_pixels)  # the decoded size, should it differ

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        bits = int(dataset.get("BitsStored", 8))
        return _float_image(_divide(pixels, 2**bits - 1), where, owned=True).reshape(*pixels.shape[:2], -1)
    return _dicom_monochrome(pixels, dataset, invert=photometric == "MONOCHROME1", where=where)[..., None]


def load_image(
    source: ImageSource, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> DecodedImage:
    """Decode one image from a path, raw bytes, PIL image, numpy array [H, W(, C)] or tensor [(C,) H, W].

    Returns an 8-bit PIL image ("L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1]. Images larger than
    `max_pixels` (width x height; None: no limit) are refused from their header, before decoding. Every failure is
    a `ValueError` naming the input and the reason.
    """
    where = _describe(source, name)
    if isinstance(source, PIL.Image.Image):
        return _from_pil(source, where, max_pixels)
    if isinstance(source, torch.Tensor):
        if source.ndim in (2, 3):
            height, width = source.shape[-2:] if source.ndim == 3 else source.shape
            check_pixel_budget(width, height, where, max_pixels)  # before any device-to-host copy
        return _from_array(
            source.detach().cpu().numpy(), where, channels_first=source.ndim == 3, max_pixels=max_pixels
        )
    if isinstance(source, np.ndarray):
        return _from_array(source, where, channels_first=False, max_pixels=max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{where}: no such file.")
        if path.stat().st_size == 0:
            raise ValueError(f"{where}: empty file (0 bytes).")
        if path.suffix.lower() in DICOM_SUFFIXES:
            return decode_dicom(path, where, max_pixels)
        with path.open("rb") as handle:
            head = handle.read(132)
        if _is_dicom_bytes(head):
            return decode_dicom(path, where, max_pixels)
        return _open_pil(path, where, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError(f"{where}: empty input (0 bytes).")
        if _is_dicom_bytes(data):
            return decode_dicom(data, where, max_pixels)
        return _open_pil(data, where, max_pixels)
    raise ValueError(f"{where}: unsupported input type {type(source).__name__}.")


def _open_pil(source: Path | bytes, where: str, max_pixels: int | None) -> DecodedImage:
    """Open (header only), check the pixel budget, then decode strictly: bombs and truncated data are errors."""
    try:
        with _strict_pillow(), PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            check_pixel_budget(image.width, image.height, where, max_pixels)
            _check_pillow_bomb_limit(image.width, image.height, where)  # what Pillow only warned about
            image.load()  # decode now, so that truncated files fail here
            if image.format == "PNG" and not _last_row_written(image):
                with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as stream:
                    _check_png_data(stream, where)
            if getattr(image, "n_frames", 1) > 1:
                logger.warning("%s: multi-frame image, using the first frame.", where)
            return _from_pil(image, where, max_pixels)
    except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as error:  # the warning: -W error
        size = _png_header_size(source)
        size = f"{size[0]}x{size[1]}, " if size else ""
        raise ImageTooLargeError(
            f"{where}: refused as a possible decompression bomb ({size}{str(error).rstrip('.')})."
        ) from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{where}: not a recognised image file.") from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{where}: corrupt or truncated image ({error}).") from error


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
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DICOM_DECODERS_HINT",
    "DecodedImage",
    "ImageSource",
    "ImageTooLargeError",
    "check_pixel_budget",
    "decode_dicom",
    "load_image",
]
