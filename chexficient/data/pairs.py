"""Image-report pairs: manifests (CSV / JSONL / parquet) or `datasets` datasets, decoded in DataLoader workers.

A manifest row is one image and its report: an image column (a path relative to `image_root`), an optional id
column, and the report as findings + impression (or a single report column). Label-only datasets get template
pseudo-reports built from their label columns, as the paper does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import decode_error_message, decode_image
from .manifests import clean_text, pseudo_report_from_labels, read_manifest, report_text
from image_processing_chexficient import CheXficientImageProcessor


logger = logging.getLogger(__name__)

TEXT_COLUMN_CHOICES = (("findings", "impression"), ("report",), ("text",))


@dataclass
class PairTable:
    """The pairs a run trains on: parallel lists of ids, image references and report texts."""

    ids: list[str]
    images: list[Any]  # paths, or row indices into `source` for `datasets` images
    texts: list[str]
    source: Any = None  # a `datasets.Dataset` when images live inside it
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) dropped before training
    rows: list[int] = field(default_factory=list)  # each pair's row position in the table it was read from

    def __len__(self) -> int:
        return len(self.ids)


def _texts_from_columns(rows: Any, columns: Sequence[str], label_columns: Sequence[str], seed: int) -> list[str]:
    if label_columns:
        texts = []
        for i, row in enumerate(rows):
            labels = {name: (None if _is_missing(row[name]) else float(row[name])) for name in label_columns}
            texts.append(pseudo_report_from_labels(labels, np.random.default_rng([seed, i])))
        return texts
    if len(columns) == 2:
        return [report_text(row[columns[0]], row[columns[1]]) for row in rows]
    return [clean_text(row[columns[0]]) for row in rows]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pick_text_columns(available: Sequence[str], text_columns: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if text_columns:
        missing = [c for c in text_columns if c not in available]
        if missing:
            raise ValueError(f"{where}: missing text column(s) {missing}; columns are {list(available)}.")
        return tuple(text_columns)
    for choice in TEXT_COLUMN_CHOICES:
        if all(c in available for c in choice):
            return choice
    raise ValueError(
        f"{where}: no report text column: expected 'findings' + 'impression', 'report' or 'text' (or pass "
        f"--text_columns / --label_columns); columns are {list(available)}."
    )


def load_pairs(
    source: str | os.PathLike | Any,
    *,
    image_root: str | os.PathLike | None = None,
    image_column: str = "path",
    id_column: str = "id",
    text_columns: Sequence[str] | None = None,
    label_columns: Sequence[str] | None = None,
    seed: int = 1,
    where: str | os.PathLike | None = None,
) -> PairTable:
    """Read pairs from a manifest path, a manifest already read (a pandas DataFrame) or a `datasets.Dataset`,
    validating columns before any training.

    `where` names a DataFrame's manifest in messages, and its folder is the default `image_root`. Rows with an empty
    report are dropped, each logged with its id. Image files are not opened here: unreadable images are found (and
    skipped) when the DataLoader decodes them.
    """
    import pandas as pd

    label_columns = list(label_columns or [])
    if isinstance(source, (str, os.PathLike)):
        where, source = os.fspath(source), read_manifest(source)
    if isinstance(source, pd.DataFrame):
        where = os.fspath(where) if where is not None else "manifest"
        frame = source
        columns = list(frame.columns)
        rows = frame.to_dict("records")
        dataset = None
    else:  # a datasets.Dataset (memory-mapped Arrow: corpora larger than memory stream from disk)
        where = f"dataset {getattr(source, 'info', None) and source.info.dataset_name or type(source).__name__}"
        columns = list(source.column_names)
        dataset = source
        rows = source.remove_columns([image_column]) if image_column in columns else source
    if image_column not in columns:
        raise ValueError(f"{where}: missing image column {image_column!r}; columns are {columns}.")
    missing_labels = [c for c in label_columns if c not in columns]
    if missing_labels:
        raise ValueError(f"{where}: missing label column(s) {missing_labels}.")
    text_cols = () if label_columns else _pick_text_columns(columns, text_columns, where)

    row_list = rows if isinstance(rows, list) else list(rows)
    ids = [str(row[id_column]) if id_column in columns else str(i) for i, row in enumerate(row_list)]
    texts = _texts_from_columns(row_list, text_cols, label_columns, seed)
    if dataset is None:
        root = Path(image_root) if image_root is not None else Path(where).parent
        images: list[Any] = [str(root / str(row[image_column])) for row in row_list]
    else:
        images = list(range(len(row_list)))

    keep, skipped = [], []
    for i, text in enumerate(texts):
        if text:
            keep.append(i)
        else:
            skipped.append((ids[i], "empty report"))
            logger.warning("%s: id %s has an empty report; skipped.", where, ids[i])
    if skipped:
        logger.warning("%s: skipped %d of %d rows with an empty report.", where, len(skipped), len(texts))
    if not keep:
        raise ValueError(f"{where}: no rows with a report.")
    return PairTable(
        ids=[ids[i] for i in keep],
        images=[images[i] for i in keep],
        texts=[texts[i] for i in keep],
        source=dataset,
        skipped=skipped,
        rows=keep,
    )


class ImageReportDataset(Dataset):
    """Decodes and preprocesses one pair per index; an unreadable image (whatever it raised: the policy of
    `chexficient.data.images`) yields `pixel_values=None` and a reason naming the file."""

    def __init__(self, pairs: PairTable, image_processor: CheXficientImageProcessor, image_column: str = "image"):
        self.pairs = pairs
        self.image_processor = image_processor
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id = self.pairs.ids[index]
        reference = self.pairs.images[index]
        name = str(reference) if self.pairs.source is None else f"id {sample_id}"  # what its error names
        try:
            if self.pairs.source is not None:  # a `datasets` image is decoded as its row is read
                reference = self.pairs.source[int(reference)][self.image_column]
        except Exception as failure:  # as for a file: this pair's error, never the run's
            pixel_values, error = None, decode_error_message(failure, name)
        else:
            pixel_values, error = decode_image(self.image_processor, reference, name)
        return {
            "index": index,
            "id": sample_id,
            "text": self.pairs.texts[index],
            "pixel_values": pixel_values,
            "error": error,
        }


class ImageReportCollator:
    """Stacks decoded images and tokenizes reports (right padding, max 256 tokens).

    An unreadable image keeps its slot (zeros, `valid` False) so that batches stay the same size on every process
    for the gathered loss; the training loop leaves invalid pairs out of the loss and counts them.
    """

    def __init__(self, tokenizer: Any, image_size: tuple[int, int], max_length: int = 256):
        self.tokenizer = tokenizer
        self.pixel_shape = (3, *image_size)
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        shape = self.pixel_shape
        self.tokenizer.padding_side = "right"
        tokens = self.tokenizer(
            [s["text"] for s in samples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch: dict[str, Any] = {
            k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        empty = np.zeros(shape, dtype=np.float32)
        batch["pixel_values"] = torch.from_numpy(
            np.stack([s["pixel_values"] if s["pixel_values"] is not None else empty for s in samples])
        )
        batch["valid"] = torch.tensor([s["pixel_values"] is not None for s in samples], dtype=torch.bool)
        batch["sample_index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        batch["skipped"] = [(s["id"], s["error"]) for s in samples if s["pixel_values"] is None]
        return batch
