"""Prototype-driven data curation: pure tensor functions, the stateful curator, the curating sampler and the
contrastive loss over gathered embeddings."""

from .config import CURATION_MODES, CurationConfig
from .curator import PrototypeCurator, curate_super_batch, selection_generator, warmup_indices
from .functions import SelectionResult, concat_normalized, kmeans_init, select_samples
from .loss import curated_clip_loss, gather_no_grad, gather_with_grad
from .sampler import CuratingBatchSampler


__all__ = [
    "CURATION_MODES",
    "CuratingBatchSampler",
    "CurationConfig",
    "PrototypeCurator",
    "SelectionResult",
    "concat_normalized",
    "curate_super_batch",
    "curated_clip_loss",
    "gather_no_grad",
    "gather_with_grad",
    "kmeans_init",
    "select_samples",
    "selection_generator",
    "warmup_indices",
]
