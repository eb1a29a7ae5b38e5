"""Report-generation metrics with bootstrap medians and 95% CIs, as LLaVA-Rad reports them.

    python -m llava_rad.metrics --predictions preds.jsonl --out metrics.json \
        [--bertscore_model DIR --bertscore_num_layers 17] [--chexbert_checkpoint chexbert.pth --chexbert_bert DIR] \
        [--radgraph_model DIR]

BLEU-1/4 and ROUGE-L always run (offline packages). BERTScore, CheXbert F1-14/5 and RadGraph F1 run when their
local paths are given; asking for one without its files (or package) is an error that names what is missing,
never a silent zero. Each metric is also a local `evaluate` module under llava_rad/metric_modules/:
`chexficient.metrics.load_metric(name, folder=METRIC_MODULES_DIR)`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chexficient.metrics.bootstrap import bootstrap_ci
from llava_rad.metric_modules.chexbert_f1.chexbert_f1 import CheXbertLabeler, chexbert_f1_from_labels
from llava_rad.metric_modules.radgraph_f1.radgraph_f1 import radgraph_f1_scores
from llava_rad.metric_modules.report_bertscore.report_bertscore import bertscore_f1
from llava_rad.metric_modules.report_lexical.report_lexical import bleu, rouge_l_scores


METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"  # report_lexical, report_bertscore, ...


def evaluate_reports(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    bertscore_model: str | os.PathLike | None = None,
    bertscore_num_layers: int | None = None,
    chexbert_checkpoint: str | os.PathLike | None = None,
    chexbert_bert: str | os.PathLike | None = None,
    radgraph_model: str | os.PathLike | None = None,
    radgraph_model_type: str = "radgraph",
    num_resamples: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """All requested metrics, each with value, bootstrap median and 95% CI; models score every report once."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("no reports to score.")
    predictions, references = list(predictions), list(references)
    if (chexbert_checkpoint is None) != (chexbert_bert is None):
        missing = "--chexbert_bert (local bert-base-uncased)" if chexbert_bert is None else "--chexbert_checkpoint"
        raise ValueError(f"CheXbert F1 needs both its checkpoint and its BERT folder; missing {missing}.")

    per_report: dict[str, np.ndarray] = {"rougeL": rouge_l_scores(predictions, references)}
    if bertscore_model is not None:
        per_report["bertscore_f1"] = bertscore_f1(predictions, references, bertscore_model, bertscore_num_layers)
    if radgraph_model is not None:
        per_report["radgraph_f1"] = radgraph_f1_scores(predictions, references, radgraph_model, radgraph_model_type)
    labels = None
    if chexbert_checkpoint is not None:
        from transformers import AutoTokenizer

        labeler = CheXbertLabeler.from_checkpoint(chexbert_checkpoint, chexbert_bert)
        tokenizer = AutoTokenizer.from_pretrained(chexbert_bert)
        labels = (labeler.label(predictions, tokenizer), labeler.label(references, tokenizer))

    def statistic(indices: np.ndarray) -> dict[str, float]:
        preds = [predictions[i] for i in indices]
        refs = [references[i] for i in indices]
        result = {"bleu1": bleu(preds, refs, 1), "bleu4": bleu(preds, refs, 4)}
        result.update({name: float(scores[indices].mean()) for name, scores in per_report.items()})
        if labels is not None:
            result.update(chexbert_f1_from_labels(labels[0][indices], labels[1][indices]))
        return result

    result: dict[str, Any] = bootstrap_ci(
        statistic, len(predictions), num_resamples=num_resamples, seed=seed, progress=progress
    )
    requested = {"bertscore": bertscore_model, "chexbert": chexbert_checkpoint, "radgraph": radgraph_model}
    skipped = [name for name, given in requested.items() if given is None]
    return {"metrics": result, "num_reports": len(predictions), "num_resamples": num_resamples, "not_run": skipped}


def read_predictions(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(predictions, references) from generate.py's JSONL; rows without a reference are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file.")
    predictions, references = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not JSON ({error}).") from error
        for key in ("prediction", "reference"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path} line {number}: missing string field {key!r}.")
        predictions.append(row["prediction"])
        references.append(row["reference"])
    return predictions, references


def markdown_table(result: Mapping[str, Any]) -> str:
    lines = ["| metric | value | median [95% CI] |", "|---|---|---|"]
    for name, entry in result["metrics"].items():
        lines.append(
            f"| {name} | {entry['value']:.2f} | {entry['median']:.2f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}] |"
        )
    return "\n".join(lines)


@dataclass
class MetricArguments:
    predictions: str = field(metadata={"help": "JSONL from llava_rad/generate.py (prediction, reference)"})
    out: str | None = field(
        default=None, metadata={"help": "JSON file for the results (default: next to predictions)"}
    )
    bertscore_model: str | None = field(default=None, metadata={"help": "local encoder folder for BERTScore"})
    bertscore_num_layers: int | None = field(default=None, metadata={"help": "BERTScore layer (17 for roberta-large)"})
    chexbert_checkpoint: str | None = field(default=None, metadata={"help": "local chexbert.pth (or .safetensors)"})
    chexbert_bert: str | None = field(default=None, metadata={"help": "local bert-base-uncased folder for CheXbert"})
    radgraph_model: str | None = field(default=None, metadata={"help": "folder holding the unpacked radgraph model"})
    radgraph_model_type: str = field(default="radgraph", metadata={"help": "radgraph, radgraph-xl, ..."})
    num_resamples: int = field(default=500, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MetricArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    predictions, references = read_predictions(args.predictions)
    result = evaluate_reports(
        predictions,
        references,
        bertscore_model=args.bertscore_model,
        bertscore_num_layers=args.bertscore_num_layers,
        chexbert_checkpoint=args.chexbert_checkpoint,
        chexbert_bert=args.chexbert_bert,
        radgraph_model=args.radgraph_model,
        radgraph_model_type=args.radgraph_model_type,
        num_resamples=args.num_resamples,
        seed=args.seed,
    )
    out = Path(args.out or Path(args.predictions).with_suffix(".metrics.json"))
    out.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    if result["not_run"]:
        print(f"not run (no local model given): {', '.join(result['not_run'])}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
