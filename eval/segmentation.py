"""Segmentation with a U-Net decoder on the frozen ViT: the last five intermediate layers' patch tokens feed a
decoder that upsamples step by step; Dice + binary cross-entropy loss, model selection on the validation split,
Dice with bootstrap CIs on the test split.

    python -m eval.segmentation --model outputs/demo/final --dataset phantom_segmentation --root outputs/phantom_seg

The output logits get no normalisation or activation (the reference applied BatchNorm + GELU to them). Classes may
overlap (e.g. clavicles over lungs), so each class is an independent sigmoid. Masks are resized and cropped with the
same geometry as the image processor applies to the image (nearest neighbour), and Dice is computed at the model's
input resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from chexficient.data.images import DECODE_ERRORS, ImageBatch, ImageDataset, collate_images, ordered_loader
from eval.arguments import EvalArguments


logger = logging.getLogger(__name__)


# ----- the decoder ----------------------------------------------------------------------------------------------------


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """U-Net decoder over L same-resolution ViT feature maps (deepest first).

    The deepest map starts the decoder at the patch grid; each following stage doubles the resolution with a
    transposed convolution and concatenates the next (shallower) layer, projected by a 1x1 convolution and resized to
    that resolution. A final 1x1 convolution gives one logit map per class, resized to the input size. The logits
    are returned raw.
    """

    def __init__(self, hidden_size: int, num_classes: int, channels: Sequence[int] = (256, 128, 64, 32, 16)):
        super().__init__()
        channels = list(channels)
        self.skips = nn.ModuleList(nn.Conv2d(hidden_size, c, 1) for c in channels)
        self.stem = ConvBlock(channels[0], channels[0])
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in zip(channels, channels[1:]))
        self.blocks = nn.ModuleList(ConvBlock(2 * c, c) for c in channels[1:])
        self.classifier = nn.Conv2d(channels[-1], num_classes, 1)

    @property
    def num_levels(self) -> int:
        return len(self.skips)

    def forward(self, features: Sequence[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        """`features`: L maps [B, hidden, g, g], deepest first -> logits [B, num_classes, *output_size]."""
        if len(features) != self.num_levels:
            raise ValueError(f"the decoder has {self.num_levels} levels but got {len(features)} feature maps.")
        x = self.stem(self.skips[0](features[0]))  # [B, c0, g, g]
        for skip, up, block, feature in zip(self.skips[1:], self.ups, self.blocks, features[1:]):
            x = up(x)  # [B, c, 2h, 2w]
            lateral = F.interpolate(skip(feature), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, lateral], dim=1))
        logits = self.classifier(x)
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)


def patch_feature_maps(
    hidden_states: Sequence[torch.Tensor], num_levels: int, grid: tuple[int, int]
) -> list[torch.Tensor]:
    """The last `num_levels` hidden states as maps [B, H, gh, gw], deepest first (the CLS token dropped)."""
    if len(hidden_states) < num_levels:
        raise ValueError(f"the encoder has {len(hidden_states)} hidden states; {num_levels} levels were asked for.")
    maps = []
    for state in reversed(hidden_states[-num_levels:]):
        tokens = state[:, -grid[0] * grid[1] :]  # [B, gh*gw, H] patch tokens
        maps.append(tokens.transpose(1, 2).reshape(state.shape[0], state.shape[2], *grid))
    return maps


# ----- losses and data ------------------------------------------------------------------------------------------------


def dice_bce_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (per image and class, averaged) + binary cross-entropy; `masks` in {0, 1}, [B, K, H, W]."""
    probs = torch.sigmoid(logits)
    dims = (2, 3)
    intersection = (probs * masks).sum(dims)
    dice = (2 * intersection + smooth) / (probs.sum(dims) + masks.sum(dims) + smooth)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, masks)


def mask_to_model_grid(masks: np.ndarray, image_processor: Any) -> np.ndarray:
    """Bool masks [K, H, W] resized (nearest) and centre-cropped like the image processor treats the image."""
    from image_processing_chexficient import center_crop_box, resize_output_size

    height, width = masks.shape[1:]
    if image_processor.do_resize:
        height, width = resize_output_size(height, width, image_processor.size["shortest_edge"])
        masks = np.stack(
            [
                np.asarray(PIL.Image.fromarray(m.astype(np.uint8)).resize((width, height), PIL.Image.NEAREST))
                for m in masks
            ]
        ).astype(bool)
    if image_processor.do_center_crop:
        crop_h, crop_w = image_processor.crop_size["height"], image_processor.crop_size["width"]
        top, left = center_crop_box(height, width, crop_h, crop_w)
        masks = masks[:, top : top + crop_h, left : left + crop_w]
    return masks


