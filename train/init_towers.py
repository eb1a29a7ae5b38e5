"""Start CheXficient's towers from pretrained DINOv2 and BERT weights (the paper's initialisation).

The released model starts its image tower from DINOv2 ViT-B/14 *with registers* but runs it without them: the
register tokens are dropped and the 37 x 37 position grid (518 px) is resized once, bicubically, to the model's grid.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import AutoModel

from modeling_chexficient import CheXficientModel


logger = logging.getLogger(__name__)


def resize_position_embeddings(position_embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, C] -> [1, 1 + grid*grid, C]: bicubic resize of the patch grid, CLS position kept."""
    cls, patches = position_embeddings[:, :1], position_embeddings[:, 1:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches are not a square grid.")
    if old == grid:
        return position_embeddings
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(position_embeddings.dtype)
    return torch.cat([cls, patches], dim=1)


def load_pretrained_towers(model: CheXficientModel, vision: str | None, text: str | None) -> None:
    """Copy DINOv2 weights (`vision`) and BERT weights (`text`), local folders or Hub names, into `model`."""
    if vision is not None:
        source = AutoModel.from_pretrained(vision).state_dict()
        source = {k: v for k, v in source.items() if "register_tokens" not in k}
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        key = "embeddings.position_embeddings"
        source[key] = resize_position_embeddings(source[key], grid)
        missing, unexpected = model.vision_model.load_state_dict(source, strict=False)
        if missing or unexpected:
            raise ValueError(f"{vision} does not fit the image tower: missing {missing}, unexpected {unexpected}.")
        logger.info("image tower initialised from %s", vision)
    if text is not None:
        source = AutoModel.from_pretrained(text).state_dict()
        source = {k: v for k, v in source.items() if not k.startswith("pooler.")}
        missing, unexpected = model.text_model.load_state_dict(source, strict=False)
        missing = [k for k in missing if not k.endswith("_ids")]
        if missing or unexpected:
            raise ValueError(f"{text} does not fit the text tower: missing {missing}, unexpected {unexpected}.")
        logger.info("text tower initialised from %s", text)
