"""Hostile and oversized inputs: the pixel budget, decompression bombs, truncated files, and decoding memory."""

from __future__ import annotations

import gc
import io
import json
import struct
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import PIL.ImageFile
import pydicom
import pytest
import torch
from helpers import dicom_header
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from image_processing_chexficient import DEFAULT_MAX_IMAGE_PIXELS, CheXficientImageProcessor, load_image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, bit_depth: int = 8, rows_of_data: int = 0) -> bytes:
    """A grayscale PNG whose IHDR claims width x height, with only `rows_of_data` rows of (zero) pixel data."""
    row = b"\x00" + b"\x00" * (width * bit_depth // 8)  # filter byte + samples
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(row * rows_of_data))
        + png_chunk(b"IEND", b"")
    )


def noise_png(size: int = 512, bits: int = 8, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 2**bits, (size, size), dtype=np.uint16 if bits == 16 else np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# A header that claims 100000 x 100000 pixels in about 65 bytes.


def test_crafted_bomb_png_is_refused_from_its_header(tmp_path):
    data = crafted_png(100_000, 100_000)
    assert len(data) < 80
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    for call in (lambda: load_image(path), lambda: CheXficientImageProcessor()(str(path))):
        with pytest.raises(ValueError) as info:
            call()
        assert str(path) in str(info.value) and "10000000000" in str(info.value)  # names the file and its size
    with pytest.raises(ValueError, match="10000000000") as info:
        load_image(data, name="upload.png")
    assert "upload.png" in str(info.value)
    with pytest.raises(ValueError, match="bytes"):  # unnamed bytes are described by their type
        load_image(data)


def test_bomb_is_refused_without_touching_pillow_globals(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(crafted_png(12_000, 12_000))  # 144 MP: Pillow only warns (DecompressionBombWarning)
    limit, filters = PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with (
        pytest.warns(PIL.Image.DecompressionBombWarning),
        pytest.raises(ValueError, match="decompression bomb") as info,
    ):
        load_image(path, max_pixels=None)  # our budget off: what Pillow only warns about must still be refused
    assert str(path) in str(info.value) and "12000x12000 = 144000000 pixels" in str(info.value)
    assert PIL.Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters
    with warnings.catch_warnings():  # under -W error Pillow raises the warning itself: also a ValueError
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match="decompression bomb"):
            load_image(path, max_pixels=None)


def test_real_png_over_a_lowered_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(noise_png(1000))
    with pytest.raises(ValueError, match=r"1000x1000 = 1\.0 MP exceeds the 0\.5 MP limit") as info:
        load_image(path, max_pixels=500_000)
    assert str(path) in str(info.value)

    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match="max_image_pixels"):
        CheXficientImageProcessor(max_image_pixels=500_000)(path)


def test_budget_boundary_for_every_input_kind(tmp_path):
    at, over = np.zeros((500, 1000), np.uint8), np.zeros((501, 1000), np.uint8)
    PIL.Image.fromarray(at).save(tmp_path / "at.png")
    PIL.Image.fromarray(over).save(tmp_path / "over.png")
    accepted = [at, torch.from_numpy(at), PIL.Image.fromarray(at), tmp_path / "at.png", at.astype(np.uint16)]
    refused = [over, torch.from_numpy(over)[None], PIL.Image.fromarray(over), tmp_path / "over.png"]
    for source in accepted:
        load_image(source, max_pixels=500_000)
    for source in refused:
        with pytest.raises(ValueError, match=r"1000x501 = 0\.5 MP exceeds"):
            load_image(source, max_pixels=500_000)
    processor = CheXficientImageProcessor(size={"shortest_edge": 32}, max_image_pixels=500_000)
    assert processor(at)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor(over)
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor.load_image(tmp_path / "over.png")  # the processor's own loader uses its budget
    assert processor(over, max_image_pixels=None)["pixel_values"].shape == (1, 3, 32, 32)  # per-call override


def test_default_budget():
    assert DEFAULT_MAX_IMAGE_PIXELS == 60_000_000
    assert CheXficientImageProcessor().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=r"60\.0 MP limit"):
        load_image(np.zeros((1, 60_000_001), np.bool_))
    for bad in (0, -5, True):
        with pytest.raises(ValueError, match="max_image_pixels"):
            CheXficientImageProcessor(max_image_pixels=bad)


@pytest.mark.parametrize("value", [1_234_567, None])
def test_max_image_pixels_round_trips(tmp_path, value):
    CheXficientImageProcessor(max_image_pixels=value).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["max_image_pixels"] == value
    assert CheXficientImageProcessor.from_pretrained(tmp_path).max_image_pixels == value
    del saved["max_image_pixels"]  # a config saved before the budget existed gets the default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert CheXficientImageProcessor.from_pretrained(tmp_path).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


