"""Convert a reference CheXficient checkpoint into a Hugging Face folder: the Drive `.pth` (`{"model": state_dict,
"subset": ids, ...}`), or the authors' Hub layout (`model.safetensors`, possibly sharded, in a folder with their own
remote code and tokenizer files).

    python scripts/convert_original_checkpoint.py --checkpoint pytorch_model.pth --output chexficient-hf \
        [--config config.json] [--tokenizer path/to/Bio_ClinicalBERT]

The folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`: safetensors weights, config,
the remote-code files, the image processor (plus tokenizer and processor with `--tokenizer`) and the curated subset
ids as `curated_subset.json`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.subsets import curated_subset_record, write_curated_subset
from configuration_chexficient import CheXficientConfig
from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel


VISION_PREFIX = "image_encoder.model."
TEXT_PREFIX = "text_encoder.model."
# Training-only curation bookkeeping of the reference model; variable shapes, not needed for inference.
DROPPED_KEYS = frozenset(
    {
        "prototype_usage",
        "step_count",
        "batch_prototype_updates",
        "batch_update_weight_stats",
        "pending_ema_features",
        "pending_ema_similarities",
    }
)
# Checkpoints on disk use DINOv2's original HF names; newer transformers renames the attention in memory.
_IN_MEMORY_ALIASES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"encoder.layer.\1.norm\2.\3"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"encoder.layer.\1.mlp.\2.\3"),
    (r"^norm\.(weight|bias)$", r"layernorm.\1"),
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _safe_globals() -> list[Any]:
    """Numpy objects that reference checkpoints hold in their metadata (e.g. `best_acc` as numpy.float64)."""
    multiarray = getattr(np, "_core", np.core).multiarray
    names = [multiarray.scalar, np.dtype]
    names += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return names


def load_reference_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Load a reference `.pth` with `torch.load(weights_only=True)`; full unpickling only with `trust_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as error:
        if not trust_pickle:
            raise ValueError(
                f"{path}: torch.load(weights_only=True) refused this file ({error}).\n"
                "It holds Python objects beyond tensors. Loading it fully runs arbitrary code from the file: only do "
                "that for a checkpoint from a source you trust, by re-running with --trust-pickle."
            ) from error
        print(
            f"WARNING: loading {path} with full unpickling (--trust-pickle); this can execute code.", file=sys.stderr
        )
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}.")
    return dict(checkpoint)


def load_safetensors_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the authors' Hub layout: a `.safetensors` file, or a folder holding `model.safetensors` or a
    sharded `model.safetensors.index.json` (no pickle anywhere)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: no weight_map.")
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise ValueError(f"{index}: shard name {shard!r} is not a plain file name.")
            tensors.update(load_file(str(path / shard)))
        return tensors
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder.")


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """A reference checkpoint from any supported layout: a `.pth`/`.pt` file (weights-only unpickling), a
    `.safetensors` file or a folder in the authors' Hub layout."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return load_safetensors_checkpoint(path)
    return load_reference_checkpoint(path, trust_pickle=trust_pickle)


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove a prefix that wraps every key of the reference module (`module.` from DDP, or e.g. `model.` from a
    wrapper class in the Hub export), found from where `image_encoder.model.` starts; keys are returned as given when
    no single prefix wraps them all."""
    anchor = next((key for key in state_dict if VISION_PREFIX in key), None)
    if anchor is None:
        return dict(state_dict)
    prefix = anchor[: anchor.index(VISION_PREFIX)]
    if not prefix or not all(key.startswith(prefix) for key in state_dict):
        return dict(state_dict)
    return {key[len(prefix) :]: value for key, value in state_dict.items()}


def split_checkpoint(checkpoint: Mapping[str, Any], path: str | Path = "checkpoint") -> tuple[dict, list[int] | None]:
    """(state_dict, curated subset ids or None) from a reference checkpoint or a bare state dict."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state_dict = dict(checkpoint["model"])
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = dict(checkpoint)
    else:
        raise ValueError(f"{path}: no 'model' state dict found (top-level keys: {sorted(checkpoint)[:10]}).")
    subset = checkpoint.get("subset")
    if subset is not None:
        subset = sorted(int(i) for i in (subset.tolist() if isinstance(subset, torch.Tensor) else subset))
    return state_dict, subset


