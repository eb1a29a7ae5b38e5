"""The dataset registries (name -> adapter) and the `load_*` entry points that resolve the root and dispatch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .chexpert import _chexpert, _chexpert_5x200
from .containers import ClassificationSet, PathLike, RetrievalSet, SegmentationSet
from .jsrt import _jsrt
from .layout import _missing
from .mimic import _mimic, _mimic_retrieval
from .nih import _nih
from .phantom import _phantom, _phantom_retrieval, _phantom_segmentation
from .pneumonia_tb import _pneumonia2017, _tbx11k
from .siim import _siim_ptx, _siim_segmentation
from .vindr import _ribcxr, _vindr_cxr, _vindr_pcxr


CLASSIFICATION_DATASETS: dict[str, Callable[..., ClassificationSet]] = {
    "chexpert": _chexpert,
    "mimic": _mimic,
    "nih": _nih,
    "vindr_cxr": _vindr_cxr,
    "vindr_pcxr": _vindr_pcxr,
    "siim_ptx": _siim_ptx,
    "pneumonia2017": _pneumonia2017,
    "tbx11k": _tbx11k,
    "phantom": _phantom,
}
RETRIEVAL_DATASETS: dict[str, Callable[..., RetrievalSet]] = {
    "chexpert_5x200": _chexpert_5x200,
    "mimic": _mimic_retrieval,
    "phantom": _phantom_retrieval,
}
SEGMENTATION_DATASETS: dict[str, Callable[..., SegmentationSet]] = {
    "jsrt": _jsrt,
    "siim_ptx": _siim_segmentation,
    "vindr_ribcxr": _ribcxr,
    "phantom_segmentation": _phantom_segmentation,
}


def _lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"Unknown {kind} dataset {name!r}; known: {', '.join(sorted(registry))}.")
    return registry[name]


def _root(name: str, root: PathLike) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise _missing(name, "dataset root folder", path)
    return path


def load_classification(name: str, root: PathLike, split: str = "test") -> ClassificationSet:
    """Classification benchmark `name` read from `root` (see the `eval.datasets` docstring for each layout)."""
    loader = _lookup(CLASSIFICATION_DATASETS, "classification", name)
    return loader(_root(name, root), split)


def load_retrieval(name: str, root: PathLike) -> RetrievalSet:
    """Image-report retrieval benchmark `name` read from `root`."""
    loader = _lookup(RETRIEVAL_DATASETS, "retrieval", name)
    return loader(_root(name, root))


def load_segmentation(name: str, root: PathLike) -> SegmentationSet:
    """Segmentation benchmark `name` read from `root`; every sample carries its split."""
    loader = _lookup(SEGMENTATION_DATASETS, "segmentation", name)
    return loader(_root(name, root))
