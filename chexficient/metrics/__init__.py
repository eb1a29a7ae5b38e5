"""The project's metrics as local `evaluate` modules, loadable offline.

    from chexficient.metrics import load_metric
    load_metric("multilabel_auc").compute(predictions=scores, references=targets, labels=labels)
    load_metric("report_lexical", folder="llava_rad/metric_modules")  # a program's own modules

or, from anywhere, `evaluate.load("<repo>/chexficient/metrics/multilabel_auc")`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("multilabel_auc", "retrieval_recall", "dice")


@functools.cache
def load_metric(name: str, folder: str | os.PathLike = METRICS_DIR):
    """The `evaluate` module `name`, i.e. `folder/name/name.py` (by default one of METRIC_NAMES in this folder),
    loaded once per process."""
    import evaluate

    folder = Path(folder).resolve()
    if not (folder / name / f"{name}.py").is_file():
        known = sorted(p.parent.name for p in folder.glob("*/*.py") if p.stem == p.parent.name)
        raise ValueError(f"unknown metric {name!r}; the metrics in {folder} are {known}.")
    return evaluate.load(str(folder / name))