# Truncated files fail even where LOAD_TRUNCATED_IMAGES is set, and the setting is left as it was.


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("png8", noise_png(512, 8)),
        ("png16", noise_png(512, 16)),
        ("jpeg", noise_png(512, 8, "JPEG")),
    ],
)
@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_images_are_errors(tmp_path, monkeypatch, kind, data, load_truncated):
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    path = tmp_path / f"{kind}.img"
    path.write_bytes(data[: len(data) // 2])
    if load_truncated:  # the setting matters: plain Pillow zero-fills the missing half
        with PIL.Image.open(path) as image:
            image.load()
    with pytest.raises(ValueError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="truncated"):
        load_image(path.read_bytes(), name="upload")
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated


def test_concurrent_decoding_restores_load_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good, cut = noise_png(256), noise_png(256)[:3000]

    def decode(index: int) -> str:
        try:
            load_image(good if index % 2 else cut, name=f"image {index}")
            return "ok"
        except ValueError as error:
            return "truncated" if "truncated" in str(error) else str(error)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(decode, range(64)))
    assert results == ["truncated", "ok"] * 32
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_huge_16_bit_png_with_one_row_of_data(tmp_path, monkeypatch):
    path = tmp_path / "tall.png"
    path.write_bytes(crafted_png(13_000, 13_000, bit_depth=16, rows_of_data=1))
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for max_pixels, reason in ((DEFAULT_MAX_IMAGE_PIXELS, "169.0 MP exceeds"), (None, "decompression bomb")):
        with pytest.warns(PIL.Image.DecompressionBombWarning), pytest.raises(ValueError, match=reason) as info:
            load_image(path, max_pixels=max_pixels)
        assert str(path) in str(info.value) and "13000x13000" in str(info.value)


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("load_truncated", [False, True])
def test_png_whose_data_ends_early_is_an_error(tmp_path, monkeypatch, bit_depth, load_truncated):
    """A complete file whose zlib stream holds 20 of 200 rows: Pillow zero-fills it whatever LOAD_TRUNCATED_IMAGES."""
    path = tmp_path / "short.png"
    path.write_bytes(crafted_png(300, 200, bit_depth=bit_depth, rows_of_data=20))
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    with PIL.Image.open(path) as image:
        image.load()  # plain Pillow accepts it
    with pytest.raises(ValueError, match="truncated") as info:
        load_image(path)
    row = 1 + 300 * bit_depth // 8  # filter byte + samples
    assert str(path) in str(info.value) and f"{20 * row} of the {200 * row} bytes" in str(info.value)
    with pytest.raises(ValueError, match="truncated"):
        load_image(path.read_bytes())


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced_png(pixels: np.ndarray, bit_depth: int) -> bytes:
    """An Adam7-interlaced grayscale PNG (Pillow cannot write one), unfiltered."""
    height, width = pixels.shape
    data = b""
    for x, y, dx, dy in ADAM7:
        for row in pixels[y::dy, x::dx]:
            if row.size:
                values = row.astype(">u2") if bit_depth == 16 else row.astype(np.uint8)
                data += b"\x00" + (np.packbits(row.astype(bool)) if bit_depth == 1 else values).tobytes()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 1)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(data)) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (9, 7), (33, 17)])
@pytest.mark.parametrize("bit_depth", [1, 8, 16])
def test_interlaced_pngs(shape, bit_depth):
    """Interlaced PNGs always get the data check: the Adam7 pass sizes must add up exactly."""
    pixels = np.random.default_rng(3).integers(0, 2**bit_depth, shape)
    data = interlaced_png(pixels, bit_depth)
    decoded = load_image(data)
    expected = pixels * 255 if bit_depth == 1 else pixels
    got = decoded[..., 0] * 65535 if bit_depth == 16 else np.asarray(decoded)
    np.testing.assert_allclose(got, expected, atol=1e-2)
    header = data[:33]  # signature and IHDR
    short = header + png_chunk(b"IDAT", zlib.compress(b"\x00")) + png_chunk(b"IEND", b"")
    with pytest.raises(ValueError, match="truncated"):
        load_image(short)


