"""Cross-modal retrieval Recall@K and mean / median rank.

Load offline with `evaluate.load("chexficient/metrics/retrieval_recall")`; eval/retrieval.py imports `retrieval_ranks`
and `retrieval_recall` directly for the bootstrap, so there is one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Recall@K and rank statistics of a retrieval run. Each query has a row of similarities over the gallery and one
or more correct gallery items. The rank of a query is 1 + the number of gallery items scored strictly higher than
its best-scored correct item, so a hit at the top is rank 1 and ties do not penalise the correct item.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): similarities [Q, G] of every query to every gallery item.
    references (`list` of `list` of `int`): the gallery indices that are correct for each query (at least one).
    k (`list` of `int`, optional): cut-offs, default (1, 5, 10).
Returns:
    `recall@K` for every K (share of queries whose rank <= K), mean_rank, median_rank, num_queries, gallery_size.
Example:
    >>> metric = evaluate.load("chexficient/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.8, 0.3]], references=[[0], [1]], k=[1])["recall@1"]
    0.5
"""


def retrieval_ranks(similarity: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Rank [Q] (1 = best) of the best correct item of each query; `positives` is a bool mask [Q, G]."""
    similarity = np.asarray(similarity, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {similarity.shape} and positives {positives.shape} differ in shape.")
    missing = np.flatnonzero(~positives.any(axis=1))
    if missing.size:
        raise ValueError(f"queries {missing[:5].tolist()} have no correct gallery item.")
    best_positive = np.where(positives, similarity, -np.inf).max(axis=1, keepdims=True)  # [Q, 1]
    return 1 + (similarity > best_positive).sum(axis=1)


def retrieval_recall(ranks: np.ndarray, k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K for each K and mean / median rank from per-query ranks."""
    ranks = np.asarray(ranks)
    result = {f"recall@{cutoff}": float(np.mean(ranks <= cutoff)) for cutoff in k}
    result["mean_rank"] = float(ranks.mean())
    result["median_rank"] = float(np.median(ranks))
    return result


def positives_mask(references: Sequence[Sequence[int]], gallery_size: int) -> np.ndarray:
    """Bool mask [Q, G] from lists of correct gallery indices."""
    mask = np.zeros((len(references), gallery_size), dtype=bool)
    for query, items in enumerate(references):
        mask[query, list(items)] = True
    return mask


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
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
        )

    def _compute(self, predictions, references, k: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
        similarity = np.asarray(predictions, dtype=np.float64)
        ranks = retrieval_ranks(similarity, positives_mask(references, similarity.shape[1]))
        result: dict[str, Any] = retrieval_recall(ranks, k)
        result["num_queries"], result["gallery_size"] = int(similarity.shape[0]), int(similarity.shape[1])
        return result
