"""BERTScore of generated reports with a model given as a local folder (the `bert_score` package, no download).

Load offline with `evaluate.load("llava_rad/metric_modules/report_bertscore")`; llava_rad/metrics.py imports
`bertscore_f1` directly for the bootstrap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
BERTScore F1 (greedy token matching of contextual embeddings, no idf weighting, no baseline rescaling) per report,
averaged, on a 0-100 scale. The model is a local folder (e.g. a downloaded roberta-large or distilroberta-base);
`num_layers` picks the layer whose embeddings are matched.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated reports.
    references (`list` of `str`): one reference report per prediction.
    model_path (`str`): local folder of a transformers encoder and its tokenizer (required).
    num_layers (`int`): layer to use (required: bert_score knows defaults only for Hub names).
    batch_size (`int`, optional): reports per forward pass, default 32.
Returns:
    bertscore_f1 (0-100), num_reports.
"""


def bertscore_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    model_path: str | os.PathLike | None,
    num_layers: int | None,
    batch_size: int = 32,
    device: str | None = None,
) -> np.ndarray:
    """Per-report BERTScore F1 (0-100) with the encoder in the local folder `model_path`."""
    if model_path is None:
        raise ValueError("BERTScore needs a local model folder (--bertscore_model); nothing is downloaded.")
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"BERTScore model folder {model_path} does not exist.")
    if num_layers is None:
        raise ValueError("BERTScore with a local model needs --bertscore_num_layers (e.g. 17 for roberta-large).")
    try:
        from bert_score import BERTScorer
    except ImportError as error:
        raise ImportError("BERTScore needs the bert_score package: pip install bert-score") from error
    scorer = BERTScorer(
        model_type=str(model_path), num_layers=num_layers, batch_size=batch_size, device=device, lang="en"
    )
    tokenizer = scorer._tokenizer
    if tokenizer.model_max_length > 100_000:  # tokenizers saved without a limit; the encoder's positions bound it
        tokenizer.model_max_length = scorer._model.config.max_position_embeddings
    _, _, f1 = scorer.score(list(predictions), list(references), batch_size=batch_size)
    return 100.0 * f1.numpy().astype(np.float64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportBertscore(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, model_path=None, num_layers=None, batch_size=32) -> dict[str, float]:
        scores = bertscore_f1(predictions, references, model_path, num_layers, batch_size)
        return {"bertscore_f1": float(scores.mean()), "num_reports": len(predictions)}
