"""LLaVA-Rad data: conversation JSON and (image, findings, indication) CSVs, MIMIC-CXR findings preparation, the
LLaVA-Rad instruction, and tokenization with the loss on the answer tokens only.

    python -m llava_rad.data --llava_rad_json chat_train_MIMIC_CXR_all_gpt4extract_rulebased_v1.json --out train.csv
    python -m llava_rad.data --metadata_csv mimic-cxr-2.0.0-metadata.csv --sections_csv mimic_cxr_sectioned.csv \
        --split_csv mimic-cxr-2.0.0-split.csv --split test --out test.csv
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chexficient.data.images import decode_image
from chexficient.data.manifests import clean_text
from llava_rad.prompt import IMAGE_TOKEN, TEMPLATES, build_instruction, conversation_text


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FRONTAL_VIEWS = frozenset({"AP", "PA"})


class NoAnswerError(ValueError):
    """Truncation to `max_length` left no answer token: the example has nothing to learn from."""


@dataclass
class ReportExample:
    """One training or test example: an image, its reference findings and the optional indication."""

    id: str
    image: str
    findings: str = ""
    indication: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        return build_instruction(self.indication)


def tokenize_example(
    tokenizer: Any,
    instruction: str,
    answer: str,
    image_seq_length: int,
    template: str = "v1",
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids [L] with `<image>` expanded to `image_seq_length` tokens, and labels [L] that are IGNORE except on
    the answer (and its </s> or newline terminator).

    Labels come from character offsets, so they are exact for any fast tokenizer, whatever it does at the
    prompt/answer boundary. Truncation to `max_length` cuts the answer, never the image tokens.
    """
    prompt, answer_text = conversation_text(instruction, answer, template)
    expanded = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length)
    encoding = tokenizer(expanded + answer_text, return_offsets_mapping=True, add_special_tokens=True)
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    answer_start = len(expanded)
    in_answer = torch.tensor([end > answer_start for _, end in encoding["offset_mapping"]], dtype=torch.bool)
    labels = torch.where(in_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    count = int((input_ids == image_token_id).sum())
    if count != image_seq_length:
        raise ValueError(
            f"the tokenizer turned the prompt into {count} image tokens, expected {image_seq_length}; "
            f"is {IMAGE_TOKEN!r} a special token of this tokenizer (llava_rad.model.prepare_tokenizer)?"
        )
    labels[input_ids == image_token_id] = IGNORE_INDEX
    if max_length is not None and input_ids.numel() > max_length:
        last_image = int((input_ids == image_token_id).nonzero().max())
        if last_image >= max_length:
            raise ValueError(f"max_length {max_length} cuts into the {image_seq_length} image tokens.")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not bool((labels != IGNORE_INDEX).any()):
        raise NoAnswerError(
            f"max_length {max_length} leaves no answer token to learn from ({input_ids.numel()} prompt tokens)."
        )
    return {"input_ids": input_ids, "labels": labels}


def prompt_ids(tokenizer: Any, instruction: str, image_seq_length: int, template: str = "v1") -> list[int]:
    """Token ids of a generation prompt (`<image>` expanded), ending with "ASSISTANT:"."""
    prompt, _ = conversation_text(instruction, None, template)
    return tokenizer(prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length), add_special_tokens=True)["input_ids"]


# ----- reading data -------------------------------------------------------------------------------------------------


def _resolve(image: str, image_root: str | os.PathLike | None) -> str:
    return str(Path(image_root) / image) if image_root is not None and not os.path.isabs(image) else image


def _answer_turn(conversations: Any, where: str) -> str:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns.")
    answers = [turn.get("value") for turn in conversations if isinstance(turn, dict) and turn.get("from") == "gpt"]
    if not answers:
        raise ValueError(f"{where}: no turn with 'from': 'gpt' in 'conversations'.")
    return answers[0] if isinstance(answers[0], str) else ""


