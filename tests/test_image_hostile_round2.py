"""Hostile inputs, round two (issue 25): limits on what will be allocated (the resized shape, a DICOM's inflated
size and its parse), one error type naming the file for every decoder failure, first frames of multi-frame files,
decodes independent of what was decoded before, non-finite DICOM values, and JPEGs cut with their end re-appended.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.PngImagePlugin
import pydicom
import pytest
import torch
from helpers import dicom_dataset, dicom_header
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from image_processing_chexficient import (
    DEFAULT_MAX_ASPECT_RATIO,
    CheXficientImageProcessor,
    ImageAspectRatioError,
    ImageTooLargeError,
    load_image,
)


ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def traced(function) -> tuple[object, int]:
    """(what `function` returned or raised, the peak of Python/numpy allocations while it ran, in bytes)."""
    gc.collect()
    tracemalloc.start()
    try:
        try:
            result = function()
        except Exception as error:  # returned, for the caller to check
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gray_png(width: int, height: int) -> bytes:
    """A complete 8-bit grayscale PNG, mid-gray: a 1 x 20000 one is about 120 bytes."""
    rows = (b"\x00" + b"\x80" * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def encoded(image: PIL.Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# ----- 1. thin images: the resize to 378 px would allocate the long side in proportion ----------------------------


def thin_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    if kind == "png_1x20000":
        path, size = tmp_path / "thin.png", "1x20000"
        path.write_bytes(gray_png(1, 20_000))
    elif kind == "png_1x100000":
        path, size = tmp_path / "thinner.png", "1x100000"
        path.write_bytes(gray_png(1, 100_000))
    elif kind == "jpeg_60000x1":
        path, size = tmp_path / "wide.jpg", "60000x1"
        path.write_bytes(encoded(PIL.Image.new("L", (60_000, 1), 128), "JPEG"))
    else:
        path, size = tmp_path / "thin.dcm", "1x60000"
        dicom_dataset(np.full((60_000, 1), 100, np.uint16)).save_as(path, enforce_file_format=True)
    return path, size


@pytest.mark.parametrize("kind", ["png_1x20000", "png_1x100000", "jpeg_60000x1", "dicom_1x60000"])
def test_thin_images_are_refused_from_their_header_at_the_released_settings(tmp_path, kind):
    """Under the pixel budget (60 MP), but resized to 378 px on the short side they took 2.8 GB to over 10 GB."""
    path, size = thin_file(tmp_path, kind)
    assert path.stat().st_size < 130_000
    processor = CheXficientImageProcessor()  # the released settings: 378 px, 60 MP, 20:1
    assert processor.size == {"shortest_edge": 378} and processor.max_aspect_ratio == DEFAULT_MAX_ASPECT_RATIO == 20
    error, peak = traced(lambda: processor(str(path)))
    assert isinstance(error, ImageAspectRatioError) and isinstance(error, ValueError), error
    message = str(error)
    assert message.startswith(f"{path}: {size} has an aspect ratio of ") and "beyond the 20:1 limit" in message
    assert "max_aspect_ratio" in message
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"  # was 2.8 GB and up: nothing is decoded
    with pytest.raises(ImageAspectRatioError, match="upload"):  # bytes, and the module-level loader's default
        load_image(path.read_bytes(), name="upload")


def test_the_resized_image_is_held_to_the_pixel_budget(tmp_path):
    path = tmp_path / "thin.png"
    path.write_bytes(gray_png(1, 20_000))
    processor = CheXficientImageProcessor(max_aspect_ratio=None)  # the ratio allowed: the resize is what is checked
    error, peak = traced(lambda: processor(path))
    assert isinstance(error, ImageTooLargeError), error
    assert str(error) == (
        f"{path}: 1x20000 resized to 378 px on its short side would be 378x7560000 = 2857.7 MP, over the 60.0 MP "
        "limit (max_image_pixels)."
    )
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
    # without the resize nothing large is allocated; the module-level loader resizes nothing
    assert load_image(path, max_aspect_ratio=None).size == (1, 20_000)
    unresized = CheXficientImageProcessor(max_aspect_ratio=None, do_resize=False, do_center_crop=False)
    assert unresized(path)["pixel_values"].shape == (1, 3, 20_000, 1)


def test_aspect_ratio_boundary_and_setting(tmp_path):
    at, over = tmp_path / "at.png", tmp_path / "over.png"
    at.write_bytes(gray_png(30, 600))  # 20:1 exactly
    over.write_bytes(gray_png(30, 601))
    processor = CheXficientImageProcessor(size={"shortest_edge": 32})
    assert processor(at)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ImageAspectRatioError, match=r"30x601 has an aspect ratio of 20\.0:1"):
        processor(over)
    assert processor(over, max_aspect_ratio=25)["pixel_values"].shape == (1, 3, 32, 32)  # per-call override
    for source in (np.zeros((601, 30), np.uint8), torch.zeros(1, 601, 30), PIL.Image.new("L", (601, 30))):
        with pytest.raises(ImageAspectRatioError):  # arrays, tensors and PIL images too
            load_image(source)
    with pytest.raises(ImageAspectRatioError, match="preprocess_tensor: 200x2"):  # before the device's resize
        processor.preprocess_tensor(torch.zeros(1, 1, 2, 200, dtype=torch.uint8))
    for bad in (0, 0.5, -3, True, float("inf"), float("nan"), "wide"):
        with pytest.raises(ValueError, match="max_aspect_ratio"):
            CheXficientImageProcessor(max_aspect_ratio=bad)


@pytest.mark.parametrize("value", [8.5, None])
def test_max_aspect_ratio_round_trips(tmp_path, value):
    CheXficientImageProcessor(max_aspect_ratio=value).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["max_aspect_ratio"] == value
    assert CheXficientImageProcessor.from_pretrained(tmp_path).max_aspect_ratio == value
    del saved["max_aspect_ratio"]  # a config saved before the setting existed gets the default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert CheXficientImageProcessor.from_pretrained(tmp_path).max_aspect_ratio == DEFAULT_MAX_ASPECT_RATIO


# ----- 2. DICOM: deflated data inflated within what the header accounts for; parse time bounded -------------------


def file_meta_bytes(dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, dataset.file_meta)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue()


def deflated_dicom(rows: int, columns: int, pixel_length: int, inflated: int, private: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian file: a rows x columns 16-bit header, `private` bytes of a private element,
    a pixel data element claiming `pixel_length` bytes, then `inflated` bytes of zeros, all in one deflate stream.
    Made of repeated fully-flushed blocks, so a stream inflating to gigabytes is built in milliseconds."""
    dataset = dicom_header(rows, columns, bits=16, syntax=DeflatedExplicitVRLittleEndian)
    if private:
        dataset.add_new(0x00091010, "LO", "CHEXFICIENT TEST")
        dataset.add_new(0x00091011, "OB", bytes(private))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_length)
    stream = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)  # independent blocks
    remainder = inflated % MiB
    tail = compressor.compress(bytes(remainder)) if remainder else b""
    return file_meta_bytes(dataset) + stream + block * (inflated // MiB) + tail + compressor.flush()


@pytest.mark.parametrize(
    ("name", "pixel_length", "inflated"),
    [
        ("claims_2GiB.dcm", 2 << 30, 2 << 30),  # 2 MB on disk; the old reader inflated it all (4.1 GB, 11 s)
        ("trailing_16MiB.dcm", 64 * 64 * 2, 16 * MiB),  # an honest pixel element, then 16 MiB of trailing zeros
    ],
)
def test_deflated_dicom_inflating_beyond_its_header_is_refused_with_bounded_memory(
    tmp_path, name, pixel_length, inflated
):
    path = tmp_path / name
    path.write_bytes(deflated_dicom(64, 64, pixel_length, inflated))
    assert path.stat().st_size < 3 * MiB
    error, peak = traced(lambda: load_image(path))
    assert isinstance(error, ImageTooLargeError), error  # a ValueError; the server answers 413
    assert str(error).startswith(f"{path}: refused: the deflated DICOM data inflates beyond the ")
    assert "bytes that its 64x64 header accounts for" in str(error)
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    # the same, honest: decoded, through a header long enough (2.5 MiB) to need more than the first MiB inflated
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    honest = tmp_path / "honest.dcm"
    dataset = dicom_dataset(pixels, bits=16)
    dataset.add_new(0x00091010, "LO", "CHEXFICIENT TEST")
    dataset.add_new(0x00091011, "OB", bytes(5 * MiB // 2))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(honest, enforce_file_format=True)
    assert (
        pydicom.dcmread(honest, stop_before_pixels=True).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    )
    np.testing.assert_allclose(load_image(honest)[..., 0], pixels / pixels.max(), atol=1e-6)  # min-max scaled


def test_deflated_header_beyond_its_limit_is_refused(tmp_path):
    path = tmp_path / "long_header.dcm"
    path.write_bytes(deflated_dicom(64, 64, 64 * 64 * 2, 64 * 64 * 2, private=20 * MiB))
    error, peak = traced(lambda: load_image(path))
    assert str(error) == f"{path}: refused: the deflated DICOM header inflates beyond 16 MiB before its pixel data."
    assert peak < 64 * MiB, f"peak {peak / MiB:.1f} MiB"
    shipped = get_testdata_file("image_dfl.dcm")  # pydicom's own deflated file still decodes
    reference = pydicom.dcmread(shipped).pixel_array.astype(np.float64)
    decoded = load_image(shipped)[..., 0]
    np.testing.assert_allclose(decoded, (reference - reference.min()) / np.ptp(reference), atol=1e-6)


def test_dicom_files_that_take_long_to_parse_fail_fast(tmp_path):
    """30 MB of zeros after "DICM" took 19 s of CPU before its error; so did a valid meta group then zeros."""
    zeros = tmp_path / "zeros.dcm"
    zeros.write_bytes(b"\x00" * 128 + b"DICM" + bytes(30 * MiB - 132))
    meta_then_zeros = tmp_path / "meta_then_zeros.dcm"
    meta_then_zeros.write_bytes(file_meta_bytes(dicom_header(64, 64)) + bytes(30 * MiB))
    cases = [
        (zeros, "not a valid DICOM file: its DICM prefix is not followed by File Meta Information (group 0002)."),
        (meta_then_zeros, "refused: parsing this DICOM took over 100000 reads"),
    ]
    for path, reason in cases:
        start = time.process_time()
        with pytest.raises(ValueError) as info:
            load_image(path)
        assert time.process_time() - start < 5  # a generous bound: about 0.1 and 0.4 s here, was 19 and 20 s
        assert str(info.value).startswith(f"{path}: {reason}")
        with pytest.raises(ValueError, match="upload"):
            load_image(path.read_bytes(), name="upload")


def test_dicom_file_far_larger_than_its_image_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "padded.dcm"
    dicom_header(64, 64, bits=16, PixelData=bytes(80 * MiB)).save_as(path, enforce_file_format=True)
    error, peak = traced(lambda: load_image(path))
    assert isinstance(error, ImageTooLargeError), error
    assert str(error).startswith(f"{path}: refused: the DICOM file holds ")
    assert "far more than its 64x64 image (8192 bytes of pixels) needs." in str(error)
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"


# ----- 3. every decoder failure is a ValueError naming the file; first frames; no state carried between decodes -----


def palette_less_gif(frames: list[np.ndarray]) -> bytes:
    """A multi-frame GIF with no colour table at all (Pillow writes one; it is cut out here)."""
    data = encoded(
        PIL.Image.fromarray(frames[0]),
        "GIF",
        save_all=True,
        append_images=[PIL.Image.fromarray(f) for f in frames[1:]],
    )
    packed = data[10]
    assert packed & 0x80  # a global colour table of 3 * 2 ** (n + 1) bytes follows the 13-byte header
    return data[:10] + bytes([packed & 0x7F]) + data[11:13] + data[13 + 3 * 2 ** ((packed & 7) + 1) :]


@pytest.mark.parametrize("kind", ["tiff", "gif", "gif_without_palette"])
def test_multi_frame_files_give_their_first_frame_with_a_warning(tmp_path, caplog, kind):
    rng = np.random.default_rng(5)
    first, second = (rng.integers(0, 4, (40, 30), dtype=np.uint8) * 60 for _ in range(2))
    path = tmp_path / f"two_frames.{kind[:4]}"
    if kind == "gif_without_palette":
        path.write_bytes(palette_less_gif([first, second]))
    else:
        PIL.Image.fromarray(first).save(path, save_all=True, append_images=[PIL.Image.fromarray(second)])
    with PIL.Image.open(path) as image:
        assert image.n_frames == 2
        expected = np.asarray(image.convert("L"))  # frame 0, as Pillow reads it
    with caplog.at_level(logging.WARNING):
        pixels = CheXficientImageProcessor(size={"shortest_edge": 30})(path)["pixel_values"]
        decoded = load_image(path)
    assert pixels.shape == (1, 3, 30, 30) and torch.isfinite(pixels).all()
    np.testing.assert_array_equal(np.asarray(decoded.convert("L")), expected)
    assert f"{path}: multi-frame image (2 frames), using the first frame." in caplog.text


def undecodable_dds() -> bytes:
    """A well-formed DDS header with a pixel format Pillow has no decoder for (3Dc, "ATI2"-like FourCC)."""
    header = struct.pack("<4sIIIIIII", b"DDS ", 124, 0x1007, 4, 4, 0, 0, 0) + b"\x00" * 44
    pixel_format = struct.pack("<II4sIIIII", 32, 0x4, b"ATI3", 0, 0, 0, 0, 0)
    return header + pixel_format + struct.pack("<IIIII", 0x1000, 0, 0, 0, 0) + b"\x00" * 16


@pytest.mark.parametrize(
    "raised",
    [
        AssertionError(),
        NotImplementedError("Unimplemented pixel format 860443713"),
        KeyError("tile"),
        struct.error("unpack requires a buffer of 4 bytes"),
        zlib.error("invalid distance too far back"),
        IndexError("list index out of range"),
        TypeError("'NoneType' object is not subscriptable"),
        EOFError(),
        MemoryError(),
        ValueError("a message without the file"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_any_decoder_exception_is_a_value_error_naming_the_file(tmp_path, monkeypatch, raised):
    path = tmp_path / "image.png"
    path.write_bytes(gray_png(40, 40))

    def load(self):
        raise raised

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", load)
    for call in (lambda: load_image(path), lambda: CheXficientImageProcessor(size={"shortest_edge": 32})(path)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value).startswith(f"{path}: "), info.value
        assert type(raised).__name__ in str(info.value) or str(raised) in str(info.value)
    if isinstance(raised, MemoryError):
        assert isinstance(info.value, ImageTooLargeError)


def test_odd_files_and_settings_fail_naming_the_file(tmp_path):
    dds = tmp_path / "undecodable.dds"
    dds.write_bytes(undecodable_dds())
    with pytest.raises(ValueError, match=r"undecodable\.dds: not a recognised image file") as info:
        CheXficientImageProcessor()(dds)  # was NotImplementedError, naming nothing
    assert str(info.value).startswith(str(dds))
    small = tmp_path / "small.png"
    small.write_bytes(gray_png(40, 40))
    with pytest.raises(ValueError, match="crop 378x378 is larger than the resized image 40x40") as info:
        CheXficientImageProcessor(do_resize=False)(small)
    assert str(info.value).startswith(f"{small}: ")


LEAK_SCRIPT = """
import sys
sys.path[:0] = [{root!r}]
from image_decoding_chexficient import load_image

def outcome(path):
    try:
        image = load_image(path)
        return "decoded " + image.mode + " " + str(image.size)
    except ValueError as error:
        return "refused: " + str(error)

for path in sys.argv[1:-1]:
    outcome(path)
print(outcome(sys.argv[-1]))
"""


def test_a_decode_does_not_depend_on_what_was_decoded_before(tmp_path, monkeypatch):
    """A TGA opened first (Pillow imports its plugin, which has no signature, ahead of the others) made a later ICO
    decode as a TGA: "cannot load this image", where a fresh process decodes it. Every decode now tries the same
    formats in the same order."""
    tga, ico = tmp_path / "first.tga", tmp_path / "icon.ico"
    PIL.Image.new("L", (32, 19), 90).save(tga)
    PIL.Image.new("RGBA", (256, 256), (200, 10, 10, 255)).save(ico, sizes=[(256, 256), (48, 48)])
    script = tmp_path / "leak.py"
    script.write_text(LEAK_SCRIPT.format(root=str(ROOT)))

    def run(*paths) -> str:
        done = subprocess.run(
            [sys.executable, str(script), *map(str, paths)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    fresh = run(ico)
    assert run(tga, ico) == fresh
    assert fresh.startswith(f"refused: {ico}: not a recognised image file")  # ICO is not one of IMAGE_FORMATS

    # within this process: a registry in any order, Pillow's globals as a caller set them, all left as they were
    PIL.Image.init()
    monkeypatch.setattr(PIL.Image, "ID", ["TGA", *[name for name in PIL.Image.ID if name != "TGA"]])
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    before = (
        list(PIL.Image.ID),
        PIL.Image.MAX_IMAGE_PIXELS,
        PIL.PngImagePlugin.MAX_TEXT_CHUNK,
        list(warnings.filters),
    )
    gray = np.random.default_rng(2).integers(0, 256, (24, 20), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "GIF", "TIFF", "PPM", "WEBP"):
        data = encoded(PIL.Image.fromarray(gray), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        np.testing.assert_array_equal(np.asarray(load_image(data, name=fmt).convert("L")), gray, err_msg=fmt)
    for bad in (gray_png(40, 40)[:60], tga.read_bytes(), undecodable_dds()):
        with pytest.raises(ValueError):
            load_image(bad)
    after = (list(PIL.Image.ID), PIL.Image.MAX_IMAGE_PIXELS, PIL.PngImagePlugin.MAX_TEXT_CHUNK, list(warnings.filters))
    assert after == before and PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True


# ----- 4. non-finite pixels are errors; truncation detected however the file ends ---------------------------------


RAW = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) % 4096


@pytest.mark.parametrize(
    ("elements", "reason"),
    [
        (
            dict(WindowCenter=100, WindowWidth=0, VOILUTFunction="LINEAR_EXACT"),
            "WindowWidth 0 for VOILUTFunction LINEAR_EXACT",
        ),
        (dict(WindowCenter=100, WindowWidth=0, VOILUTFunction="SIGMOID"), "WindowWidth 0 for VOILUTFunction SIGMOID"),
        (dict(WindowCenter=100, WindowWidth=0), "WindowWidth 0 for VOILUTFunction LINEAR"),
        (dict(WindowCenter=100, WindowWidth=-5), "WindowWidth -5 for VOILUTFunction LINEAR"),
        (dict(WindowCenter="NaN", WindowWidth=100), "WindowCenter 'NaN': not a finite number"),
        (dict(WindowCenter=100, WindowWidth="inf"), "WindowWidth 'inf': not a finite number"),
        (dict(RescaleSlope="1e308", RescaleIntercept=0), "RescaleSlope 1e308 and RescaleIntercept 0"),
        (dict(RescaleSlope="NaN", RescaleIntercept=0), "RescaleSlope 'NaN': not a finite number"),
        (dict(RescaleSlope="inf", RescaleIntercept=0), "RescaleSlope 'inf': not a finite number"),
        (dict(RescaleSlope=1, RescaleIntercept="-inf"), "RescaleIntercept '-inf': not a finite number"),
        (dict(RescaleSlope=0, RescaleIntercept=0), "RescaleSlope 0: every pixel would map to one value"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else "",
)
def test_dicom_values_giving_non_finite_or_blank_pixels_are_errors_naming_the_field(tmp_path, elements, reason):
    path = tmp_path / "odd.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the non-standard DS strings it writes
        dicom_dataset(RAW, **elements).save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError) as info:
        CheXficientImageProcessor(size={"shortest_edge": 32})(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value), info.value


def test_linear_window_of_width_one_is_a_threshold(tmp_path):
    """C.11.2.1.2.1 with w = 1: at or below c - 0.5 black, above white; the old formula gave 0/0 = NaN at c - 0.5."""
    path = tmp_path / "threshold.dcm"
    dicom_dataset(RAW, WindowCenter=100.5, WindowWidth=1).save_as(path, enforce_file_format=True)
    decoded = load_image(path)[..., 0]
    np.testing.assert_array_equal(decoded, (RAW > 100).astype(np.float32))


def test_processed_pixel_values_are_checked_to_be_finite(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(gray_png(40, 40))
    processor = CheXficientImageProcessor(size={"shortest_edge": 32}, image_std=[0.3, 0.0, 0.3])
    with (
        np.errstate(divide="ignore"),
        pytest.raises(ValueError, match=r"non-finite pixel values \(check image_mean and image_std\)") as info,
    ):
        processor(path)
    assert str(info.value).startswith(f"{path}: ")


def smooth_rgb(height: int = 203, width: int = 301) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(7).normal(0, 20, (height, width, 3))
    return np.clip(np.stack([x * 0.8, y * 1.2, (x + y) * 0.5], -1) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("L", {}),
        ("RGB", {"subsampling": 2}),
        ("RGB", {"optimize": True, "quality": 30}),
        ("L", {"restart_marker_blocks": 4}),
        ("RGB", {"progressive": True}),
        ("L", {"progressive": True, "optimize": True}),
    ],
)
def test_jpeg_cut_with_its_end_marker_reappended_is_truncated(tmp_path, mode, options):
    """Cut and given back its end-of-image marker, a baseline JPEG decoded with a constant bottom, a progressive one
    without its later scans; complete JPEGs of every kind still decode exactly as Pillow does. (A progressive JPEG
    cut within its last scan, which only refines the last bit of some coefficients, is not detected.)"""
    data = encoded(PIL.Image.fromarray(smooth_rgb()).convert(mode), "JPEG", **options)
    complete = tmp_path / "complete.jpg"
    complete.write_bytes(data)
    with PIL.Image.open(complete) as image:
        np.testing.assert_array_equal(np.asarray(load_image(complete)), np.asarray(image))
    for fraction in (0.3,) if options.get("progressive") else (0.5, 0.9):  # progressive: its last scans cut off
        cut = tmp_path / f"cut_{fraction}.jpg"
        cut.write_bytes(data[: int(len(data) * fraction)] + b"\xff\xd9")
        with pytest.raises(ValueError, match="truncated") as info:
            CheXficientImageProcessor(size={"shortest_edge": 32})(cut)
        assert str(info.value).startswith(f"{cut}: ")
        with pytest.raises(ValueError, match="truncated"):
            load_image(cut.read_bytes(), name="upload")
