"""AdamW parameter groups and a cosine schedule whose horizon is fixed once curation has chosen the subset."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


NO_DECAY_NAMES = ("logit_scale", "position_embeddings", "cls_token", "mask_token")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: biases, norms, layer scales, the temperature and token embeddings of the ViT
    (position, CLS, mask) are not decayed (the reference's exclusions, fixed to actually match)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or any(part in name for part in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class CurationAwareCosine:
    """LR multiplier for `LambdaLR`: warm-up, then a half cosine from 1 down to `min_lr / lr`.

    While curating, the total number of steps is an estimate (the subset size is not known yet). `finalize` is
    called when curation ends with the real number of remaining steps: the cosine continues from the phase it has
    reached and lands on `min_lr` exactly at the last real step, without a jump.
    """

    def __init__(self, estimated_total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.1):
        self.estimated_total_steps = max(int(estimated_total_steps), 1)
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        self.finalized_at: int | None = None  # step at which the real horizon became known
        self.phase_at_finalize = 0.0
        self.remaining_steps = 0

    def phase(self, step: int) -> float:
        """Progress through the cosine in [0, 1]."""
        if self.finalized_at is None:
            progress = (step - self.warmup_steps) / max(self.estimated_total_steps - self.warmup_steps, 1)
        else:
            done = (step - self.finalized_at) / max(self.remaining_steps, 1)
            progress = self.phase_at_finalize + (1.0 - self.phase_at_finalize) * done
        return min(max(progress, 0.0), 1.0)

    def finalize(self, step: int, remaining_steps: int) -> None:
        """Fix the horizon: `remaining_steps` optimizer steps follow `step`."""
        self.phase_at_finalize = self.phase(step)
        self.finalized_at = step
        self.remaining_steps = max(int(remaining_steps), 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.phase(step)))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_optimizer_and_schedule(
    model: nn.Module,
    *,
    learning_rate: float,
    min_learning_rate: float,
    weight_decay: float,
    estimated_total_steps: int,
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, CurationAwareCosine]:
    """AdamW (eps 1e-8, as the reference) with the curation-aware cosine schedule."""
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, eps=1e-8)
    min_ratio = min_learning_rate / learning_rate if learning_rate > 0 else 0.0  # lr 0: a frozen run
    schedule = CurationAwareCosine(estimated_total_steps, warmup_steps, min_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), schedule