def load_llava_rad_json(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    frontal_only: bool = True,
    rule_based_only: bool = False,
    strip_prefix: str = "mimic/",
) -> list[ReportExample]:
    """LLaVA-Rad's conversation JSON (PhysioNet "LLaVA-Rad MIMIC-CXR Annotations"), prepared as its loader does:
    frontal views only (when a 'view' field exists), entries without findings dropped, the indication taken from
    'reason' (or 'indication'), and optionally only rule-based findings (LLaVA-Rad's test set).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of conversation entries.")
    examples, dropped = [], {"view": 0, "findings": 0, "generate_method": 0}
    for number, entry in enumerate(entries):
        where = f"{path} entry {number}"
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{where}: missing field 'image'.")
        if frontal_only and entry.get("view") is not None and str(entry["view"]).upper() not in FRONTAL_VIEWS:
            dropped["view"] += 1
            continue
        if rule_based_only and entry.get("generate_method") != "rule-based":
            dropped["generate_method"] += 1
            continue
        findings = clean_text(_answer_turn(entry.get("conversations"), where))
        if not findings:
            dropped["findings"] += 1
            continue
        image = str(entry["image"])
        image = image[len(strip_prefix) :] if strip_prefix and image.startswith(strip_prefix) else image
        indication = entry.get("reason") if entry.get("reason") is not None else entry.get("indication")
        examples.append(
            ReportExample(
                id=str(entry.get("id", number)),
                image=_resolve(image, image_root),
                findings=findings,
                indication=clean_text(indication) or None,
                extra={k: entry[k] for k in ("view", "generate_method") if k in entry},
            )
        )
    logger.info(f"{path}: kept {len(examples)} of {len(entries)} entries (dropped {dropped})")
    return examples


def load_findings_csv(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    image_column: str | None = None,
    findings_column: str = "findings",
    indication_column: str = "indication",
    id_column: str = "id",
    require_findings: bool = True,
) -> list[ReportExample]:
    """A CSV of (image, findings, indication); the image column is 'image' or 'path'. Rows without findings are
    dropped when `require_findings` (training, reference-based evaluation)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    if image_column is None:
        image_column = next((c for c in ("image", "path") if c in frame.columns), "image")
    if image_column not in frame.columns:
        raise ValueError(f"{path}: missing image column {image_column!r} (columns: {list(frame.columns)}).")
    if require_findings and findings_column not in frame.columns:
        raise ValueError(f"{path}: missing findings column {findings_column!r} (columns: {list(frame.columns)}).")
    examples, dropped = [], 0
    for number, row in enumerate(frame.to_dict("records")):
        findings = clean_text(row.get(findings_column))
        if require_findings and not findings:
            dropped += 1
            continue
        image = row[image_column]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{path} row {number + 2}: empty {image_column!r}.")
        examples.append(
            ReportExample(
                id=clean_text(row.get(id_column)) or str(number),
                image=_resolve(image, image_root),
                findings=findings,
                indication=clean_text(row.get(indication_column)) or None,
            )
        )
    if dropped:
        logger.info(f"{path}: dropped {dropped} rows without findings")
    return examples


