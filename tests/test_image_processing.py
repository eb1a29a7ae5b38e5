"""CheXficientImageProcessor against an independent PIL/numpy pipeline; 16-bit PNG, DICOM and bad inputs."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import dicom_dataset

from image_processing_chexficient import CheXficientImageProcessor, load_image


MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def reference_pipeline(image: PIL.Image.Image, size: int) -> np.ndarray:
    """The released transform written out plainly: RGB, Resize(size, BICUBIC), CenterCrop(size), /255, CLIP norm."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), PIL.Image.BICUBIC)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return ((array - MEAN) / STD).transpose(2, 0, 1)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit radiograph-like gradient with a blob (continuous, so resamplers agree closely)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    field = 0.4 * x + 0.3 * y + 0.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
    return (255 * field / field.max()).astype(np.uint8)


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1, **elements) -> None:
    dicom_dataset(pixels, photometric, 12, frames, **elements).save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("shape", [(500, 420), (420, 500), (379, 379), (378, 600)])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_matches_independent_reference_pipeline(shape, mode):
    gray = smooth_image(*shape)
    image = PIL.Image.fromarray(gray).convert(mode)
    processor = CheXficientImageProcessor()
    ours = processor(image)["pixel_values"][0].numpy()
    np.testing.assert_allclose(ours, reference_pipeline(image, 378), atol=1e-6)


def test_inputs_of_every_kind_agree(tmp_path):
    gray = smooth_image(120, 100)
    processor = CheXficientImageProcessor(size={"shortest_edge": 56})
    PIL.Image.fromarray(gray).save(tmp_path / "x.png")
    PIL.Image.fromarray(gray).save(tmp_path / "x.jpg", quality=100)
    expected = reference_pipeline(PIL.Image.fromarray(gray), 56)
    for source in (gray, torch.from_numpy(gray), str(tmp_path / "x.png"), (tmp_path / "x.png").read_bytes()):
        np.testing.assert_allclose(processor(source)["pixel_values"][0].numpy(), expected, atol=1e-6)
    jpeg = processor(tmp_path / "x.jpg")["pixel_values"][0].numpy()
    assert np.abs(jpeg - expected).mean() < 0.05  # lossy, but the same image
    batch = processor([gray, gray[::-1].copy()])["pixel_values"]
    assert batch.shape == (2, 3, 56, 56) and batch.dtype == torch.float32


def test_batched_tensor_path_approximates_pil_path():
    gray = smooth_image(512, 400)
    processor = CheXficientImageProcessor(size={"shortest_edge": 224})
    pil_path = processor(gray)["pixel_values"]
    tensor_path = processor.preprocess_tensor(torch.from_numpy(gray)[None, None])
    assert tensor_path.shape == pil_path.shape
    assert (tensor_path - pil_path).abs().mean() < 0.01
    assert (tensor_path - pil_path).abs().max() < 0.05
    batch = processor.preprocess_tensor(torch.from_numpy(np.stack([gray, gray]))[:, None])
    torch.testing.assert_close(batch[0], batch[1])


def test_16bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    values = np.full((64, 64), 20000, dtype=np.uint16)
    values[:, 32:] = 60000  # both halves are far above 255: clipping to 8 bits would make them equal
    PIL.Image.fromarray(values).save(tmp_path / "x16.png")
    assert PIL.Image.open(tmp_path / "x16.png").mode.startswith("I")
    processor = CheXficientImageProcessor(size={"shortest_edge": 64}, do_normalize=False)
    pixels = processor(tmp_path / "x16.png")["pixel_values"][0]
    np.testing.assert_allclose(pixels[:, 10, 5].numpy(), 20000 / 65535, rtol=1e-5)
    np.testing.assert_allclose(pixels[:, 10, 60].numpy(), 60000 / 65535, rtol=1e-5)
    # uint16 arrays and the PNG give the same result
    np.testing.assert_allclose(processor(values)["pixel_values"][0].numpy(), pixels.numpy(), atol=1e-6)


def test_16bit_gradient_resize_keeps_fine_levels(tmp_path):
    ramp = np.tile(np.linspace(30000, 30200, 80).astype(np.uint16), (80, 1))  # < one 8-bit level apart
    PIL.Image.fromarray(ramp).save(tmp_path / "ramp.png")
    processor = CheXficientImageProcessor(size={"shortest_edge": 40}, do_normalize=False)
    row = processor(tmp_path / "ramp.png")["pixel_values"][0, 0, 20].numpy()
    assert len(np.unique(np.round(row * 65535))) > 20  # 8-bit quantisation would leave one or two levels
    assert np.all(np.diff(row) >= -1e-6)


