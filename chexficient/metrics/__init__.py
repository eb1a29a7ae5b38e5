"""The project's metrics as local `evaluate` modules, loadable offline.

    from chexficient.metrics import load_metric
    load_metric("multilabel_auc").compute(predictions=scores, references=targets, labels=labels)

or, from anywhere, `evaluate.load("<repo>/chexficient/metrics/multilabel_auc")`.
"""

from __future__ import annotations

import functools
from pathlib import Path


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("multilabel_auc", "retrieval_recall", "dice")


@functools.cache
def load_metric(name: str):
    """The `evaluate` module `name` (one of METRIC_NAMES), loaded once per process from this folder."""
    import evaluate

    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; the project's metrics are {list(METRIC_NAMES)}.")
    return evaluate.load(str(METRICS_DIR / name))
