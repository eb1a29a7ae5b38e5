"""The curation settings: one dataclass for the command line (`HfArgumentParser`) and the curator alike.

The defaults are the released model's (K = 6 prototypes, drop the farthest 5% of each cluster, keep the next 10%
and at most 10 central pairs per cluster, Sinkhorn-Knopp with epsilon 0.5 for 3 iterations, EMA decay 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field


CURATION_MODES = ("superbatch", "accumulate")


@dataclass
class CurationConfig:
    curation: bool = field(default=True, metadata={"help": "prototype-driven curation (False: plain CLIP)"})
    curation_mode: str = field(
        default="superbatch",
        metadata={
            "help": "superbatch: select within the gathered global batch (the reference); accumulate: "
            "embed a candidate pool without gradients in chunks, then step on the selection only"
        },
    )
    curation_epochs: int = field(
        default=1, metadata={"help": "leading epochs that curate; later ones reuse the subset"}
    )
    num_prototypes: int = field(default=6, metadata={"help": "K, the number of prototypes"})
    outlier_quantile: float = field(
        default=0.95, metadata={"help": "per-cluster distance quantile above which pairs are dropped"}
    )
    support_quantile: float = field(
        default=0.85, metadata={"help": "pairs between this and the outlier quantile are all kept"}
    )
    max_per_cluster: int = field(
        default=10, metadata={"help": "central pairs kept per cluster by farthest point sampling"}
    )
    sinkhorn_epsilon: float = field(default=0.5, metadata={"help": "Sinkhorn-Knopp entropy"})
    sinkhorn_iterations: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations"})
    ema_decay: float = field(default=0.9, metadata={"help": "prototype EMA decay"})
    kmeans_iterations: int = field(default=20, metadata={"help": "Lloyd iterations of the k-means initialisation"})
    warmup_samples: int = field(default=800, metadata={"help": "pairs embedded for the k-means initialisation"})
    candidate_pool_size: int = field(default=4096, metadata={"help": "accumulate mode: candidates per selection"})
    embedding_chunk_size: int = field(default=256, metadata={"help": "accumulate mode: no-grad embedding chunk"})
    expected_keep_ratio: float = field(
        default=0.227, metadata={"help": "estimate of the kept share, used for the LR horizon until curation ends"}
    )
    random_subset_ratio: float | None = field(
        default=None, metadata={"help": "baseline: train on a random subset of this share instead of curating"}
    )
    random_subset_size: int | None = field(
        default=None, metadata={"help": "baseline: train on a random subset of this many pairs instead of curating"}
    )

    def __post_init__(self):
        if self.curation_mode not in CURATION_MODES:
            raise ValueError(f"--curation_mode must be one of {CURATION_MODES}, got {self.curation_mode!r}.")
        if not 0 < self.support_quantile < self.outlier_quantile <= 1:
            raise ValueError("need 0 < support_quantile < outlier_quantile <= 1.")
        if self.num_prototypes < 1 or self.max_per_cluster < 1:
            raise ValueError("--num_prototypes and --max_per_cluster must be at least 1.")
        if self.random_subset_ratio is not None and not 0 < self.random_subset_ratio <= 1:
            raise ValueError("--random_subset_ratio must lie in (0, 1].")
        if self.random_subset_size is not None and self.random_subset_size < 1:
            raise ValueError("--random_subset_size must be at least 1.")
        if self.random_subset_ratio is not None and self.random_subset_size is not None:
            raise ValueError("give --random_subset_ratio or --random_subset_size, not both.")

    @property
    def random_subset(self) -> bool:
        """True for the random-subset baseline (no curation, a fixed random share of the pairs)."""
        return self.random_subset_ratio is not None or self.random_subset_size is not None

    @property
    def curating(self) -> bool:
        """True when the run curates (curation on and no random-subset baseline)."""
        return self.curation and not self.random_subset


__all__ = ["CURATION_MODES", "CurationConfig"]