def load_examples(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, **kwargs
) -> list[ReportExample]:
    """LLaVA-Rad JSON (.json) or findings CSV (.csv), by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return load_llava_rad_json(path, image_root, **kwargs)
    if suffix == ".csv":
        return load_findings_csv(path, image_root, **kwargs)
    raise ValueError(f"{path}: unsupported data file {suffix!r}; use LLaVA-Rad .json or a findings .csv.")


def write_examples_csv(examples: Sequence[ReportExample], path: str | os.PathLike) -> None:
    import pandas as pd

    rows = [{"id": e.id, "image": e.image, "findings": e.findings, "indication": e.indication} for e in examples]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["id", "image", "findings", "indication"]).to_csv(path, index=False)


def prepare_mimic_findings(
    metadata_csv: str | os.PathLike,
    sections_csv: str | os.PathLike,
    *,
    split_csv: str | os.PathLike | None = None,
    split: str | None = None,
    indications_csv: str | os.PathLike | None = None,
) -> list[ReportExample]:
    """MIMIC-CXR-JPG findings examples: frontal (AP/PA) images of studies whose report has a findings section.

    `metadata_csv` is mimic-cxr-2.0.0-metadata.csv (dicom_id, subject_id, study_id, ViewPosition); `sections_csv`
    is the MIMIC-CXR section file (study "s<id>", findings); `split_csv` is mimic-cxr-2.0.0-split.csv. An optional
    `indications_csv` (study, indication) adds the indication. Image paths are files/pXX/pSUBJECT/sSTUDY/DICOM.jpg.
    """
    import pandas as pd

    def read(path, needed, name):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{name} {path}: no such file.")
        frame = pd.read_csv(path, dtype=str)
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} {path}: missing columns {missing}.")
        return frame

    meta = read(metadata_csv, ["dicom_id", "subject_id", "study_id", "ViewPosition"], "--metadata_csv")
    sections = read(sections_csv, ["study", "findings"], "--sections_csv")
    sections["study_id"] = sections["study"].str.lstrip("s")
    meta = meta[meta["ViewPosition"].str.upper().isin(FRONTAL_VIEWS)]
    if split_csv is not None:
        splits = read(split_csv, ["dicom_id", "split"], "--split_csv")
        meta = meta.merge(splits[["dicom_id", "split"]], on="dicom_id", how="inner")
        if split is not None:
            meta = meta[meta["split"] == split]
    frame = meta.merge(sections[["study_id", "findings"]], on="study_id", how="inner")
    indications = {}
    if indications_csv is not None:
        extra = read(indications_csv, ["study", "indication"], "--indications_csv")
        indications = {str(s).lstrip("s"): v for s, v in zip(extra["study"], extra["indication"])}
    examples = []
    for row in frame.to_dict("records"):
        findings = clean_text(row["findings"])
        if not findings:
            continue
        subject = str(row["subject_id"])
        image = f"files/p{subject[:2]}/p{subject}/s{row['study_id']}/{row['dicom_id']}.jpg"
        examples.append(
            ReportExample(
                id=f"{subject}_{row['study_id']}_{row['dicom_id']}",
                image=image,
                findings=findings,
                indication=clean_text(indications.get(str(row["study_id"]))) or None,
            )
        )
    return examples


# ----- dataset and collator ----------------------------------------------------------------------------------------


class LlavaRadDataset(Dataset):
    """Tokenized examples with their image: `pixel_values` from the CheXficient image processor, or the tower's
    `image_features` from a feature store (which holds only readable images).

    An unreadable image (the project's decode-error policy) or an example whose truncation leaves no answer token is
    logged and replaced by the next usable example, so that every process keeps the same number of steps; `skipped`
    maps the ids left out to the reason.
    """

    def __init__(
        self,
        examples: Sequence[ReportExample],
        tokenizer: Any,
        image_seq_length: int,
        *,
        image_processor: Any = None,
        feature_store: Any = None,
        template: str = "v1",
        max_length: int | None = 2048,
        max_retries: int = 16,
    ):
        if (image_processor is None) == (feature_store is None):
            raise ValueError("pass exactly one of `image_processor` or `feature_store`.")
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; use one of {TEMPLATES}.")
        if feature_store is not None:
            missing = [e.id for e in examples if e.id not in feature_store]
            if missing:
                logger.warning(
                    f"{len(missing)} examples have no stored features (unreadable images?), e.g. {missing[:3]}"
                )
            examples = [e for e in examples if e.id in feature_store]
        if not examples:
            raise ValueError("no examples to train on.")
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.image_seq_length = image_seq_length
        self.image_processor = image_processor
        self.feature_store = feature_store
        self.template = template
        self.max_length = max_length
        self.max_retries = max_retries
        self.skipped: dict[str, str] = {}  # example id -> why it was left out

    def __len__(self) -> int:
        return len(self.examples)

    def tokenize(self, example: ReportExample) -> dict[str, torch.Tensor]:
        return tokenize_example(
            self.tokenizer,
            example.instruction,
            example.findings,
            self.image_seq_length,
            self.template,
            self.max_length,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(self.max_retries):
            example = self.examples[(index + attempt) % len(self.examples)]
            if example.id in self.skipped:
                continue
            try:
                tokens = self.tokenize(example)
            except NoAnswerError as error:  # truncation left nothing to learn from
                self._skip(example, str(error))
                continue
            if self.feature_store is not None:
                return {"id": example.id, **tokens, "image_features": self.feature_store[example.id]}
            pixels, error = decode_image(self.image_processor, example.image, example.image)
            if pixels is None:
                self._skip(example, error)
                continue
            return {"id": example.id, **tokens, "pixel_values": torch.from_numpy(pixels)}
        raise RuntimeError(f"{self.max_retries} consecutive unusable examples from index {index}; check the data.")

    def _skip(self, example: ReportExample, reason: str) -> None:
        if example.id not in self.skipped:
            logger.warning(f"skipping example {example.id}: {reason}")
            self.skipped[example.id] = reason


@dataclass
class LlavaRadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (IGNORE); stacks the images or features."""

    pad_token_id: int

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        length = max(item["input_ids"].numel() for item in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, item in enumerate(batch):
            n = item["input_ids"].numel()
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in ("pixel_values", "image_features"):
            if key in batch[0]:
                out[key] = torch.stack([item[key] for item in batch])
        out["ids"] = [item["id"] for item in batch]
        return out


# ----- CLI ----------------------------------------------------------------------------------------------------------


@dataclass
class PrepareArguments:
    out: str = field(metadata={"help": "output CSV of (id, image, findings, indication)"})
    llava_rad_json: str | None = field(default=None, metadata={"help": "LLaVA-Rad conversation JSON to convert"})
    rule_based_only: bool = field(default=False, metadata={"help": "keep rule-based findings only (the test set)"})
    metadata_csv: str | None = field(default=None, metadata={"help": "mimic-cxr-2.0.0-metadata.csv"})
    sections_csv: str | None = field(default=None, metadata={"help": "MIMIC-CXR sectioned reports (study, findings)"})
    split_csv: str | None = field(default=None, metadata={"help": "mimic-cxr-2.0.0-split.csv"})
    split: str | None = field(default=None, metadata={"help": "train, validate or test"})
    indications_csv: str | None = field(default=None, metadata={"help": "optional (study, indication) CSV"})

    def __post_init__(self):
        if (self.llava_rad_json is None) == (self.metadata_csv is None):
            raise ValueError("give either --llava_rad_json or --metadata_csv with --sections_csv.")
        if self.metadata_csv is not None and self.sections_csv is None:
            raise ValueError("--metadata_csv needs --sections_csv.")


def main(argv: list[str] | None = None) -> list[ReportExample]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.llava_rad_json is not None:
        examples = load_llava_rad_json(args.llava_rad_json, rule_based_only=args.rule_based_only)
    else:
        examples = prepare_mimic_findings(
            args.metadata_csv,
            args.sections_csv,
            split_csv=args.split_csv,
            split=args.split,
            indications_csv=args.indications_csv,
        )
    write_examples_csv(examples, args.out)
    print(f"wrote {len(examples)} frontal examples with findings to {args.out}")
    return examples


if __name__ == "__main__":
    main()
