"""CheXficient image processor: chest radiographs from PNG, JPEG, 16-bit PNG, DICOM, arrays or tensors to pixel_values.

The pipeline is the released model's: shortest edge to 378 (bicubic), centre crop 378, scale to [0, 1], OpenAI-CLIP
mean/std, grayscale replicated to three channels. 8-bit inputs follow the reference path bit for bit (PIL resize in
8 bits); high-bit-depth inputs (16-bit PNG, DICOM) are resized in float and are never clipped to 8 bits.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging


logger = logging.get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

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


def _float_image(array: np.ndarray, where: str) -> np.ndarray:
    """Validate a float image in [0, 1] and return it as float32 [H, W, C]."""
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: image contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"{where}: float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "pass uint8/uint16 data or scale it first."
        )
    return np.clip(array, 0.0, 1.0)


def _from_array(array: np.ndarray, where: str, channels_first: bool) -> DecodedImage:
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
        if array.min() < 0:
            raise ValueError(f"{where}: integer images must be non-negative, got a minimum of {array.min()}.")
        bits = 16 if array.max() <= 65535 else 32
        return array.astype(np.float32) / float(2**bits - 1)
    if np.issubdtype(array.dtype, np.floating):
        return _float_image(array, where)
    raise ValueError(f"{where}: unsupported dtype {array.dtype}.")


def _from_pil(image: PIL.Image.Image, where: str) -> DecodedImage:
    """Any PIL mode -> 8-bit "L"/"RGB" image, or float [H, W, 1] for 16/32-bit grayscale modes."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where}: image is empty ({image.width}x{image.height}).")
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image, dtype=np.int64)  # "I;16*" and "I" (how Pillow opens 16-bit PNGs)
        return _from_array(array, where, channels_first=False)
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


def decode_dicom(source: str | os.PathLike | bytes, where: str) -> np.ndarray:
    """A single-frame DICOM -> float32 [H, W, 1 or 3] in [0, 1], air dark.

    Applies the modality LUT (rescale slope/intercept), then the VOI LUT or the first window (min-max scaling when
    the file has neither), and inverts MONOCHROME1.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:
        raise ImportError(f"{where}: reading DICOM needs pydicom (`pip install pydicom`).") from error

    handle = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    try:
        dataset = pydicom.dcmread(handle, force=True)
    except Exception as error:  # pydicom raises many types on corrupt files
        raise ValueError(f"{where}: not a readable DICOM file ({error}).") from error
    if "PixelData" not in dataset:
        raise ValueError(f"{where}: DICOM file has no pixel data.")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{where}: multi-frame DICOM ({frames} frames) is not supported; pass a single radiograph.")
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise ValueError(f"{where}: cannot decode DICOM pixel data ({error}).") from error
    if pixels.size == 0:
        raise ValueError(f"{where}: DICOM pixel data is empty.")

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        bits = int(dataset.get("BitsStored", 8))
        return _float_image(pixels.astype(np.float32) / float(2**bits - 1), where).reshape(*pixels.shape[:2], -1)

    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset:
        lut_bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        image = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
        image = np.clip(image / float(2**lut_bits - 1), 0.0, 1.0)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
        image = _window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth), function)
    else:
        low, high = float(values.min()), float(values.max())
        image = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)[..., None]


def load_image(source: ImageSource, name: str | None = None) -> DecodedImage:
    """Decode one image from a path, raw bytes, PIL image, numpy array [H, W(, C)] or tensor [(C,) H, W].

    Returns an 8-bit PIL image ("L" or "RGB") or a float32 array [H, W, 1 or 3] in [0, 1]. Every failure is a
    `ValueError` naming the input and the reason.
    """
    where = _describe(source, name)
    if isinstance(source, PIL.Image.Image):
        return _from_pil(source, where)
    if isinstance(source, torch.Tensor):
        return _from_array(source.detach().cpu().numpy(), where, channels_first=source.ndim == 3)
    if isinstance(source, np.ndarray):
        return _from_array(source, where, channels_first=False)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{where}: no such file.")
        if path.stat().st_size == 0:
            raise ValueError(f"{where}: empty file (0 bytes).")
        if path.suffix.lower() in DICOM_SUFFIXES:
            return decode_dicom(path, where)
        with path.open("rb") as handle:
            head = handle.read(132)
        if _is_dicom_bytes(head):
            return decode_dicom(path, where)
        return _open_pil(path, where)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError(f"{where}: empty input (0 bytes).")
        if _is_dicom_bytes(data):
            return decode_dicom(data, where)
        return _open_pil(io.BytesIO(data), where)
    raise ValueError(f"{where}: unsupported input type {type(source).__name__}.")


def _open_pil(handle: Path | io.BytesIO, where: str) -> DecodedImage:
    try:
        with PIL.Image.open(handle) as image:
            image.load()  # decode now, so that truncated files fail here
            if getattr(image, "n_frames", 1) > 1:
                logger.warning("%s: multi-frame image, using the first frame.", where)
            return _from_pil(image, where)
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{where}: not a recognised image file.") from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{where}: corrupt or truncated image ({error}).") from error


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `shortest_edge`, the longer one truncated (torchvision)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_box(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int]:
    """(top, left) of a centred crop, rounded half to even like torchvision's CenterCrop."""
    return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))