def _windowed(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def test_dicom_monochrome2_window_and_modality_lut(tmp_path):
    raw = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    write_dicom(tmp_path / "m2.dcm", raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=4000)
    decoded = load_image(tmp_path / "m2.dcm")
    assert decoded.dtype == np.float32 and decoded.shape == (64, 64, 1)
    expected = _windowed(raw.astype(np.float64) * 2 - 1000, 3000, 4000)
    np.testing.assert_allclose(decoded[..., 0], expected, atol=1e-6)
    processor = CheXficientImageProcessor(size={"shortest_edge": 64}, do_normalize=False)
    np.testing.assert_allclose(processor(tmp_path / "m2.dcm")["pixel_values"][0, 0].numpy(), expected, atol=1e-5)


def test_dicom_monochrome1_is_inverted_so_air_is_dark(tmp_path):
    raw = np.zeros((32, 32), dtype=np.uint16)
    raw[:, :16] = 4000  # in MONOCHROME1 high values are dark (air)
    raw[:, 16:] = 500
    write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1")
    write_dicom(tmp_path / "m2.dcm", raw, photometric="MONOCHROME2")
    m1, m2 = load_image(tmp_path / "m1.dcm")[..., 0], load_image(tmp_path / "m2.dcm")[..., 0]
    assert m1[0, 0] == pytest.approx(0.0) and m1[0, 31] == pytest.approx(1.0)  # min-max without a window
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    write_dicom(tmp_path / "w1.dcm", raw, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=4000)
    windowed = load_image(tmp_path / "w1.dcm")[..., 0]
    np.testing.assert_allclose(windowed, 1.0 - _windowed(raw.astype(np.float64), 2000, 4000), atol=1e-6)
    assert windowed[0, 0] < windowed[0, 31]


def test_dicom_detected_without_suffix_and_from_bytes(tmp_path):
    raw = np.tile(np.arange(32, dtype=np.uint16) * 100, (32, 1))
    write_dicom(tmp_path / "image.bin", raw)
    from_path = load_image(tmp_path / "image.bin")
    from_bytes = load_image((tmp_path / "image.bin").read_bytes())
    np.testing.assert_allclose(from_path, from_bytes)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(smooth_image(64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(_png_bytes()[:200]), "truncated"),
        (lambda p: p.write_bytes(b"this is a radiology report, not an image" * 10), "not a recognised image"),
    ],
)
def test_bad_files_raise_value_error_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ValueError, match=reason) as info:
        CheXficientImageProcessor()(str(path))
    assert str(path) in str(info.value)


def test_bad_dicoms_raise_value_error(tmp_path):
    write_dicom(tmp_path / "nopixels.dcm", np.zeros((0, 0)))
    with pytest.raises(ValueError, match="no pixel data") as info:
        load_image(tmp_path / "nopixels.dcm")
    assert "nopixels.dcm" in str(info.value)
    write_dicom(tmp_path / "frames.dcm", np.zeros((3, 16, 16)), frames=3)
    with pytest.raises(ValueError, match="multi-frame"):
        load_image(tmp_path / "frames.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(ValueError, match="junk.dcm"):
        load_image(tmp_path / "junk.dcm")


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((0, 10), dtype=np.uint8), "empty"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "channels"),
        (np.full((10, 10), 3.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((2, 2, 2, 2), dtype=np.uint8), "2-D or 3-D"),
        (np.full((4, 4), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_arrays_raise_value_error(array, reason):
    with pytest.raises(ValueError, match=reason):
        load_image(array)


def test_missing_file_and_unknown_option():
    with pytest.raises(ValueError, match="no such file"):
        load_image("/nonexistent/x.png")
    with pytest.raises(ValueError, match="unknown image processor option"):
        CheXficientImageProcessor()(np.zeros((8, 8), np.uint8), not_an_option=1)


def test_save_and_reload(tmp_path):
    processor = CheXficientImageProcessor(size={"shortest_edge": 64})
    processor.save_pretrained(tmp_path)
    reloaded = CheXficientImageProcessor.from_pretrained(tmp_path)
    assert reloaded.size == {"shortest_edge": 64} and reloaded.crop_size == {"height": 64, "width": 64}
    image = smooth_image(90, 70)
    torch.testing.assert_close(processor(image)["pixel_values"], reloaded(image)["pixel_values"])
