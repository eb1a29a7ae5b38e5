"""Compressed DICOM through load_image / CheXficientImageProcessor, one file per transfer syntax; VOI LUT functions.

The files are pydicom's own test data that ship inside the pydicom wheel (no download). Lossless syntaxes must match
their uncompressed twin exactly, lossy ones closely. No test is skipped: a missing decoder fails the test, so CI must
install the `dicom` extra's decoders (`pylibjpeg[all]`).
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import pydicom
import pytest
import torch
from helpers import dicom_dataset as make_dicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from image_processing_chexficient import DICOM_DECODERS_HINT, CheXficientImageProcessor, load_image


def shipped(name: str) -> str:
    """Path of a pydicom test file that is installed with pydicom (never downloaded)."""
    folder = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    path = os.path.join(folder, name)
    assert os.path.isfile(path), f"{name} is not shipped with pydicom {pydicom.__version__}"
    assert get_testdata_file(name) == path
    return path


def raw_pixels(name: str) -> np.ndarray:
    return raw_pixels_of(shipped(name))


def raw_pixels_of(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def transfer_syntax(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


# pydicom's reference values for its SC_rgb colour bars (tests/pixels/pixels_reference.py): row -> RGB at column 50.
SC_RGB_BARS = {
    5: (255, 0, 0),
    15: (255, 128, 128),
    25: (0, 255, 0),
    35: (128, 255, 128),
    45: (0, 0, 255),
    55: (128, 128, 255),
    65: (0, 0, 0),
    75: (64, 64, 64),
    85: (192, 192, 192),
    95: (255, 255, 255),
}


def test_uncompressed_twins_are_the_reference_images():
    """Anchor the twins: MR_small.dcm and the RLE colour bars hold pydicom's documented reference values."""
    mr = raw_pixels("MR_small.dcm")
    assert tuple(mr[0, 31:34]) == (422, 319, 361) and tuple(mr[-1, -3:]) == (1369, 1129, 862)
    bars = raw_pixels("SC_rgb_rle.dcm")
    for row, rgb in SC_RGB_BARS.items():
        assert tuple(bars[row, 50]) == rgb


@pytest.mark.parametrize(
    ("name", "twin", "syntax"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm", RLELossless),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", JPEGLSLossless),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", JPEG2000Lossless),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", JPEGLosslessSV1),  # JPEG Lossless, Process 14 SV1, 8-bit RGB
    ],
)
def test_lossless_syntaxes_match_their_twin_exactly(name, twin, syntax):
    assert transfer_syntax(shipped(name)) == syntax
    np.testing.assert_array_equal(raw_pixels(name), raw_pixels(twin))
    decoded, reference = load_image(shipped(name)), load_image(shipped(twin))
    assert decoded.dtype == np.float32 and decoded.shape == reference.shape
    np.testing.assert_array_equal(decoded, reference)


@pytest.mark.parametrize(
    ("name", "syntax", "max_levels"),
    [
        ("SC_rgb_dcmtk_+eb+cr.dcm", JPEGBaseline8Bit, 2),  # JPEG Baseline, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit, 8),  # JPEG Baseline, YBR_FULL
        ("SC_rgb_jls_lossy_line.dcm", JPEGLSNearLossless, None),  # bounded by the codestream's NEAR
        ("SC_rgb_gdcm_KY.dcm", JPEG2000, 2),  # JPEG 2000 (lossy syntax)
    ],
)
def test_lossy_syntaxes_are_close_to_the_colour_bars(name, syntax, max_levels):
    assert transfer_syntax(shipped(name)) == syntax
    if max_levels is None:  # JPEG-LS near-lossless: every sample within NEAR of the original, by definition
        fragments = generate_fragments(pydicom.dcmread(shipped(name)).PixelData)
        next(fragments)
        stream = next(fragments)
        scan = stream.find(b"\xff\xda")
        max_levels = stream[scan + 5 + 2 * stream[scan + 4]]  # SOS: Ls, Ns, (Ci, Tmi) x Ns, NEAR
        assert max_levels > 0
    difference = np.abs(raw_pixels(name).astype(int) - raw_pixels("SC_rgb_rle.dcm").astype(int))
    assert difference.max() <= max_levels
    decoded, reference = load_image(shipped(name)), load_image(shipped("SC_rgb_rle.dcm"))
    assert decoded.shape == reference.shape == (100, 100, 3)
    assert np.abs(decoded - reference).max() <= max_levels / 255 + 1e-6


