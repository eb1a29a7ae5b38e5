"""RadGraph F1 ("partial" reward: entities matched on tokens and label, plus whether they have a relation) with the
`radgraph` package and a model folder already on disk (never downloaded here).

Load offline with `evaluate.load("llava_rad/metric_modules/radgraph_f1")`; llava_rad/metrics.py imports
`radgraph_f1_scores` directly for the bootstrap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
F1-RadGraph as LLaVA-Rad reports it (radgraph's F1RadGraph with reward_level="partial"): per report, the F1 between
the RadGraph entities of the generated and the reference report, where an entity is its tokens, its label and
whether it has a relation; empty reports score 0; the mean over reports, on a 0-100 scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated reports.
    references (`list` of `str`): one reference report per prediction.
    model_cache_dir (`str`): local folder holding `<model_type>/` (the unpacked radgraph archive: config.json,
        vocabulary/, weights.th) (required).
    model_type (`str`, optional): "radgraph" (LLaVA-Rad's), "radgraph-xl" or "modern-radgraph-xl"; default "radgraph".
Returns:
    radgraph_f1 (0-100), num_reports.
"""


def radgraph_f1_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    model_cache_dir: str | os.PathLike | None,
    model_type: str = "radgraph",
) -> np.ndarray:
    """Per-report RadGraph partial-reward F1 (0-100)."""
    if model_cache_dir is None:
        raise ValueError(
            "RadGraph F1 needs a local model folder (--radgraph_model DIR holding DIR/radgraph/ with config.json, "
            "vocabulary/ and weights.th from StanfordAIMI/RRG_scorers radgraph.tar.gz); nothing is downloaded."
        )
    model_dir = Path(model_cache_dir) / model_type
    if not (model_dir / "config.json").is_file() or not (model_dir / "weights.th").is_file():
        raise FileNotFoundError(
            f"RadGraph model {model_dir} is missing config.json or weights.th; unpack the {model_type} archive there."
        )
    try:
        from radgraph import F1RadGraph
    except ImportError as error:
        raise ImportError("RadGraph F1 needs the radgraph package: pip install radgraph") from error
    scorer = F1RadGraph(reward_level="partial", model_type=model_type, model_cache_dir=str(model_cache_dir))
    _, rewards, _, _ = scorer(refs=list(references), hyps=list(predictions))
    return 100.0 * np.asarray(rewards, dtype=np.float64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RadgraphF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, model_cache_dir=None, model_type="radgraph") -> dict[str, float]:
        scores = radgraph_f1_scores(predictions, references, model_cache_dir, model_type)
        return {"radgraph_f1": float(scores.mean()), "num_reports": len(predictions)}
