"""Precomputed vision features: the frozen CheXficient tower runs once over the training images, its selected
hidden states (layer -2, CLS dropped: [729, 768] per image at 378 px) are stored as safetensors shards, and
training reads them instead of running the tower. The loss is the live tower's (tests/test_llava_rad.py checks).

Each process encodes its own slice of the images; the main process merges the per-process indices. Unreadable
images are reported and left out. No pickles anywhere: safetensors shards and a JSON index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from chexficient.data.images import InputItem, make_image_loader
from llava_rad.data import ReportExample
from llava_rad.model import vision_features


logger = logging.getLogger(__name__)
INDEX_FILENAME = "index.json"


def tower_fingerprint(model: Any) -> dict[str, Any]:
    """What the stored features depend on: the tower's weights (a hash), the feature layer and strategy."""
    config = model.config
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    layer = config.vision_feature_layer
    return {
        "tower_sha256": digest.hexdigest(),
        "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "image_seq_length": config.image_seq_length,
    }


class FeatureStore:
    """Read-only view of a feature folder: `store[example_id]` -> tensor [N, H]; `id in store`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / INDEX_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature index; compute the store first (--features_dir).")
        index = json.loads(path.read_text())
        for key in ("metadata", "shards"):
            if key not in index:
                raise ValueError(f"{path}: missing field {key!r}.")
        self.metadata: dict[str, Any] = index["metadata"]
        self.shards: dict[str, str] = index["shards"]
        self.skipped: list[str] = index.get("skipped", [])
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.shards)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.shards

    def __getitem__(self, example_id: str) -> torch.Tensor:
        shard = self.shards[example_id]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return handle.get_tensor(example_id)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the shards
        return {**self.__dict__, "_handles": {}}

    def check(self, expected: dict[str, Any]) -> None:
        """Raise if the store was computed with another tower or feature selection than `expected`, a model's
        `tower_fingerprint`."""
        differing = {k: (self.metadata.get(k), v) for k, v in expected.items() if self.metadata.get(k) != v}
        if differing:
            raise ValueError(f"{self.folder}: features were computed for another tower or setting: {differing}.")


@torch.no_grad()
def compute_feature_store(
    model: Any,
    examples: Sequence[ReportExample],
    image_processor: Any,
    folder: str | os.PathLike,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Encode this process's slice (every `world_size`-th example from `rank`) and write its shards and index part.

    Call `merge_feature_index(folder, world_size, metadata)` on the main process once every process is done.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique to key the feature store.")
    device = torch.device(device) if device is not None else model.device
    mine = list(examples)[rank::world_size]
    loader = make_image_loader([InputItem(e.id, e.image) for e in mine], image_processor, batch_size, num_workers)
    shards: dict[str, str] = {}
    skipped: list[str] = []
    pending: dict[str, torch.Tensor] = {}

    def flush() -> None:
        if pending:
            name = f"features-r{rank:03d}-{len(set(shards.values())):05d}.safetensors"
            save_file(pending, str(folder / name))
            shards.update(dict.fromkeys(pending, name))
            pending.clear()

    for batch in tqdm(loader, desc="vision features", disable=rank != 0):
        for index, error in batch.failed:
            logger.warning(f"skipping unreadable image of {mine[index].id}: {error}")
            skipped.append(mine[index].id)
        if batch.pixel_values is None:
            continue
        features = vision_features(model, batch.pixel_values.to(device)).to(dtype).cpu()
        for index, feature in zip(batch.indices, features):
            pending[mine[index].id] = feature.contiguous()
        if len(pending) >= shard_size:
            flush()
    flush()
    part = {"shards": shards, "skipped": skipped}
    (folder / f"index-r{rank:03d}.json").write_text(json.dumps(part))
    return part


def merge_feature_index(folder: str | os.PathLike, world_size: int, metadata: dict[str, Any]) -> FeatureStore:
    """Join the per-process index parts into `index.json` and return the store."""
    folder = Path(folder)
    shards: dict[str, str] = {}
    skipped: list[str] = []
    for rank in range(world_size):
        part_path = folder / f"index-r{rank:03d}.json"
        if not part_path.is_file():
            raise FileNotFoundError(f"{part_path}: process {rank} wrote no feature index.")
        part = json.loads(part_path.read_text())
        shards.update(part["shards"])
        skipped.extend(part["skipped"])
    (folder / INDEX_FILENAME).write_text(json.dumps({"metadata": metadata, "shards": shards, "skipped": skipped}))
    if skipped:
        logger.warning(f"{len(skipped)} unreadable images left out of the feature store, e.g. {skipped[:3]}")
    return FeatureStore(folder)


__all__ = ["FeatureStore", "compute_feature_store", "merge_feature_index", "tower_fingerprint"]