def test_jpeg_extended_12_bit():
    name = "JPGExtended.dcm"  # pydicom's fixed 12-bit JPEG Extended file; no uncompressed twin ships with pydicom
    assert transfer_syntax(shipped(name)) == JPEGExtended12Bit
    pixels = raw_pixels(name)
    assert pixels.shape == (1024, 256) and pixels.dtype == np.uint16
    assert pixels[420, 140] == 244 and pixels[230, 120] == 95  # pydicom's reference values
    assert pixels.max() > 255  # more than 8 bits survived
    decoded = load_image(shipped(name))
    values = pixels.astype(np.float64)  # no window in the file: min-max scaling
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(decoded[..., 0], expected, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG Baseline
        "JPGExtended.dcm",  # JPEG Extended 12-bit
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless, 16-bit
        "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
        "693_J2KI.dcm",  # JPEG 2000, 14-bit with rescale and window
        "MR_small_RLE.dcm",  # RLE Lossless
    ],
)
def test_processor_accepts_every_compressed_syntax(name):
    processor = CheXficientImageProcessor(size={"shortest_edge": 32})
    pixels = processor(shipped(name))["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()
    from_bytes = processor(open(shipped(name), "rb").read())["pixel_values"]
    torch.testing.assert_close(from_bytes, pixels)


# Synthetic radiographs: a 12-bit MONOCHROME1 image compressed by pydicom's own encoders must round-trip exactly.


def radiograph(height: int = 96, width: int = 80) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    field = 0.3 + 0.4 * x + 0.2 * np.exp(-((x - 0.5) ** 2 + (y - 0.45) ** 2) / 0.03)
    noise = np.random.default_rng(1).normal(0, 0.01, field.shape)
    return np.clip((field + noise) * 4095, 0, 4095).astype(np.uint16)


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME1", bits: int = 12, **elements) -> Dataset:
    return make_dicom(pixels, photometric, bits, **elements)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_synthetic_12_bit_radiograph_round_trips_exactly(tmp_path, syntax):
    pixels = radiograph()
    elements = dict(RescaleSlope=1, RescaleIntercept=0, WindowCenter=2048, WindowWidth=3000)
    dicom_dataset(pixels, **elements).save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    compressed = dicom_dataset(pixels, **elements)
    compressed.compress(syntax)
    compressed.save_as(tmp_path / "packed.dcm", enforce_file_format=True)
    assert transfer_syntax(tmp_path / "packed.dcm") == syntax
    assert (tmp_path / "packed.dcm").stat().st_size < (tmp_path / "plain.dcm").stat().st_size
    np.testing.assert_array_equal(load_image(tmp_path / "packed.dcm"), load_image(tmp_path / "plain.dcm"))


def test_synthetic_monochrome_jpeg_baseline(tmp_path):
    gray = (radiograph() >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(gray).save(buffer, format="JPEG", quality=95)
    ds = dicom_dataset(gray, photometric="MONOCHROME2", bits=8, LossyImageCompression="01")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "baseline.dcm", enforce_file_format=True)
    pixels = raw_pixels_of(tmp_path / "baseline.dcm")
    pillow = np.asarray(PIL.Image.open(io.BytesIO(buffer.getvalue())))
    assert np.abs(pixels.astype(int) - pillow.astype(int)).max() <= 1  # decoders may differ by one IDCT level
    assert np.abs(pixels.astype(int) - gray.astype(int)).mean() < 1.5
    values = pixels.astype(np.float64)
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(load_image(tmp_path / "baseline.dcm")[..., 0], expected, atol=1e-6)


# A missing decoder names the file, the transfer syntax and what to install.


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
        ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),
        ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ],
)
def test_missing_decoder_says_what_to_install(monkeypatch, name, syntax):
    monkeypatch.setattr(get_decoder(syntax), "_available", {})  # as if no plugin were installed
    with pytest.raises(ValueError, match="no decoder is installed") as info:
        load_image(shipped(name))
    message = str(info.value)
    assert name in message and syntax.name in message and str(syntax) in message
    assert DICOM_DECODERS_HINT in message and "pylibjpeg[all]" in message


