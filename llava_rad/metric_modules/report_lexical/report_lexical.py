"""Lexical report-generation metrics as LLaVA-Rad reports them: corpus BLEU-1 / BLEU-4 (sacrebleu) and ROUGE-L
F-measure (rouge_score, no stemming), all on a 0-100 scale.

Load offline with `evaluate.load("llava_rad/metric_modules/report_lexical")`; llava_rad/metrics.py imports `bleu`
and `rouge_l_scores` directly for the bootstrap, so there is one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Corpus-level BLEU-1 and BLEU-4 (sacrebleu's default 13a tokenization, brevity penalty included) and the mean
per-report ROUGE-L F-measure (rouge_score, use_stemmer=False) of generated findings against reference findings.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated reports.
    references (`list` of `str`): one reference report per prediction.
Returns:
    bleu1, bleu4, rougeL (0-100), num_reports.
Example:
    >>> metric = evaluate.load("llava_rad/metric_modules/report_lexical")
    >>> metric.compute(predictions=["no pleural effusion ."], references=["no pleural effusion ."])["bleu4"]
    100.00000000000004
"""


def bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU with n-grams up to `max_order` (0-100), sacrebleu."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(max_ngram_order=max_order)
    return float(scorer.corpus_score(list(predictions), [list(references)]).score)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-report ROUGE-L F-measure (0-100), rouge_score without stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return np.array([100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportLexical(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if not predictions:
            raise ValueError("no reports to score.")
        return {
            "bleu1": bleu(predictions, references, 1),
            "bleu4": bleu(predictions, references, 4),
            "rougeL": float(rouge_l_scores(predictions, references).mean()),
            "num_reports": len(predictions),
        }
