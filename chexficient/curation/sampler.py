"""The curating batch sampler: one global index stream, identical on every process, sharded by rank.

Curation epochs (the first `curation_epochs`, default 1) walk the whole dataset in shuffled super-batches; the
training loop selects pairs from each gathered super-batch and adds the kept ids to the curated subset. Later epochs
walk only the curated subset, reshuffled every epoch. Every process derives the same permutation from
(seed, epoch), takes its own slice of each super-batch, and can start mid-epoch to resume without repeating samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class CuratingBatchSampler(Sampler[list[int]]):
    """Per-process batches of dataset indices for curated pretraining.

    Args:
        num_samples: size of the full dataset.
        batch_size: per-process batch size during curation epochs (the super-batch is `batch_size * world_size`).
        curated_batch_size: per-process batch size once training runs on the curated subset (defaults to
            `batch_size`).
        rank, world_size: this process and the number of processes (DINOv2-style explicit sharding).
        curation_epochs: how many leading epochs curate; later epochs use the curated subset.
        seed: seed of the per-epoch permutations.

    Incomplete super-batches at the end of an epoch are dropped, so that every rank yields the same number of
    equally sized batches (the gathered contrastive loss needs that).
    """

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        curated_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        curation_epochs: int = 1,
        seed: int = 0,
    ):
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.curated_batch_size = curated_batch_size or batch_size
        self.rank = rank
        self.world_size = world_size
        self.curation_epochs = curation_epochs
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        self.curated_ids = torch.empty(0, dtype=torch.long)

    # ----- state the training loop drives -----------------------------------------------------------------------

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Move to `epoch`, skipping its first `start_step` super-batches (already trained on before a restart)."""
        self.epoch = epoch
        self.start_step = start_step

    def set_curated_ids(self, ids: torch.Tensor) -> None:
        """The subset that post-curation epochs iterate (dataset indices)."""
        ids = torch.as_tensor(ids, dtype=torch.long).unique(sorted=True)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"curated ids must lie in [0, {self.num_samples}).")
        self.curated_ids = ids

    @property
    def is_curating(self) -> bool:
        return self.epoch < self.curation_epochs

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start_step": self.start_step, "curated_ids": self.curated_ids.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["start_step"]))
        self.set_curated_ids(state["curated_ids"])

    # ----- the index stream ---------------------------------------------------------------------------------------

    def _pool(self) -> torch.Tensor:
        if self.is_curating:
            return torch.arange(self.num_samples)
        if self.curated_ids.numel() == 0:
            raise ValueError(f"epoch {self.epoch} trains on the curated subset, but it is empty.")
        return self.curated_ids

    def current_batch_size(self, epoch: int | None = None, pool_size: int | None = None) -> int:
        """Per-process batch size of `epoch` (default: the current one).

        After curation it is `curated_batch_size`, lowered to what the subset fills when the subset is smaller than
        one super-batch (so that training goes on instead of running zero steps).
        """
        epoch = self.epoch if epoch is None else epoch
        if epoch < self.curation_epochs:
            return self.batch_size
        size = self.curated_ids.numel() if pool_size is None else pool_size
        return max(min(self.curated_batch_size, size // self.world_size), 1)

    def steps_per_epoch(self, epoch: int | None = None, pool_size: int | None = None) -> int:
        """Super-batches in `epoch` (default: the current one), counting from its start."""
        epoch = self.epoch if epoch is None else epoch
        curating = epoch < self.curation_epochs
        size = pool_size if pool_size is not None else (self.num_samples if curating else self.curated_ids.numel())
        return size // (self.current_batch_size(epoch, size) * self.world_size)

    def global_order(self) -> torch.Tensor:
        """The epoch's shuffled pool, identical on every process."""
        pool = self._pool()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return pool[torch.randperm(pool.numel(), generator=generator)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        batch = self.current_batch_size()
        super_batch = batch * self.world_size
        steps = order.numel() // super_batch
        for step in range(self.start_step, steps):
            begin = step * super_batch + self.rank * batch
            yield order[begin : begin + batch].tolist()

    def __len__(self) -> int:
        return max(self.steps_per_epoch() - self.start_step, 0)