def convert_state_dict(reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference keys to `CheXficientModel` keys: split fused qkv, rename layerscale, norms and heads.

    Raises `ValueError` listing every key it does not know; curation bookkeeping buffers and the unused BERT pooler
    are dropped, prototypes are kept.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    names = dict(zip(strip_wrapper_prefix({k: k for k in reference}), reference))  # stripped key -> original key
    for key, original_key in names.items():
        tensor = reference[original_key]
        if key in DROPPED_KEYS:
            continue
        if key.startswith(VISION_PREFIX):
            name = key[len(VISION_PREFIX) :]
            if name == "register_tokens":
                raise ValueError(
                    f"{original_key}: the checkpoint has register tokens, but CheXficient's image tower has none "
                    "(the released model runs DINOv2 without registers)."
                )
            qkv = _QKV.match(name)
            if qkv:
                layer, kind = qkv.groups()
                for part, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                    converted[f"vision_model.encoder.layer.{layer}.attention.attention.{part}.{kind}"] = chunk.clone()
                continue
            for pattern, replacement in _VISION_RENAMES:
                if re.match(pattern, name):
                    converted["vision_model." + re.sub(pattern, replacement, name)] = tensor
                    break
            else:
                unknown.append(original_key)
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX) :]
            if name.startswith("pooler.") or name.endswith("position_ids") or name.endswith("token_type_ids"):
                continue  # the pooler is unused (features pool [SEP]); the id buffers are rebuilt
            converted["text_model." + name] = tensor
        elif key.startswith("image_projection.projection."):
            converted["visual_projection." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("text_projection.projection."):
            converted["text_projection." + key.rsplit(".", 1)[1]] = tensor
        elif key == "logit_scale":
            converted["logit_scale"] = tensor.reshape(1).float()
        elif key == "prototypes":
            converted["prototypes"] = tensor.detach()
        else:
            unknown.append(original_key)
    if unknown:
        raise ValueError(f"unknown keys in the reference checkpoint ({len(unknown)}): {unknown[:20]}")
    return converted


def build_model(reference: Mapping[str, torch.Tensor], config: CheXficientConfig) -> CheXficientModel:
    """A `CheXficientModel` carrying the reference weights; refuses missing, extra or mis-shaped tensors."""
    model = CheXficientModel(config).eval()
    expected = model.state_dict()
    state_dict = {}
    for key, tensor in convert_state_dict(reference).items():
        if key not in expected and key.startswith("vision_model."):
            for old, new in _IN_MEMORY_ALIASES.items():
                key = key.replace(old, new)
        state_dict[key] = tensor
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {missing[:20]}")
    if unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {unexpected[:20]}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched[:20]}")
    if problems:
        raise ValueError(
            "the checkpoint does not fit the configuration (pass --config for a non-released architecture):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
    return model


def load_config(path: str | Path | None) -> CheXficientConfig:
    """`CheXficientConfig` from a JSON with nested vision_config/text_config, or the released architecture."""
    if path is None:
        return CheXficientConfig()
    with open(path) as handle:
        values = json.load(handle)
    values.pop("model_type", None)
    return CheXficientConfig(**values)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt"))


def write_subset(output: Path, subset: list[int] | None, source: str) -> Path | None:
    """Write the checkpoint's curated subset (indices into the training list it was curated from) beside the model."""
    if subset is None:
        return None
    return write_curated_subset(output, curated_subset_record(subset, source=source))


def convert(
    checkpoint: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    trust_pickle: bool = False,
) -> CheXficientModel:
    """Convert `checkpoint` and write the Hugging Face folder `output`; returns the converted model."""
    output = Path(output)
    raw = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    reference, subset = split_checkpoint(raw, checkpoint)
    if tokenizer is None and Path(checkpoint).is_dir() and _has_tokenizer(Path(checkpoint)):
        tokenizer = checkpoint  # the authors' Hub folder ships Bio_ClinicalBERT's tokenizer files
    model_config = load_config(config)
    model = build_model(reference, model_config)

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    size = model_config.vision_config.image_size
    image_processor = CheXficientImageProcessor(size={"shortest_edge": size})
    image_processor.save_pretrained(output)
    if tokenizer is not None:
        from processing_chexficient import CheXficientProcessor, load_tokenizer

        text_tokenizer = load_tokenizer(tokenizer)
        text_tokenizer.model_max_length = model_config.text_config.max_position_embeddings
        CheXficientProcessor(image_processor=image_processor, tokenizer=text_tokenizer).save_pretrained(output)
    write_subset(output, subset, Path(checkpoint).name)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="reference .pth with keys 'model' (and 'subset'), or the authors' model.safetensors or Hub folder",
    )
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--config", help="JSON with vision_config/text_config (Dinov2Config/BertConfig names)")
    parser.add_argument(
        "--tokenizer",
        help="local tokenizer folder (e.g. Bio_ClinicalBERT) to ship with the model (default: the checkpoint folder's)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling when weights_only loading refuses the file (runs code from it)",
    )
    args = parser.parse_args(argv)
    try:
        model = convert(args.checkpoint, args.output, args.config, args.tokenizer, args.trust_pickle)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output} ({params:,} parameters)")


if __name__ == "__main__":
    main()
