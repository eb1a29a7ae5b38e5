"""Fast CheXficient inference: batched embedding and zero-shot classification, an HTTP server, ONNX export.

The `chexficient` console command (`inference.cli:main`) wraps these; see `chexficient --help`.
"""

from .engine import InferenceEngine, parse_labels
from .inputs import InputItem, discover_inputs


__all__ = ["InferenceEngine", "InputItem", "discover_inputs", "parse_labels"]
