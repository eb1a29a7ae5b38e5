"""Fast inference: batched embedding and zero-shot classification, an HTTP server with micro-batching, ONNX export.

The `chexficient` console command (`chexficient.cli`) wraps these; see `chexficient --help`.
"""

from .engine import InferenceEngine, parse_labels


__all__ = ["InferenceEngine", "parse_labels"]