def test_12_bit_jpeg_with_only_pillow_says_what_to_install(monkeypatch):
    decoder = get_decoder(JPEGExtended12Bit)
    monkeypatch.setattr(decoder, "_available", {"pillow": decoder._available["pillow"]})  # Pillow: 8-bit only
    with pytest.raises(ValueError, match="cannot decode DICOM pixel data") as info:
        load_image(shipped("JPGExtended.dcm"))
    message = str(info.value)
    assert "JPGExtended.dcm" in message and JPEGExtended12Bit.name in message and DICOM_DECODERS_HINT in message


def cut_codestream(name: str, path, keep: float = 0.5) -> None:
    """Save `name` with its (single) compressed frame cut to `keep` of its length, as a broken transfer would."""
    ds = pydicom.dcmread(shipped(name))
    fragments = generate_fragments(ds.PixelData)
    next(fragments)
    stream = next(fragments)
    ds.PixelData = encapsulate([stream[: int(len(stream) * keep) // 2 * 2]])
    ds.save_as(path)


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "JPGExtended.dcm"],
)
@pytest.mark.parametrize("keep", [0.34, 0.5, 0.97])
def test_truncated_jpeg_codestreams_are_refused(tmp_path, name, keep):
    """libjpeg zero-fills what is missing without an error: pydicom alone returns a partly black image."""
    cut_codestream(name, tmp_path / "cut.dcm", keep)
    assert pydicom.dcmread(tmp_path / "cut.dcm").pixel_array.size  # the decoder itself does not object
    with pytest.raises(ValueError, match="truncated compressed pixel data") as info:
        load_image(tmp_path / "cut.dcm")
    assert "cut.dcm" in str(info.value)


def test_corrupt_codestream_with_decoders_installed_has_no_install_hint(tmp_path):
    cut_codestream("MR_small_jp2klossless.dcm", tmp_path / "cut.dcm")
    with pytest.raises(ValueError, match="cannot decode DICOM pixel data") as info:
        load_image(tmp_path / "cut.dcm")
    assert "cut.dcm" in str(info.value) and DICOM_DECODERS_HINT not in str(info.value)


# VOI LUT sequence and VOILUTFunction windows against the standard's formulas (PS3.3 C.11.2.1.1 - C.11.2.1.3).

RAW = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
MODALITY = RAW.astype(np.float64) * 2 - 1000  # RescaleSlope 2, RescaleIntercept -1000: -1000 .. 7190


def windowed_file(tmp_path, photometric: str = "MONOCHROME2", **elements):
    dicom_dataset(RAW, photometric=photometric, RescaleSlope=2, RescaleIntercept=-1000, **elements).save_as(
        tmp_path / "w.dcm", enforce_file_format=True
    )
    return tmp_path / "w.dcm"


@pytest.mark.parametrize(
    ("entries", "first_mapped", "bits", "vr"),
    [
        (1024, 2000, 12, "OW"),
        (4096, 0, 8, "US"),  # an 8-bit LUT of more than 256 entries: pydicom's apply_voi_lut wraps its index here
        (2048, 1500, 16, "OW"),
    ],
)
def test_voi_lut_sequence(tmp_path, entries, first_mapped, bits, vr):
    top = 2**bits - 1
    table = np.round(top * np.sqrt(np.arange(entries) / (entries - 1))).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    item.add_new("LUTData", vr, table.tobytes() if vr == "OW" else table.tolist())
    # C.11.2.1.1: inputs below the first mapped value take the first entry, above the last the last entry
    index = np.clip(MODALITY - first_mapped, 0, entries - 1).astype(int)
    expected = table[index] / top
    for photometric, want in (("MONOCHROME2", expected), ("MONOCHROME1", 1 - expected)):
        # a window is present too: the VOI LUT takes precedence, as pydicom and the standard's viewers do
        path = windowed_file(tmp_path, photometric, VOILUTSequence=[item], WindowCenter=100, WindowWidth=10)
        decoded = load_image(path)[..., 0]
        np.testing.assert_allclose(decoded, want, atol=1e-6)
    assert 0 < (expected == 0).sum() and 0 < (expected == 1).sum()  # both clamped ends are exercised


def test_voi_lut_in_a_big_endian_file(tmp_path):
    table = np.arange(0, 4096, 4, dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [table.size, 0, 12]
    item.add_new("LUTData", "OW", table.astype(">u2").tobytes())
    ds = dicom_dataset(RAW, photometric="MONOCHROME2", VOILUTSequence=[item])
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = RAW.astype(">u2").tobytes()
    ds.save_as(tmp_path / "be.dcm", enforce_file_format=True, little_endian=False, implicit_vr=False)
    assert pydicom.dcmread(tmp_path / "be.dcm").file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    expected = table[np.clip(RAW.astype(int), 0, table.size - 1)] / 4095
    np.testing.assert_allclose(load_image(tmp_path / "be.dcm")[..., 0], expected, atol=1e-6)


def test_window_sigmoid(tmp_path):
    center, width = 3000.0, 1500.0
    decoded = load_image(windowed_file(tmp_path, WindowCenter=center, WindowWidth=width, VOILUTFunction="SIGMOID"))
    # C.11.2.1.3.1: y = (y_max - y_min) / (1 + exp(-4 (x - c) / w)) + y_min, onto [0, 1]
    expected = 1.0 / (1.0 + np.exp(-4.0 * (MODALITY - center) / width))
    np.testing.assert_allclose(decoded[..., 0], expected, atol=1e-6)
    assert decoded[0, 0, 0] < 0.01 and decoded[0, -1, 0] > 0.99


def test_window_linear_exact(tmp_path):
    center, width = 3000.0, 2000.0
    decoded = load_image(
        windowed_file(tmp_path, WindowCenter=center, WindowWidth=width, VOILUTFunction="LINEAR_EXACT")
    )
    # C.11.2.1.3.2: x <= c - w/2 -> y_min; x > c + w/2 -> y_max; else ((x - c) / w + 0.5) (y_max - y_min) + y_min
    x = MODALITY
    expected = np.where(
        x <= center - width / 2, 0.0, np.where(x > center + width / 2, 1.0, (x - center) / width + 0.5)
    )
    np.testing.assert_allclose(decoded[..., 0], expected, atol=1e-6)
    inside = (x > center - width / 2) & (x < center + width / 2)
    assert inside.any() and (~inside).any()


def test_window_linear_uses_the_first_of_several_windows(tmp_path):
    center, width = 3000.0, 2000.0
    decoded = load_image(windowed_file(tmp_path, WindowCenter=[center, 40.0], WindowWidth=[width, 400.0]))
    # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> y_min; x > c - 0.5 + (w-1)/2 -> y_max; else ((x - (c-0.5)) / (w-1) + 0.5)
    x, low, high = MODALITY, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    expected = np.where(x <= low, 0.0, np.where(x > high, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5))
    np.testing.assert_allclose(decoded[..., 0], expected, atol=1e-6)


def test_voi_lut_inputs_beyond_16_bits_take_the_last_entry(tmp_path):
    """Modality output above 65535 (RescaleSlope 20): C.11.2.1.1 maps it to the last entry, without wrapping."""
    table = np.arange(0, 4096, 4, dtype=np.uint16)  # 1024 entries, 12-bit output
    item = Dataset()
    item.LUTDescriptor = [table.size, 0, 12]
    item.LUTData = table.tobytes()
    item["LUTData"].VR = "OW"
    dicom_dataset(RAW, photometric="MONOCHROME2", RescaleSlope=20, RescaleIntercept=0, VOILUTSequence=[item]).save_as(
        tmp_path / "w.dcm", enforce_file_format=True
    )
    modality = RAW.astype(np.float64) * 20  # 0 .. 81900
    expected = table[np.clip(modality, 0, table.size - 1).astype(int)] / 4095
    assert (modality > 65535).any()
    np.testing.assert_allclose(load_image(tmp_path / "w.dcm")[..., 0], expected, atol=1e-6)
