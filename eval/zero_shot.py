"""Zero-shot classification with the released model's protocol, with bootstrap confidence intervals.

For each finding c the image embedding is compared with the prompts "{c}" and "no {c}" ("there is Finding" for
No Finding); a softmax over the two raw cosine similarities (no logit scale) gives p(c). Other prompt templates and
prompt ensembles (text embeddings averaged over templates) are options beyond the paper. The scoring is the model's
own `zero_shot_classify`; this program adds datasets, bootstrap CIs and the report.

    python -m eval.zero_shot --model outputs/demo/final --dataset phantom --root outputs/demo/phantoms
    python -m eval.zero_shot --model DIR --dataset chexpert --root /data/chexlocalize --prompts report

Writes `zero_shot_<dataset>.json` (per-class and macro AUROC/AUPRC with CIs, skipped files) and a markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eval.arguments import EvalArguments


def load_prompts(spec: str) -> str | tuple[tuple[str, str], ...]:
    """A preset name of the model's `ZERO_SHOT_PROMPTS` ("paper", "report"), or a JSON file holding a list of
    [positive, negative] template pairs (`{c}`: the label as written, `{c_lower}`: lower-cased)."""
    from modeling_chexficient import ZERO_SHOT_PROMPTS

    if spec in ZERO_SHOT_PROMPTS:
        return spec
    try:
        with open(spec) as handle:
            pairs = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--prompts {spec!r} is neither a preset {sorted(ZERO_SHOT_PROMPTS)} nor a file."
        ) from None
    if not (isinstance(pairs, list) and pairs and all(isinstance(p, list) and len(p) == 2 for p in pairs)):
        raise ValueError(f"{spec}: expected a non-empty JSON list of [positive, negative] template pairs.")
    return tuple((str(p), str(n)) for p, n in pairs)


def evaluate_zero_shot(
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    *,
    num_resamples: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC and AUPRC (per class and macro) of `scores` [N, C] against `targets` [N, C] in {1, 0, -1}, with
    percentile-bootstrap CIs over images."""
    from chexficient.metrics.bootstrap import bootstrap_ci
    from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc

    point = multilabel_auc(scores, targets, labels)
    intervals = bootstrap_ci(
        lambda rows: multilabel_auc(scores[rows], targets[rows], labels),
        len(scores),
        num_resamples=num_resamples,
        seed=seed,
        progress=num_resamples > 0,
    )
    return {
        "macro_auroc": intervals["macro_auroc"],
        "macro_auprc": intervals["macro_auprc"],
        "auroc": {label: intervals[f"auroc/{label}"] for label in point["auroc"]},
        "auprc": {label: intervals[f"auprc/{label}"] for label in point["auprc"]},
        "skipped_classes": point["skipped_classes"],
    }


def markdown_table(result: dict[str, Any]) -> str:
    """Per-class AUROC / AUPRC with 95% CIs and the macro row."""
    from chexficient.metrics.results import format_ci

    metrics = result["metrics"]
    lines = [
        f"### Zero-shot classification: {result['dataset']} ({result['split']}, {result['num_images']} images)",
        "",
        "| finding | AUROC (95% CI) | AUPRC (95% CI) |",
        "|---|---|---|",
    ]
    for label in result["labels"]:
        if label in metrics["auroc"]:
            lines.append(f"| {label} | {format_ci(metrics['auroc'][label])} | {format_ci(metrics['auprc'][label])} |")
        else:
            lines.append(f"| {label} | skipped (one label value) | |")
    lines.append(f"| **macro** | **{format_ci(metrics['macro_auroc'])}** | **{format_ci(metrics['macro_auprc'])}** |")
    if result["skipped_files"]:
        lines += ["", f"{len(result['skipped_files'])} unreadable file(s) skipped; see the JSON."]
    return "\n".join(lines)


# ----- command line ---------------------------------------------------------------------------------------------------


@dataclass
class ZeroShotArguments(EvalArguments):
    split: str = field(default="test", metadata={"help": "Dataset split."})
    prompts: str = field(
        default="paper", metadata={"help": "Prompt preset (paper, report) or a JSON file of [positive, negative]."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})


def run_zero_shot(args: ZeroShotArguments) -> dict[str, Any]:
    """Evaluate, write `zero_shot_<dataset>.json` and `.md` under `args.out_dir`, and return the result."""
    from eval.common import encode_images, load_model_and_processor, publish_result
    from eval.datasets import load_classification

    from modeling_chexficient import resolve_prompt_templates

    prompts = load_prompts(args.prompts)
    data = load_classification(args.dataset, args.root, split=args.split)
    loaded = load_model_and_processor(args.model, device=args.device)
    if not loaded.is_chexficient:
        raise ValueError(f"{args.model}: zero-shot classification needs a CheXficient model with a text tower.")
    encoded = encode_images(
        data.image_paths,
        loaded.image_processor,
        loaded.model.get_image_features,
        loaded.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        desc=f"zero-shot {data.name}",
    )
    scores = loaded.model.zero_shot_classify(
        data.labels, loaded.tokenizer, image_embeds=encoded.features.to(loaded.device), prompts=prompts
    )
    scores = scores.cpu().numpy()
    targets = data.targets[encoded.indices]
    result = {
        "task": "zero_shot",
        "dataset": data.name,
        "split": args.split,
        "model": args.model,
        "labels": list(data.labels),
        "protocol": {
            "prompts": [list(p) for p in resolve_prompt_templates(prompts)],
            "score": "softmax over (cos_pos, cos_neg), no scale",
        },
        "num_images": int(len(encoded.indices)),
        "num_resamples": args.num_resamples,
        "seed": args.seed,
        "metrics": evaluate_zero_shot(scores, targets, data.labels, num_resamples=args.num_resamples, seed=args.seed),
        "skipped_files": encoded.skipped,
    }
    return publish_result(result, markdown_table(result), args.out_dir, f"zero_shot_{data.name}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from eval.common import run_task_cli

    return run_task_cli(ZeroShotArguments, run_zero_shot, argv)


if __name__ == "__main__":
    main()