class CheXficientImageProcessor(BaseImageProcessor):
    r"""
    Image processor of CheXficient.

    Args:
        do_resize (`bool`, defaults to `True`): scale the shorter side to `size["shortest_edge"]`.
        size (`dict`, defaults to `{"shortest_edge": 378}`): target of the resize.
        resample (`int`, defaults to `PIL.Image.BICUBIC`): PIL resampling filter.
        do_center_crop (`bool`, defaults to `True`): crop the centre to `crop_size`.
        crop_size (`dict`, defaults to `{"height": 378, "width": 378}`): size of the crop.
        do_rescale (`bool`, defaults to `True`): divide 8-bit values by 255 (`rescale_factor`).
        rescale_factor (`float`, defaults to `1/255`): scale of 8-bit inputs.
        do_normalize (`bool`, defaults to `True`): subtract `image_mean` and divide by `image_std`.
        image_mean, image_std (`list[float]`): OpenAI-CLIP statistics, as the released model was trained with.
        do_convert_rgb (`bool`, defaults to `True`): replicate grayscale to three channels.

    Inputs may be file paths (PNG, JPEG, 8- or 16-bit, DICOM), raw bytes, PIL images, numpy arrays [H, W(, C)] or
    tensors [(C,) H, W] (uint8, uint16, or float in [0, 1]). For throughput on a GPU, `preprocess_tensor` runs the
    same pipeline on an already-decoded batch.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = PIL.Image.BICUBIC,
        do_center_crop: bool = True,
        crop_size: dict[str, int] | int | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        size = {"shortest_edge": 378} if size is None else dict(size)
        if "shortest_edge" not in size:
            raise ValueError(f"size must be {{'shortest_edge': int}}, got {size}.")
        if crop_size is None:
            crop_size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
        elif isinstance(crop_size, int):
            crop_size = {"height": crop_size, "width": crop_size}
        self.do_resize = do_resize
        self.size = {"shortest_edge": int(size["shortest_edge"])}
        self.resample = int(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = {"height": int(crop_size["height"]), "width": int(crop_size["width"])}
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        self.do_convert_rgb = do_convert_rgb

    load_image = staticmethod(load_image)

    def _resize(self, image: DecodedImage) -> DecodedImage:
        height, width = (image.height, image.width) if isinstance(image, PIL.Image.Image) else image.shape[:2]
        new_height, new_width = resize_output_size(height, width, self.size["shortest_edge"])
        resample = PIL.Image.Resampling(self.resample)
        if isinstance(image, PIL.Image.Image):
            return image.resize((new_width, new_height), resample=resample)
        channels = [
            np.asarray(PIL.Image.fromarray(image[..., c], mode="F").resize((new_width, new_height), resample=resample))
            for c in range(image.shape[-1])
        ]
        return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)  # bicubic overshoot clipped like 8-bit PIL

    def _crop(self, image: DecodedImage) -> DecodedImage:
        height, width = (image.height, image.width) if isinstance(image, PIL.Image.Image) else image.shape[:2]
        crop_height, crop_width = self.crop_size["height"], self.crop_size["width"]
        if crop_height > height or crop_width > width:
            raise ValueError(
                f"crop {crop_height}x{crop_width} is larger than the resized image {height}x{width}; "
                "enable do_resize or lower crop_size."
            )
        top, left = center_crop_box(height, width, crop_height, crop_width)
        if isinstance(image, PIL.Image.Image):
            return image.crop((left, top, left + crop_width, top + crop_height))
        return image[top : top + crop_height, left : left + crop_width]

    def _to_array(self, image: DecodedImage) -> np.ndarray:
        """Decoded image -> float32 [C, H, W] ready for the model."""
        if isinstance(image, PIL.Image.Image):
            array = np.asarray(image, dtype=np.float32)
            array = array * self.rescale_factor if self.do_rescale else array
        else:
            array = image.astype(np.float32, copy=False)
        if array.ndim == 2:
            array = array[..., None]
        if self.do_convert_rgb and array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[: array.shape[-1]]
            std = np.asarray(self.image_std, dtype=np.float32)[: array.shape[-1]]
            array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def process_one(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        """Decode and preprocess one image -> float32 [3, crop_h, crop_w]."""
        image = self.load_image(source, name)
        if self.do_resize:
            image = self._resize(image)
        if self.do_center_crop:
            image = self._crop(image)
        return self._to_array(image)

    def preprocess(
        self,
        images: ImageSource | Sequence[ImageSource],
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Preprocess one image or a list of images into `pixel_values` [B, 3, crop_h, crop_w]."""
        if kwargs:  # per-call overrides of the processor's settings, e.g. `do_center_crop=False`
            processor = copy.copy(self)
            for key, value in kwargs.items():
                if key not in self.to_dict():
                    raise ValueError(f"unknown image processor option {key!r}.")
                setattr(processor, key, value)
            return processor.preprocess(images, return_tensors=return_tensors)
        if isinstance(images, (list, tuple)):
            batch = list(images)
        elif isinstance(images, torch.Tensor) and images.ndim == 4:
            batch = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            batch = list(images)
        else:
            batch = [images]
        if not batch:
            raise ValueError("no images to preprocess.")
        pixel_values = np.stack([self.process_one(image) for image in batch])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Batched, device-side preprocessing of decoded images of one size.

        `images` [B, C, H, W] (C 1 or 3) as uint8, or float in [0, 1] (for 16-bit data) -> pixel_values
        [B, 3, crop_h, crop_w] in float32 on the same device. Bicubic resize with antialiasing approximates PIL's
        filter (not bit-exact); use it for throughput, the PIL path for reference numerics.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"preprocess_tensor expects [B, 1 or 3, H, W], got shape {tuple(images.shape)}.")
        pixels = images.float() * self.rescale_factor if images.dtype == torch.uint8 else images.float()
        if self.do_resize:
            height, width = resize_output_size(pixels.shape[-2], pixels.shape[-1], self.size["shortest_edge"])
            pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.clamp_(0.0, 1.0)
        if self.do_center_crop:
            crop_height, crop_width = self.crop_size["height"], self.crop_size["width"]
            top, left = center_crop_box(pixels.shape[-2], pixels.shape[-1], crop_height, crop_width)
            pixels = pixels[..., top : top + crop_height, left : left + crop_width]
        if self.do_convert_rgb and pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, device=pixels.device).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, device=pixels.device).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()


CheXficientImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CheXficientImageProcessor", "decode_dicom", "load_image"]