class SegmentationImageDataset(ImageDataset):
    """(pixel_values, masks) of a SegmentationSet; a bad image or mask yields an error record (the project's one
    decode-error policy, `chexficient.data.images.DECODE_ERRORS`)."""

    def __init__(self, data: Any, image_processor: Any):
        size = getattr(image_processor, "size", None) or {}
        if getattr(image_processor, "do_resize", False) and "shortest_edge" not in size:
            raise ValueError(
                f"{type(image_processor).__name__} resizes to {size}; masks can follow a shortest-edge resize and a "
                "centre crop only (CheXficient's and DINOv2's processors)."
            )
        super().__init__(data.image_paths, image_processor, reader=data.read_image)
        self.data = data

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        if record["error"] is not None:
            return {**record, "masks": None}
        try:
            masks = mask_to_model_grid(self.data.read_mask(index), self.image_processor)
        except DECODE_ERRORS as error:
            return {**record, "pixel_values": None, "masks": None, "error": f"{self.items[index].path}: mask: {error}"}
        if masks.shape[1:] != record["pixel_values"].shape[1:]:
            error = f"mask {masks.shape[1:]} does not match the image {tuple(record['pixel_values'].shape[1:])}"
            return {**record, "pixel_values": None, "masks": None, "error": error}
        return {**record, "masks": torch.from_numpy(masks)}


def collate_segmentation(records: list[dict[str, Any]]) -> tuple[ImageBatch, torch.Tensor | None]:
    """The batch of readable images (`collate_images`) and their stacked masks."""
    masks = [record["masks"] for record in records if record["error"] is None]
    return collate_images(records), torch.stack(masks) if masks else None


@dataclass
class EncodedSegmentationSplit:
    """Frozen-encoder feature maps [N, L, H, g, g] (fp16, CPU), masks [N, K, h, w] and the dataset rows."""

    features: torch.Tensor
    masks: torch.Tensor
    indices: np.ndarray
    skipped: list[dict[str, str]]


@torch.no_grad()
def encode_segmentation_split(
    loaded: Any, data: Any, num_levels: int, *, batch_size: int = 16, num_workers: int = 0
) -> EncodedSegmentationSplit:
    """Run the frozen encoder once over a split and keep its last `num_levels` feature maps."""
    grid = _patch_grid(loaded)
    dataset = SegmentationImageDataset(data, loaded.image_processor)
    loader = ordered_loader(dataset, collate_segmentation, batch_size, num_workers)
    features, masks, indices, skipped = [], [], [], []
    for batch, batch_masks in tqdm(loader, desc=f"encoding {data.name}", unit="batch", leave=False):
        skipped += [{"path": str(data.image_paths[i]), "error": e} for i, e in batch.failed]
        if batch.pixel_values is None:
            continue
        states = loaded.vision_hidden_states(batch.pixel_values.to(loaded.device))
        maps = patch_feature_maps(states, num_levels, grid)
        features.append(torch.stack(maps, dim=1).half().cpu())  # [B, L, H, g, g]
        masks.append(batch_masks)
        indices.append(torch.as_tensor(batch.indices, dtype=torch.long))
    for item in skipped:
        logger.warning("skipped %s (%s)", item["path"], item["error"])
    if not features:
        raise RuntimeError(f"no readable image in {data.name}; first error: {skipped[:1]}")
    return EncodedSegmentationSplit(torch.cat(features), torch.cat(masks), torch.cat(indices).numpy(), skipped)


def _patch_grid(loaded: Any) -> tuple[int, int]:
    crop = loaded.image_processor.crop_size
    config = loaded.model.config.vision_config if loaded.is_chexficient else loaded.model.config
    return crop["height"] // config.patch_size, crop["width"] // config.patch_size


# ----- training and evaluation ----------------------------------------------------------------------------------------


