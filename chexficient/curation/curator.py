"""The stateful curator the training loop drives: prototypes, the curated subset and counters, checkpointable."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import CurationConfig
from .functions import (
    SelectionResult,
    concat_normalized,
    ema_update_prototypes,
    kmeans_init,
    select_samples,
    sinkhorn_knopp,
)


CURATOR_TENSORS = "curator.safetensors"
CURATOR_SETTINGS = "curator.json"


class PrototypeCurator:
    """Holds the prototypes [K, 2D] and a mask over the `num_samples` dataset indices of the curated subset.

    `select` decides which pairs of a super-batch to train on and records them; `update_prototypes` moves the
    prototypes towards the kept pairs (called after the optimizer step, with the pre-step features, as the
    reference does). Counters stay on the device; nothing here syncs with it.
    """

    def __init__(self, config: CurationConfig, num_samples: int, device: torch.device | str = "cpu"):
        self.config = config
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.prototypes: torch.Tensor | None = None
        self.curated = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        self.candidates = torch.zeros((), dtype=torch.long, device=self.device)
        self.kept = torch.zeros((), dtype=torch.long, device=self.device)
        self.usage = torch.zeros(config.num_prototypes, device=self.device)

    @property
    def is_initialized(self) -> bool:
        return self.prototypes is not None

    def to(self, device: torch.device | str) -> PrototypeCurator:
        self.device = torch.device(device)
        for name in ("prototypes", "curated", "candidates", "kept", "usage"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    def initialize(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """k-means on the un-normalised [image ; text] concatenation of warm-up pairs (as the reference)."""
        features = torch.cat([image_embeds.float(), text_embeds.float()], dim=-1).cpu()
        centroids = kmeans_init(
            features, self.config.num_prototypes, num_iterations=self.config.kmeans_iterations, generator=generator
        )
        self.prototypes = centroids.to(self.device)

    def select(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        sample_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SelectionResult:
        """Select pairs of a super-batch (embeddings [N, D], dataset indices [N]) and add the kept ones to the subset."""
        if self.prototypes is None:
            raise RuntimeError("the curator's prototypes are not initialised; call initialize() first.")
        features = concat_normalized(image_embeds, text_embeds)
        result = select_samples(
            features,
            self.prototypes,
            valid=valid,
            outlier_quantile=self.config.outlier_quantile,
            support_quantile=self.config.support_quantile,
            max_per_cluster=self.config.max_per_cluster,
            generator=generator,
        )
        ids = sample_ids.to(self.device)
        self.curated[ids] |= result.keep.to(self.device)  # duplicates of an id within a batch OR together
        self.candidates += ids.numel() if valid is None else valid.sum().to(self.device)
        self.kept += result.keep.sum().to(self.device)
        return result

    def update_prototypes(self, features: torch.Tensor) -> None:
        """Sinkhorn-assign the kept pairs' normalised features [M, 2D] and move the prototypes by EMA."""
        if self.prototypes is None or features.numel() == 0:
            return
        features = features.float().to(self.device)
        similarities = features @ F.normalize(self.prototypes, dim=-1).t()  # [M, K]
        assignments = sinkhorn_knopp(similarities, self.config.sinkhorn_epsilon, self.config.sinkhorn_iterations)
        self.prototypes = ema_update_prototypes(self.prototypes, features, assignments, self.config.ema_decay)
        self.usage = assignments.sum(dim=0)

    def curated_ids(self) -> torch.Tensor:
        """Sorted dataset indices of the curated subset (on the CPU)."""
        return self.curated.nonzero().squeeze(1).cpu()

    def stats(self) -> dict[str, float]:
        """Kept share so far, subset size and last prototype usage (syncs: for logging only)."""
        candidates = max(int(self.candidates), 1)
        stats = {"kept_fraction": int(self.kept) / candidates, "curated": int(self.curated.sum())}
        stats.update({f"usage_{k}": float(u) for k, u in enumerate(self.usage.tolist())})
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "num_samples": self.num_samples,
            "prototypes": None if self.prototypes is None else self.prototypes.cpu().clone(),
            "curated": self.curated.cpu().clone(),
            "candidates": self.candidates.cpu().clone(),
            "kept": self.kept.cpu().clone(),
            "usage": self.usage.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"the checkpoint's curator covers {state['num_samples']} samples, this dataset has {self.num_samples}."
            )
        known = {f.name for f in fields(CurationConfig)}
        self.config = CurationConfig(**{k: v for k, v in state["config"].items() if k in known})
        self.prototypes = None if state["prototypes"] is None else state["prototypes"].to(self.device)
        self.curated = state["curated"].to(self.device)
        self.candidates = state["candidates"].to(self.device)
        self.kept = state["kept"].to(self.device)
        self.usage = state["usage"].to(self.device)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the state as `curator.safetensors` (tensors) and `curator.json` (settings): no pickle."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {k: state[k].contiguous() for k in ("curated", "candidates", "kept", "usage")}
        if state["prototypes"] is not None:
            tensors["prototypes"] = state["prototypes"].contiguous()
        save_file(tensors, str(Path(folder) / CURATOR_TENSORS))
        meta = {"config": state["config"], "num_samples": state["num_samples"]}
        (Path(folder) / CURATOR_SETTINGS).write_text(json.dumps(meta, indent=2))

    def load(self, folder: str | os.PathLike) -> None:
        """Read the state `save` wrote; FileNotFoundError naming the folder when it is missing."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CURATOR_TENSORS).is_file() or not (folder / CURATOR_SETTINGS).is_file():
            raise FileNotFoundError(f"{folder}: no curator state ({CURATOR_TENSORS}, {CURATOR_SETTINGS}).")
        tensors = load_file(str(folder / CURATOR_TENSORS))
        meta = json.loads((folder / CURATOR_SETTINGS).read_text())
        self.load_state_dict({**meta, "prototypes": tensors.pop("prototypes", None), **tensors})


def selection_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one selection (FPS start points): the same on every process for a given (seed, step)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + step)
    return generator


def warmup_indices(num_samples: int, warmup_samples: int, seed: int, world_size: int = 1) -> torch.Tensor:
    """The pairs embedded for the k-means initialisation: a shuffled sample of the whole set (not one source, as
    the reference takes), of `warmup_samples` pairs trimmed to a multiple of the processes."""
    count = min(warmup_samples, num_samples)
    count -= count % world_size
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + 7919))[:count]


def curate_super_batch(
    curator: PrototypeCurator,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    sample_ids: torch.Tensor,
    valid: torch.Tensor,
    seed: int,
    step: int,
) -> tuple[torch.Tensor, SelectionResult]:
    """One curation decision, as the trainer takes it at optimizer step `step`: the keep mask [N] (valid pairs the
    curator keeps) and the full selection. Shared by train/pretrain.py and `chexficient curate`."""
    generator = selection_generator(seed, step, image_embeds.device)
    with torch.no_grad():
        selection = curator.select(
            image_embeds.detach().float(), text_embeds.detach().float(), sample_ids, valid=valid, generator=generator
        )
    return selection.keep & valid, selection
