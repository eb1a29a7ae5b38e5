"""The baseline every speed claim is measured against: the stock Hugging Face path a user copies from the model
card (Auto classes, one image per call, float32, decoding included), timed image by image."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def stock_image_features(
    model: torch.nn.Module, processor, images: list[Path], device: torch.device
) -> tuple[np.ndarray, list[float], list[float]]:
    """Embed `images` one at a time as the model card shows. Returns the embeddings [n, D] (float32), each image's
    end-to-end seconds (decode + preprocess + forward) and its forward-only seconds."""
    per_image, forward, embeddings = [], [], []
    for path in images:
        t0 = time.perf_counter()
        inputs = processor(images=str(path), return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            embeddings.append(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)).cpu())
        t2 = time.perf_counter()  # .cpu() waits for the device, as a user reading the result does
        per_image.append(t2 - t0)
        forward.append(t2 - t1)
    return torch.cat(embeddings).float().numpy(), per_image, forward
