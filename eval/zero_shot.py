"""Zero-shot classification with the released model's protocol: "{c}" vs "no {c}", softmax over raw cosines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch


def zero_shot_probabilities(
    model: Any, tokenizer: Any, batches: Iterable[dict[str, Any]], labels: Sequence[str], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [N, C] of every label for every valid image in `batches`, and the row indices [N] used.

    Each batch needs `pixel_values` and may carry `valid` (bool [B]) and `sample_index` ([B]).
    """
    probabilities, indices = [], []
    with torch.no_grad():
        for batch in batches:
            pixel_values = batch["pixel_values"].to(device)
            valid = batch.get("valid", torch.ones(len(pixel_values), dtype=torch.bool)).to(device)
            image_embeds = model.get_image_features(pixel_values)
            probs = model.zero_shot_classify(labels, tokenizer, image_embeds=image_embeds)
            probabilities.append(probs[valid].float().cpu())
            index = batch.get("sample_index", torch.arange(len(pixel_values)))
            indices.append(index[valid.cpu()])
    return torch.cat(probabilities).numpy(), torch.cat(indices).numpy()


def multilabel_auroc(targets: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Per-class and macro AUROC; targets of -1 are masked, classes with one label value are skipped and named."""
    from sklearn.metrics import roc_auc_score

    per_class: dict[str, float] = {}
    skipped: list[str] = []
    for c, label in enumerate(labels):
        mask = targets[:, c] >= 0
        column = targets[mask, c]
        if len(np.unique(column)) < 2:
            skipped.append(label)
            continue
        per_class[label] = float(roc_auc_score(column, scores[mask, c]))
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"macro_auroc": macro, "per_class_auroc": per_class, "skipped_classes": skipped}
