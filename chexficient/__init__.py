"""CheXficient: a data- and compute-efficient chest X-ray foundation model (Wang et al., arXiv 2602.22843).

The library behind the project's programs. The public API:

    from chexficient import CheXficientModel, CheXficientProcessor, PrototypeCurator, InferenceEngine

- the model classes, re-exported from the Hugging Face remote-code files (`modeling_chexficient`, ...);
- `PrototypeCurator` and `CurationConfig`, the prototype-driven data curation (pure functions in
  `chexficient.curation.functions`);
- `InferenceEngine`, batched embedding and zero-shot classification on CPU or GPU (the `chexficient` command).

Rooms, lowest first (a room imports only rooms below it; `tests/test_layout.py` holds the rule):
- `curation` (pure: config, tensor functions, curator, sampler, loss; imports nothing else of the library),
  `runtime` (machine facts, device/dtype/Accelerator, presets, checkpoints), `metrics` (local `evaluate` modules,
  bootstrap CIs, results tables);
- `data` (manifests, pairs, images and their error policy, labels, curated subsets);
- `phantoms` (synthetic radiographs: render, corpus, archive);
- `inference` (the engine and the commands: embed, classify, curate, serve, export-onnx), `hub` (model cards,
  publishing, the reference-checkpoint converter);
- `cli`, the `chexficient` command.
"""

from . import moved_modules
from .curation import CurationConfig, PrototypeCurator
from .inference.engine import InferenceEngine
from configuration_chexficient import CheXficientConfig
from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import (
    CheXficientForImageClassification,
    CheXficientModel,
    CheXficientVisionModel,
)
from processing_chexficient import CheXficientProcessor


moved_modules.install()

__version__ = "0.3.0"

__all__ = [
    "CheXficientConfig",
    "CheXficientForImageClassification",
    "CheXficientImageProcessor",
    "CheXficientModel",
    "CheXficientProcessor",
    "CheXficientVisionModel",
    "CurationConfig",
    "InferenceEngine",
    "PrototypeCurator",
    "__version__",
]
