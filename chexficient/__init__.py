"""CheXficient: a data- and compute-efficient chest X-ray foundation model (Wang et al., arXiv 2602.22843).

The library behind the project's programs. The public API:

    from chexficient import CheXficientModel, CheXficientProcessor, PrototypeCurator, InferenceEngine

- the model classes, re-exported from the Hugging Face remote-code files (`modeling_chexficient`, ...);
- `PrototypeCurator` and `CurationConfig`, the prototype-driven data curation (pure functions in
  `chexficient.curation.functions`);
- `InferenceEngine`, batched embedding and zero-shot classification on CPU or GPU (the `chexficient` command).

Modules: `images` (inputs and decoding, one error policy), `pairs` and `manifests` (image-report data),
`phantoms` (synthetic radiographs), `runtime` (device, dtype, Accelerator), `presets` (argument presets),
`checkpoints`, `subset`, `labels`, `metrics` (local `evaluate` modules), `bootstrap`, `results`, `convert`
(reference checkpoints), `hub` (model cards, upload), `inference`, `cli`.
"""

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


__version__ = "0.2.0"

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
