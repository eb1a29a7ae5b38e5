"""CheXficient image processor: decoded chest radiographs to the model's pixel_values.

The pipeline is the released model's: shortest edge to 378 (bicubic), centre crop 378, scale to [0, 1], OpenAI-CLIP
mean/std, grayscale replicated to three channels. 8-bit inputs follow the reference path bit for bit (PIL resize in
8 bits); high-bit-depth inputs (16-bit PNG, DICOM) are resized in float and are never clipped to 8 bits.

Files, bytes, arrays and tensors are decoded by `image_decoding_chexficient.py` (PNG, JPEG, 16-bit PNG, DICOM, with
its pixel budget and aspect-ratio limit, checked from the header against the decoded and the resized size, and its
guards against decompression bombs, truncated files and non-finite pixels), which travels with this file. Every
failure on a bad input is a `ValueError` naming it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


try:
    from .image_decoding_chexficient import (
        DEFAULT_MAX_ASPECT_RATIO,
        DEFAULT_MAX_IMAGE_PIXELS,
        DecodedImage,
        ImageAspectRatioError,
        ImageSource,
        ImageTooLargeError,
        check_image_shape,
        describe_source,
        load_image,
        resize_output_size,
    )
    from .image_decoding_chexficient import DICOM_DECODERS_HINT as DICOM_DECODERS_HINT
except ImportError:
    # a top-level module (a checkout, the wheel): imported by name, which transformers < 4.52's scanner of remote
    # code (a regex that keeps `except` bodies) would take for a package to install
    _decoding = importlib.import_module("image_decoding_chexficient")
    DEFAULT_MAX_ASPECT_RATIO = _decoding.DEFAULT_MAX_ASPECT_RATIO
    DEFAULT_MAX_IMAGE_PIXELS = _decoding.DEFAULT_MAX_IMAGE_PIXELS
    DecodedImage = _decoding.DecodedImage
    ImageAspectRatioError = _decoding.ImageAspectRatioError
    ImageSource = _decoding.ImageSource
    ImageTooLargeError = _decoding.ImageTooLargeError
    check_image_shape = _decoding.check_image_shape
    describe_source = _decoding.describe_source
    load_image = _decoding.load_image
    resize_output_size = _decoding.resize_output_size
    DICOM_DECODERS_HINT = _decoding.DICOM_DECODERS_HINT


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        max_image_pixels (`int` or `None`, defaults to `DEFAULT_MAX_IMAGE_PIXELS`, 60 MP): largest image accepted
            (width x height, read from the header before decoding); larger ones raise `ValueError`. `None` disables
            it; Pillow's `PIL.Image.MAX_IMAGE_PIXELS` (about 89 MP) still bounds PNG/JPEG decoding. With `do_resize`,
            the resized image (short side `size["shortest_edge"]`) is held to the same budget.
        max_aspect_ratio (`float` or `None`, defaults to `DEFAULT_MAX_ASPECT_RATIO`, 20): largest ratio of an
            image's long side to its short side, read from the header before decoding; thinner images raise
            `ImageAspectRatioError` (a `ValueError`). `None` disables it.

    Inputs may be file paths (PNG, JPEG, 8- or 16-bit, DICOM), raw bytes, PIL images, numpy arrays [H, W(, C)] or
    tensors [(C,) H, W] (uint8, uint16, or float in [0, 1]). For throughput on a GPU, `preprocess_tensor` runs the
    same pipeline on an already-decoded batch.
    """

    model_input_names = ["pixel_values"]
    # class defaults, so that a None set by users is saved, and configs saved before a setting existed get it
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO

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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
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
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or int(max_image_pixels) <= 0):
            raise ValueError(f"max_image_pixels must be a positive integer or None, got {max_image_pixels!r}.")
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        if max_aspect_ratio is not None:
            try:
                ratio = math.nan if isinstance(max_aspect_ratio, bool) else float(max_aspect_ratio)
            except (TypeError, ValueError):
                ratio = math.nan
            if not 1 <= ratio < math.inf:
                raise ValueError(
                    f"max_aspect_ratio must be a finite number of at least 1 or None, got {max_aspect_ratio!r}."
                )
            max_aspect_ratio = ratio
        self.max_aspect_ratio = max_aspect_ratio

    def load_image(self, source: ImageSource, name: str | None = None) -> DecodedImage:
        """`load_image` (module level) within this processor's limits: `max_image_pixels` on the decoded image and,
        with `do_resize`, on the resized one; `max_aspect_ratio`."""
        return load_image(
            source,
            name,
            max_pixels=self.max_image_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            resize_shortest_edge=self.size["shortest_edge"] if self.do_resize else None,
        )

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
        """Decode and preprocess one image -> float32 [3, crop_h, crop_w].

        Every failure on a bad input is a `ValueError` naming it; the pixel values are checked to be finite.
        """
        image = self.load_image(source, name)
        where = describe_source(source, name)
        try:
            if self.do_resize:
                image = self._resize(image)
            if self.do_center_crop:
                image = self._crop(image)
            array = self._to_array(image)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        except MemoryError as error:
            raise ImageTooLargeError(f"{where}: ran out of memory preprocessing this image.") from error
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: preprocessing gave non-finite pixel values (check image_mean and image_std).")
        return array

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
        check_image_shape(
            images.shape[-1],
            images.shape[-2],
            "preprocess_tensor",
            self.max_aspect_ratio,
            self.size["shortest_edge"] if self.do_resize else None,
            self.max_image_pixels,
        )
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
            mean, std = _normalisation_tensors(tuple(self.image_mean), tuple(self.image_std), pixels.device)
            pixels = (pixels - mean) / std
        return pixels.contiguous()


@functools.lru_cache(maxsize=8)
def _normalisation_tensors(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, C, 1, 1] tensors on `device`, made once: a host-to-device copy per batch would make the
    host wait for the device."""
    return torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)


CheXficientImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "CheXficientImageProcessor",
    "ImageAspectRatioError",
    "ImageTooLargeError",
    "load_image",
]
