"""Image-to-report and report-to-image retrieval: Recall@1/5/10 and mean rank with bootstrap CIs.

Identical report texts are de-duplicated first, so the report gallery holds each distinct text once; an image's
correct item is the text of its own report, and a report's correct items are all the images that carry it. Every
text is embedded whole (the reference's single-process path split strings into characters; that is not repeated).

    python -m eval.retrieval --model outputs/demo/final --dataset phantom --root outputs/demo/phantoms
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eval.arguments import EvalArguments


def deduplicate_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts in first-seen order and, for every input, the index of its distinct text."""
    index: dict[str, int] = {}
    text_ids = np.array([index.setdefault(text, len(index)) for text in texts], dtype=np.int64)
    return list(index), text_ids


def evaluate_retrieval(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_ids: np.ndarray,
    *,
    k: Sequence[int] = (1, 5, 10),
    num_resamples: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Both directions of retrieval between images [N, D] and distinct texts [T, D]; `text_ids` [N] pairs them.

    CIs resample the queries (images for image-to-text, distinct texts for text-to-image); the gallery stays whole.
    """
    from chexficient.metrics.bootstrap import bootstrap_ci
    from chexficient.metrics.retrieval_recall.retrieval_recall import retrieval_ranks, retrieval_recall

    similarity = (image_embeds.float() @ text_embeds.float().T).numpy()  # [N, T] cosine (both normalised)
    positives = np.zeros(similarity.shape, dtype=bool)
    positives[np.arange(len(text_ids)), text_ids] = True
    result: dict[str, Any] = {}
    for direction, sim, pos in (
        ("image_to_text", similarity, positives),
        ("text_to_image", similarity.T, positives.T),
    ):
        ranks = retrieval_ranks(sim, pos)
        result[direction] = bootstrap_ci(
            lambda rows, ranks=ranks: retrieval_recall(ranks[rows], k),
            len(ranks),
            num_resamples=num_resamples,
            seed=seed,
        )
        result[direction]["num_queries"] = int(sim.shape[0])
        result[direction]["gallery_size"] = int(sim.shape[1])
    return result


def markdown_table(result: dict[str, Any]) -> str:
    from chexficient.metrics.results import format_ci

    metrics = result["metrics"]
    names = [name for name in metrics["image_to_text"] if name.startswith("recall@")] + ["mean_rank"]
    lines = [
        f"### Retrieval: {result['dataset']} ({result['num_images']} images, {result['num_texts']} distinct reports)",
        "",
        "| direction | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for direction in ("image_to_text", "text_to_image"):
        cells = [format_ci(metrics[direction][name], digits=3 if name != "mean_rank" else 1) for name in names]
        lines.append(f"| {direction.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if result["skipped_files"]:
        lines += ["", f"{len(result['skipped_files'])} unreadable file(s) skipped; see the JSON."]
    return "\n".join(lines)


# ----- command line ---------------------------------------------------------------------------------------------------


@dataclass
class RetrievalArguments(EvalArguments):
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})


def run_retrieval(args: RetrievalArguments) -> dict[str, Any]:
    """Evaluate, write `retrieval_<dataset>.json` and `.md` under `args.out_dir`, and return the result."""
    from eval.common import encode_images, encode_texts, load_model_and_processor, publish_result
    from eval.datasets import load_retrieval

    data = load_retrieval(args.dataset, args.root)
    loaded = load_model_and_processor(args.model, device=args.device)
    if not loaded.is_chexficient:
        raise ValueError(f"{args.model}: retrieval needs a CheXficient model with a text tower.")
    encoded = encode_images(
        data.image_paths,
        loaded.image_processor,
        loaded.model.get_image_features,
        loaded.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        desc=f"retrieval {data.name}",
    )
    texts, text_ids = deduplicate_texts([data.texts[i] for i in encoded.indices])
    text_embeds = encode_texts(loaded.model, loaded.tokenizer, texts)
    result = {
        "task": "retrieval",
        "dataset": data.name,
        "model": args.model,
        "num_images": int(len(encoded.indices)),
        "num_texts": len(texts),
        "num_resamples": args.num_resamples,
        "seed": args.seed,
        "metrics": evaluate_retrieval(
            encoded.features, text_embeds, text_ids, num_resamples=args.num_resamples, seed=args.seed
        ),
        "skipped_files": encoded.skipped,
    }
    return publish_result(result, markdown_table(result), args.out_dir, f"retrieval_{data.name}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from eval.common import run_task_cli

    return run_task_cli(RetrievalArguments, run_retrieval, argv)


if __name__ == "__main__":
    main()
