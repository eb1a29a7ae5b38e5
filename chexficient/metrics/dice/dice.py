"""Dice similarity coefficient of binary segmentation masks, per class and mean.

Load offline with `evaluate.load("chexficient/metrics/dice")`; eval/segmentation.py imports `dice_per_image` directly
for model selection and the bootstrap, so there is one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Dice = 2 |P ∩ R| / (|P| + |R|) for every image and class, averaged over images per class, then over classes.
Classes may overlap (multi-label masks). An image where both the prediction and the reference of a class are empty
scores 1 for that class (the SIIM-ACR convention); an empty reference with a non-empty prediction scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `list` of `int`): per image, K flattened binary masks [K, P] (0/1).
    references (`list` of `list` of `list` of `int`): the reference masks, same shapes.
    class_names (`list` of `str`, optional): names of the K classes (default "0", "1", ...).
Returns:
    mean_dice (`float`), dice (`dict` class -> mean over images), num_images (`int`).
Example:
    >>> metric = evaluate.load("chexficient/metrics/dice")
    >>> metric.compute(predictions=[[[1, 1, 0, 0]]], references=[[[1, 0, 0, 0]]])["mean_dice"]
    0.6666666666666666
"""


def dice_per_image(predictions: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Dice [N, K] of binary masks [N, K, ...] (any trailing shape); empty-vs-empty scores 1."""
    predictions = np.asarray(predictions).astype(bool)
    references = np.asarray(references).astype(bool)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape.")
    if predictions.ndim < 2:
        raise ValueError("masks must be [N, K, ...] (images, classes, pixels).")
    axes = tuple(range(2, predictions.ndim))
    intersection = (predictions & references).sum(axis=axes, dtype=np.float64)
    total = predictions.sum(axis=axes, dtype=np.float64) + references.sum(axis=axes, dtype=np.float64)
    return np.where(total > 0, 2 * intersection / np.maximum(total, 1), 1.0)


def summarize_dice(per_image: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class means and the mean over classes of a [N, K] Dice array."""
    per_image = np.asarray(per_image, dtype=np.float64)
    names = [str(c) for c in range(per_image.shape[1])] if class_names is None else list(class_names)
    if len(names) != per_image.shape[1]:
        raise ValueError(f"{len(names)} class names given for {per_image.shape[1]} classes.")
    per_class = dict(zip(names, per_image.mean(axis=0).tolist()))
    return {"mean_dice": float(per_image.mean()), "dice": per_class, "num_images": int(per_image.shape[0])}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Dice(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int8"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int8"))),
                }
            ),
        )

    def _compute(self, predictions, references, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        per_image = np.stack(
            [dice_per_image(np.asarray(p)[None], np.asarray(r)[None])[0] for p, r in zip(predictions, references)]
        )
        return summarize_dice(per_image, class_names)
