"""CheXbert F1 of generated reports: the CheXbert labeler (BERT-base + 14 heads) labels predictions and
references, and the F1 of the positive labels is reported over the 14 CheXbert classes and the 5 main findings.

Load offline with `evaluate.load("llava_rad/metric_modules/chexbert_f1")`; llava_rad/metrics.py imports
`CheXbertLabeler` and `chexbert_f1_from_labels` directly, so the labeler runs once before the bootstrap.
The checkpoint (chexbert.pth, a `model_state_dict` with `module.bert.*` and `module.linear_heads.*`, or the same
tensors as .safetensors) and the BERT folder (bert-base-uncased: config and tokenizer) are local paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from torch import nn


CHEXBERT_CONDITIONS = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
FIVE_CONDITIONS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
# Head outputs: 0 blank, 1 positive, 2 negative, 3 uncertain ("No Finding" has blank / positive only).
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3

_DESCRIPTION = """
CheXbert labels (positive / negative / uncertain / blank for 14 observations) of each generated and reference
report; a class counts as present when labelled positive ("+" variants: positive or uncertain). Reported: micro and
macro F1 over the 14 classes (F1-14) and over Cardiomegaly, Edema, Consolidation, Atelectasis and Pleural Effusion
(F1-5), on a 0-100 scale, as LLaVA-Rad and MAIRA report them.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated reports.
    references (`list` of `str`): one reference report per prediction.
    checkpoint (`str`): local chexbert.pth or .safetensors (required).
    bert_path (`str`): local bert-base-uncased folder with config and tokenizer (required).
    batch_size (`int`, optional): reports per forward pass, default 32.
Returns:
    f1_14_micro, f1_14_macro, f1_5_micro, f1_5_macro and the "+" (uncertain-as-positive) variants, num_reports.
"""


class CheXbertLabeler(nn.Module):
    """BERT with 13 four-way heads and one two-way head ("No Finding") on the [CLS] state."""

    def __init__(self, bert_config):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(bert_config)
        hidden = bert_config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class index per condition [B, 14]."""
        cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return torch.stack([head(cls).argmax(dim=-1) for head in self.linear_heads], dim=1)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, bert_path: str | os.PathLike) -> CheXbertLabeler:
        """Build from a local BERT folder (config) and a local CheXbert checkpoint; never downloads."""
        from transformers import BertConfig

        checkpoint, bert_path = Path(checkpoint), Path(bert_path)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"CheXbert checkpoint {checkpoint} does not exist (chexbert.pth).")
        if not (bert_path / "config.json").is_file():
            raise FileNotFoundError(f"{bert_path}: no config.json; pass a local bert-base-uncased folder.")
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(checkpoint))
        else:  # weights_only: tensors and plain containers only, no arbitrary objects
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("model_state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model = cls(BertConfig.from_pretrained(bert_path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint}: not a CheXbert checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})."
            )
        return model.eval()

    @torch.no_grad()
    def label(self, reports: Sequence[str], tokenizer, batch_size: int = 32) -> np.ndarray:
        """Class indices [N, 14] of `reports` (whitespace collapsed, truncated at 512 tokens)."""
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(reports), batch_size):
            texts = [" ".join(str(r).split()) for r in reports[start : start + batch_size]]
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            out.append(self(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(CHEXBERT_CONDITIONS)), dtype=np.int64)


def chexbert_f1_from_labels(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Micro / macro F1 (0-100) over 14 and 5 classes from CheXbert class indices [N, 14] of both sides."""
    from sklearn.metrics import f1_score

    five = [CHEXBERT_CONDITIONS.index(c) for c in FIVE_CONDITIONS]
    result = {}
    for suffix, positive in (("", (POSITIVE,)), ("_plus", (POSITIVE, UNCERTAIN))):
        pred = np.isin(predicted, positive).astype(int)
        ref = np.isin(reference, positive).astype(int)
        for name, columns in (("14", slice(None)), ("5", five)):
            for average in ("micro", "macro"):
                score = f1_score(ref[:, columns], pred[:, columns], average=average, zero_division=0)
                result[f"f1_{name}_{average}{suffix}"] = 100.0 * float(score)
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ChexbertF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, checkpoint=None, bert_path=None, batch_size=32) -> dict[str, float]:
        if checkpoint is None or bert_path is None:
            raise ValueError(
                "CheXbert F1 needs local `checkpoint` (chexbert.pth) and `bert_path` (bert-base-uncased)."
            )
        from transformers import AutoTokenizer

        labeler = CheXbertLabeler.from_checkpoint(checkpoint, bert_path)
        tokenizer = AutoTokenizer.from_pretrained(bert_path)
        result = chexbert_f1_from_labels(
            labeler.label(predictions, tokenizer, batch_size), labeler.label(references, tokenizer, batch_size)
        )
        return {**result, "num_reports": len(predictions)}
