"""The sets the adapters return (classification, retrieval, segmentation) and the layout error they raise."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


PathLike = str | os.PathLike


class DatasetLayoutError(FileNotFoundError):
    """A benchmark folder lacks a file, folder or column its adapter needs; the message names it and its path."""


@dataclass
class ClassificationSet:
    """Images with multi-label targets: 1 positive, 0 negative, -1 uncertain (masked by the metrics)."""

    name: str
    labels: list[str]
    image_paths: list[str]
    targets: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)


@dataclass
class RetrievalSet:
    """Images paired with their report text (texts may repeat; retrieval de-duplicates them)."""

    name: str
    image_paths: list[str]
    texts: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)


@dataclass
class SegmentationSet:
    """Images with lazily decoded multi-label masks (bool [K, H, W] at each image's own resolution)."""

    name: str
    classes: list[str]
    image_paths: list[str]
    splits: list[str]
    ids: list[str]
    mask_reader: Callable[[int], np.ndarray]
    image_reader: Callable[[int], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_mask(self, index: int) -> np.ndarray:
        """Bool masks [K, H, W] of sample `index`."""
        return self.mask_reader(index)

    def read_image(self, index: int) -> np.ndarray | str:
        """The decoded image where the image processor cannot read the file (raw JSRT), else the path."""
        if self.image_reader is not None:
            return self.image_reader(index)
        return self.image_paths[index]

    def subset(self, split: str) -> SegmentationSet:
        """The samples of one split, with readers re-indexed to the subset."""
        keep = [i for i, s in enumerate(self.splits) if s == split]
        mask_reader, image_reader = self.mask_reader, self.image_reader
        return SegmentationSet(
            name=self.name,
            classes=list(self.classes),
            image_paths=[self.image_paths[i] for i in keep],
            splits=[self.splits[i] for i in keep],
            ids=[self.ids[i] for i in keep],
            mask_reader=lambda j: mask_reader(keep[j]),
            image_reader=None if image_reader is None else (lambda j: image_reader(keep[j])),
        )