@pytest.mark.parametrize("mode", ["1", "L", "P4", "P", "LA", "RGB", "RGBA", "I;16"])
def test_complete_pngs_of_every_kind_pass_the_data_check(mode):
    gray = np.random.default_rng(4).integers(0, 256, (37, 29), dtype=np.uint8)
    gray[-1] = 0  # a zero last row: the data check runs (for modes without alpha)
    image = PIL.Image.fromarray(gray)
    if mode.startswith("P"):
        image = image.quantize(16 if mode == "P4" else 200)
    elif mode == "I;16":
        image = PIL.Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"bits": 4} if mode == "P4" else {}))
    decoded = load_image(buffer.getvalue())
    assert (decoded.size if isinstance(decoded, PIL.Image.Image) else decoded.shape[1::-1]) == (29, 37)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_black_png_passes_the_data_check(dtype):
    """All-zero rows make the check inflate everything: a 1000:1 stream must still be counted in full."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.zeros((3000, 2000), dtype)).save(buffer, format="PNG", compress_level=9)
    assert len(buffer.getvalue()) < 40_000
    decoded = load_image(buffer.getvalue())
    assert np.asarray(decoded).max() == 0 and np.asarray(decoded).shape[:2] == (3000, 2000)


# DICOM: the header's Rows x Columns (x frames) and the codestream's own size are checked before decoding.


def dicom_file(path, rows: int, columns: int, pixel_data: bytes, frames: int = 1, syntax=ExplicitVRLittleEndian):
    ds = dicom_header(rows, columns, bits=16, frames=frames, syntax=syntax)
    ds.PixelData = pixel_data
    if syntax != ExplicitVRLittleEndian:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))


def test_dicom_over_budget_is_refused_without_decoding(tmp_path, no_pixel_decoding):
    dicom_file(tmp_path / "huge.dcm", 20_000, 20_000, b"\x00" * 128)
    with pytest.raises(ValueError, match=r"20000x20000 = 400\.0 MP exceeds the 60\.0 MP limit") as info:
        load_image(tmp_path / "huge.dcm")
    assert "huge.dcm" in str(info.value)
    with pytest.raises(ValueError, match="400.0 MP"):
        load_image((tmp_path / "huge.dcm").read_bytes())
    dicom_file(tmp_path / "frames.dcm", 5000, 5000, b"\x00" * 128, frames=3)
    with pytest.raises(ValueError, match=r"5000x5000x3 frames = 75\.0 MP"):
        load_image(tmp_path / "frames.dcm")


def test_dicom_exactly_at_budget_is_accepted(tmp_path):
    pixels = np.arange(40 * 25, dtype=np.uint16).reshape(40, 25)
    dicom_file(tmp_path / "at.dcm", 40, 25, pixels.tobytes())
    assert load_image(tmp_path / "at.dcm", max_pixels=1000).shape == (40, 25, 1)
    with pytest.raises(ValueError, match="exceeds"):
        load_image(tmp_path / "at.dcm", max_pixels=999)


def j2k_siz(width: int, height: int) -> bytes:
    """The start of a JPEG 2000 codestream: SOC and a SIZ segment claiming width x height, one 16-bit component."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, width, height, 0, 0, width, height, 0, 0, 1) + bytes([15, 1, 1])
    return b"\xff\x4f\xff\x51" + siz + b"\xff\xd9"


def test_dicom_codestream_bomb_is_refused_without_decoding(tmp_path, no_pixel_decoding):
    """64x64 in the DICOM header, 100000x100000 in the JPEG 2000 codestream: decoders trust the codestream."""
    dicom_file(tmp_path / "j2k.dcm", 64, 64, encapsulate([j2k_siz(100_000, 100_000)]), syntax=JPEG2000Lossless)
    with pytest.raises(ValueError, match=r"100000x100000 = 10000\.0 MP exceeds") as info:
        load_image(tmp_path / "j2k.dcm")
    assert "j2k.dcm" in str(info.value)


def test_dicom_codestream_disagreeing_with_its_header_is_refused(tmp_path, no_pixel_decoding):
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.zeros((96, 128), np.uint16)).save(buffer, format="JPEG2000", no_jp2=True)
    dicom_file(tmp_path / "liar.dcm", 64, 64, encapsulate([buffer.getvalue()]), syntax=JPEG2000Lossless)
    with pytest.raises(ValueError, match="compressed image is 128x96 but the DICOM header says 64x64"):
        load_image(tmp_path / "liar.dcm")


# Memory: decoding holds about three image-sized float32 buffers at most (tracemalloc sees numpy's allocations).


def traced_peak(function) -> tuple[object, int]:
    gc.collect()
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        result = function()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if not already:
            tracemalloc.stop()
    return result, peak


def test_16_bit_png_decoding_memory(tmp_path):
    height = width = 4000
    ramp = (np.arange(height * width, dtype=np.uint32) % 65536).astype(np.uint16).reshape(height, width)
    PIL.Image.fromarray(ramp).save(tmp_path / "x16.png", compress_level=1)
    image, peak = traced_peak(lambda: load_image(tmp_path / "x16.png"))
    float_image = height * width * 4
    assert image.shape == (height, width, 1) and image.dtype == np.float32
    # uint16 bytes (2 B/px) + the float32 result (4 B/px) = 1.5 images; the old int64 path peaked at 4.0
    assert peak < 3.5 * float_image, f"peak {peak / float_image:.2f} float32 images"
    np.testing.assert_array_equal(image[1, :8, 0], ramp[1, :8] / np.float32(65535))


def test_dicom_decoding_memory(tmp_path):
    height = width = 2000
    raw = (np.arange(height * width, dtype=np.uint32) % 4096).astype(np.uint16).reshape(height, width)
    ds = dicom_header(
        height,
        width,
        photometric="MONOCHROME1",
        bits=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=3000,
        WindowWidth=4000,
    )
    ds.PixelData = raw.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    image, peak = traced_peak(lambda: load_image(tmp_path / "x.dcm"))
    float_image = height * width * 4
    assert image.shape == (height, width, 1) and image.dtype == np.float32
    # file bytes + decoded uint16 + float32 result + float64 blocks; the old float64 path peaked at 7.0
    assert peak < 3.5 * float_image, f"peak {peak / float_image:.2f} float32 images"
    expected = 1 - np.clip((raw[7, :8] * 2.0 - 1000 - 2999.5) / 3999 + 0.5, 0, 1)
    np.testing.assert_allclose(image[7, :8, 0], expected, atol=1e-6)
