"""Contrastive loss over embeddings gathered from every process, so each rank sees all negatives."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from modeling_chexficient import clip_loss


MAX_LOGIT_SCALE = math.log(100.0)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` [B, ...] from all processes in rank order -> [W * B, ...], keeping gradients.

    The backward pass sums the incoming gradients over ranks, so with every rank computing the same global loss
    and DDP averaging parameter gradients, each parameter receives the exact gradient of that loss.
    Batches must have the same size on every rank. A no-op outside torch.distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all processes in rank order, without autograd."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def curated_clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the kept pairs of a (gathered) super-batch.

    `image_embeds`, `text_embeds` [N, D] L2-normalised; `logit_scale` the log temperature scale, clamped at log 100
    as in CLIP; `keep` [N] bool selects the pairs that enter the loss (all when None).
    """
    if keep is not None:
        image_embeds, text_embeds = image_embeds[keep], text_embeds[keep]
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return clip_loss(scale * text_embeds @ image_embeds.t())