def predict_masks(
    decoder: UNetDecoder,
    features: torch.Tensor,
    output_size: tuple[int, int],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Binary predictions [N, K, h, w] (logit > 0) of the decoder over cached feature maps."""
    decoder.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size].to(device).float()
            outputs.append((decoder(list(chunk.unbind(1)), output_size) > 0).cpu())
    return torch.cat(outputs)


def train_segmentation_decoder(
    train: EncodedSegmentationSplit,
    val: EncodedSegmentationSplit,
    *,
    hidden_size: int,
    num_classes: int,
    channels: Sequence[int],
    epochs: int = 30,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[UNetDecoder, list[dict[str, float]]]:
    """Train the decoder with AdamW on Dice + BCE; keep the epoch with the best validation mean Dice."""
    from chexficient.metrics.dice.dice import dice_per_image

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    decoder = UNetDecoder(hidden_size, num_classes, channels).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    output_size = tuple(train.masks.shape[-2:])
    best_state, best_dice, history = None, -1.0, []
    for epoch in tqdm(range(epochs), desc="segmentation decoder", unit="epoch"):
        decoder.train()
        order = torch.randperm(len(train.features), generator=generator)
        total = torch.zeros((), device=device)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            features = train.features[rows].to(device).float()
            logits = decoder(list(features.unbind(1)), output_size)
            loss = dice_bce_loss(logits, train.masks[rows].to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
        val_dice = float(
            dice_per_image(
                predict_masks(decoder, val.features, output_size, device=device).numpy(), val.masks.numpy()
            ).mean()
        )
        history.append({"epoch": epoch + 1, "train_loss": float(total) / len(order), "val_mean_dice": val_dice})
        if val_dice > best_dice:
            best_dice, best_state = val_dice, {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    decoder.load_state_dict(best_state)
    return decoder, history


def evaluate_segmentation(
    predictions: np.ndarray, references: np.ndarray, classes: Sequence[str], *, num_resamples: int = 500, seed: int = 0
) -> dict[str, Any]:
    """Per-class and mean Dice of binary masks [N, K, h, w], with percentile-bootstrap CIs over images."""
    from chexficient.metrics.bootstrap import bootstrap_ci
    from chexficient.metrics.dice.dice import dice_per_image, summarize_dice

    per_image = dice_per_image(predictions, references)  # [N, K]
    intervals = bootstrap_ci(
        lambda rows: summarize_dice(per_image[rows], classes), len(per_image), num_resamples=num_resamples, seed=seed
    )
    return {
        "mean_dice": intervals["mean_dice"],
        "dice": {c: intervals[f"dice/{c}"] for c in classes},
        "num_images": int(len(per_image)),
    }


def markdown_table(result: dict[str, Any]) -> str:
    from chexficient.metrics.results import format_ci

    metrics = result["metrics"]
    lines = [
        f"### Segmentation: {result['dataset']} ({metrics['num_images']} test images, best epoch "
        f"{result['best_epoch']})",
        "",
        "| structure | Dice (95% CI) |",
        "|---|---|",
    ]
    lines += [f"| {c} | {format_ci(metrics['dice'][c])} |" for c in result["classes"]]
    lines.append(f"| **mean** | **{format_ci(metrics['mean_dice'])}** |")
    return "\n".join(lines)


# ----- command line ---------------------------------------------------------------------------------------------------


@dataclass
class SegmentationArguments(EvalArguments):
    num_levels: int = field(default=5, metadata={"help": "How many of the last encoder layers feed the decoder."})
    decoder_channels: str = field(default="256,128,64,32,16", metadata={"help": "Channels per decoder stage."})
    epochs: int = field(default=30, metadata={"help": "Decoder training epochs."})
    batch_size: int = field(default=8, metadata={"help": "Decoder training batch size."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    encode_batch_size: int = field(default=16, metadata={"help": "Images per encoder forward pass."})

    def __post_init__(self):
        self.channel_values = [int(v) for v in self.decoder_channels.split(",") if v.strip()]
        if len(self.channel_values) < self.num_levels:
            raise ValueError(f"--decoder_channels needs {self.num_levels} values (one per level).")
        self.channel_values = self.channel_values[: self.num_levels]


def run_segmentation(args: SegmentationArguments) -> dict[str, Any]:
    from eval.common import load_model_and_processor, publish_result
    from eval.datasets import load_segmentation

    data = load_segmentation(args.dataset, args.root)
    loaded = load_model_and_processor(args.model, device=args.device)
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    num_hidden_states = _num_layers(loaded) + 1
    num_levels = min(args.num_levels, num_hidden_states)
    if num_levels < args.num_levels:
        logger.warning("the encoder has %d hidden states; using %d levels", num_hidden_states, num_levels)
    splits = {}
    for split in ("train", "val", "test"):
        subset = data.subset(split)
        if len(subset) == 0:
            raise ValueError(f"{args.dataset} at {args.root}: the {split} split is empty.")
        splits[split] = encode_segmentation_split(
            loaded, subset, num_levels, batch_size=args.encode_batch_size, num_workers=args.num_workers
        )
    hidden_size = splits["train"].features.shape[2]
    decoder, history = train_segmentation_decoder(
        splits["train"],
        splits["val"],
        hidden_size=hidden_size,
        num_classes=len(data.classes),
        channels=args.channel_values[:num_levels],
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=loaded.device,
    )
    test = splits["test"]
    predictions = predict_masks(decoder, test.features, tuple(test.masks.shape[-2:]), device=loaded.device)
    metrics = evaluate_segmentation(
        predictions.numpy(), test.masks.numpy(), data.classes, num_resamples=args.num_resamples, seed=args.seed
    )
    result = {
        "task": "segmentation",
        "dataset": data.name,
        "model": args.model,
        "classes": list(data.classes),
        "num_levels": num_levels,
        "decoder_channels": args.channel_values[:num_levels],
        "num_train": int(len(splits["train"].indices)),
        "num_val": int(len(splits["val"].indices)),
        "best_epoch": int(np.argmax([h["val_mean_dice"] for h in history]) + 1),
        "history": history,
        "metrics": metrics,
        "skipped_files": [item for split in splits.values() for item in split.skipped],
    }
    return publish_result(result, markdown_table(result), args.out_dir, f"segmentation_{data.name}")


def _num_layers(loaded: Any) -> int:
    config = loaded.model.config.vision_config if loaded.is_chexficient else loaded.model.config
    return config.num_hidden_layers


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from eval.common import run_task_cli

    return run_task_cli(SegmentationArguments, run_segmentation, argv)


if __name__ == "__main__":
    main()
