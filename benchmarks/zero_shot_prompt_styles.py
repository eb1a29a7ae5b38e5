"""Zero-shot AUROC of a model under the paper's prompts ("{c}" vs "no {c}") and under report-style prompt pairs.

Small models trained from scratch on templated reports can learn a finding well and still score it badly with the
bare "{c}" / "no {c}" pair, which looks nothing like their training text. This compares both on the phantom test set.

    python benchmarks/zero_shot_prompt_styles.py --model outputs/demo/final --phantoms outputs/demo/phantoms \
        --out benchmarks/results/zero_shot_prompt_styles.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import BertTokenizerFast


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chexficient.machine import machine_info  # noqa: E402
from chexficient.manifests import read_manifest  # noqa: E402
from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc  # noqa: E402
from chexficient.phantoms import PHANTOM_FINDINGS  # noqa: E402

from image_processing_chexficient import CheXficientImageProcessor  # noqa: E402
from modeling_chexficient import CheXficientModel, zero_shot_prompts  # noqa: E402


# One positive and one negative sentence per finding, in the phantom reports' own style.
REPORT_STYLE = {
    "Cardiomegaly": ("The heart is enlarged.", "Heart size is normal."),
    "Pleural Effusion": ("There is a moderate right pleural effusion.", "No pleural effusion."),
    "Pneumothorax": ("There is a right apical pneumothorax.", "No pneumothorax."),
    "Consolidation": ("Consolidation in the right lower lung.", "No focal consolidation."),
    "Lung Lesion": ("A small nodule in the right upper lung.", "No nodule or mass."),
    "Atelectasis": ("Linear atelectasis at the right base.", "No atelectasis."),
    "Edema": ("Mild interstitial pulmonary edema.", "No pulmonary edema."),
    "Support Devices": ("Support devices are present.", "No support devices."),
    "Fracture": ("There is a fracture of a right rib.", "The ribs are intact."),
}


@torch.no_grad()
def scores(model, tokenizer, image_embeds: torch.Tensor, pairs: list[tuple[str, str]]) -> np.ndarray:
    """P(positive) [N, C]: softmax over the cosines with each (positive, negative) pair, no temperature."""
    tokens = tokenizer([p for pair in pairs for p in pair], padding=True, return_tensors="pt")
    text = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).view(len(pairs), 2, -1)
    cosine = torch.einsum("nd,ckd->nck", image_embeds, text)
    return cosine.softmax(dim=-1)[..., 0].numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/final")
    parser.add_argument("--phantoms", default="outputs/demo/phantoms")
    parser.add_argument("--out", default="benchmarks/results/zero_shot_prompt_styles.json")
    args = parser.parse_args(argv)
    model = CheXficientModel.from_pretrained(args.model).eval()
    image_processor = CheXficientImageProcessor.from_pretrained(args.model)
    tokenizer = BertTokenizerFast.from_pretrained(args.model)
    test = read_manifest(Path(args.phantoms) / "test.csv")
    labels = list(PHANTOM_FINDINGS)
    image_embeds = []
    for begin in range(0, len(test), 128):
        paths = [str(Path(args.phantoms) / p) for p in test.path[begin : begin + 128]]
        with torch.no_grad():
            image_embeds.append(model.get_image_features(image_processor(paths)["pixel_values"]))
    image_embeds = torch.cat(image_embeds)
    targets = test[labels].to_numpy(dtype=float)
    results = {
        "model": args.model,
        "paper_protocol": multilabel_auc(
            scores(model, tokenizer, image_embeds, [zero_shot_prompts(c) for c in labels]), targets, labels
        ),
        "report_style": multilabel_auc(
            scores(model, tokenizer, image_embeds, [REPORT_STYLE[c] for c in labels]), targets, labels
        ),
    }
    print(f"{'finding':<18} {'paper prompts':>14} {'report style':>13}")
    for label in labels:
        paper = results["paper_protocol"]["auroc"].get(label)
        report = results["report_style"]["auroc"].get(label)
        if paper is not None:
            print(f"{label:<18} {paper:>14.3f} {report:>13.3f}")
    print(
        f"{'macro':<18} {results['paper_protocol']['macro_auroc']:>14.3f} {results['report_style']['macro_auroc']:>13.3f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results["machine"] = machine_info()
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
