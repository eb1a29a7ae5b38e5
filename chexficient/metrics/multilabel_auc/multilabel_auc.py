"""Multi-label AUROC and AUPRC, per class and macro, with uncertain labels (-1) masked.

Load offline with `evaluate.load("chexficient/metrics/multilabel_auc")`; the same functions are imported directly by
the bootstrap and by periodic evaluation in train/, so there is one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np
from scipy.stats import rankdata


_DESCRIPTION = """
Area under the ROC curve and under the precision-recall curve (average precision) for every class of a
multi-label problem, and their macro means. References are 1 (positive), 0 (negative) or -1 (uncertain, masked
out of that class). A class whose unmasked references hold only one value has no defined AUC: it is skipped and
named in `skipped_classes`, never counted as 0.5.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): scores [N, C], higher means more likely positive.
    references (`list` of `list` of `int`): labels [N, C] in {1, 0, -1}.
    labels (`list` of `str`, optional): class names, in column order (default "0", "1", ...).
Returns:
    macro_auroc, macro_auprc (`float`, NaN when every class is skipped), auroc and auprc (`dict` class -> value),
    skipped_classes (`list` of `str`), num_samples (`int`).
Example:
    >>> metric = evaluate.load("chexficient/metrics/multilabel_auc")
    >>> metric.compute(predictions=[[0.9], [0.2]], references=[[1], [0]], labels=["Edema"])["macro_auroc"]
    1.0
"""


def binary_auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of binary `truth` (both values present) from the Mann-Whitney U statistic with mid-ranks for ties.

    Equals `sklearn.metrics.roc_auc_score` (tests check it) without its per-call validation cost, which matters
    inside a 500-resample bootstrap.
    """
    positive = truth > 0
    num_positive = int(positive.sum())
    num_negative = truth.size - num_positive
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def binary_auprc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: the sum over distinct score thresholds of (recall gain) x precision, ties taken together.

    Equals `sklearn.metrics.average_precision_score` (tests check it), without its validation cost.
    """
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_truth = scores[order], (truth[order] > 0).astype(np.float64)
    last_of_threshold = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_truth.size - 1]
    true_positives = np.cumsum(sorted_truth)[last_of_threshold]
    precision = true_positives / (last_of_threshold + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def multilabel_auc(
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str] | None = None,
    with_auprc: bool = True,
) -> dict[str, Any]:
    """Per-class and macro AUROC / AUPRC of `scores` [N, C] against `targets` [N, C] in {1, 0, -1}.

    `with_auprc=False` skips the precision-recall side (its entries are then empty / NaN).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets[:, None]
    if scores.shape != targets.shape:
        raise ValueError(f"predictions {scores.shape} and references {targets.shape} must have the same shape.")
    labels = [str(c) for c in range(scores.shape[1])] if labels is None else list(labels)
    if len(labels) != scores.shape[1]:
        raise ValueError(f"{len(labels)} labels given for {scores.shape[1]} columns.")
    auroc: dict[str, float] = {}
    auprc: dict[str, float] = {}
    skipped: list[str] = []
    for column, label in enumerate(labels):
        known = targets[:, column] >= 0
        truth = targets[known, column]
        if truth.size == 0 or truth.min() == truth.max():
            skipped.append(label)
            continue
        auroc[label] = binary_auroc(truth, scores[known, column])
        if with_auprc:
            auprc[label] = binary_auprc(truth, scores[known, column])
    return {
        "macro_auroc": float(np.mean(list(auroc.values()))) if auroc else float("nan"),
        "macro_auprc": float(np.mean(list(auprc.values()))) if auprc else float("nan"),
        "auroc": auroc,
        "auprc": auprc,
        "skipped_classes": skipped,
        "num_samples": int(scores.shape[0]),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultilabelAuc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#roc-metrics"],
        )

    def _compute(self, predictions, references, labels: Sequence[str] | None = None) -> dict[str, Any]:
        return multilabel_auc(np.asarray(predictions), np.asarray(references), labels)
