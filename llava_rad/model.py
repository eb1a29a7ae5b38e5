"""LLaVA-Rad on the frozen CheXficient image encoder, as a stock transformers `LlavaForConditionalGeneration`.

The vision tower is transformers' `Dinov2Model` holding CheXficient's image-encoder weights; LLaVA-Rad's feature
path (`mm_vision_select_layer -2`, `mm_vision_select_feature patch`) is `vision_feature_layer=-2` with the
"default" strategy (CLS dropped): 27 x 27 = 729 patch tokens at 378 px. The projector is LLaVA's `mlp2x_gelu`,
which is exactly `LlavaMultiModalProjector` (768 -> 4096 -> 4096, exact GELU). The language model is any
Llama-family causal LM (Vicuna-7B v1.5 by default). Nothing here needs remote code or a LLaVA fork.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Dinov2Model,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_rad.prompt import IMAGE_TOKEN, VICUNA_V1_CHAT_TEMPLATE

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientVisionModel


DEFAULT_LANGUAGE_MODEL = "lmsys/vicuna-7b-v1.5"
# LoRA on the language model's attention and MLP projections only (LLaVA-Rad's `find_all_linear_names` minus the
# vision and projector linears, which do not exist yet when LLaVA-Rad applies LoRA). PEFT full-matches a string.
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_NAME = "multi_modal_projector"
PROJECTOR_FILENAME = "projector.safetensors"
RUN_INFO_FILENAME = "llava_rad.json"
# The preprocessing settings an exported processor carries (the CheXficient and the stock Llava processor alike).
IMAGE_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


@dataclass
class LlavaRadSources:
    """Where a LLaVA-Rad model's parts come from; saved next to every stage's output as `llava_rad.json`."""

    chexficient: str
    language_model: str = DEFAULT_LANGUAGE_MODEL
    tokenizer: str | None = None
    image_size: int | None = None

    def save(self, folder: str | os.PathLike, **extra: Any) -> None:
        data = {**self.__dict__, **extra}
        Path(folder, RUN_INFO_FILENAME).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> tuple[LlavaRadSources, dict[str, Any]]:
        path = Path(folder, RUN_INFO_FILENAME)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {folder} a llava_rad/train.py output folder?")
        data = json.loads(path.read_text())
        fields = {k: data.pop(k) for k in list(data) if k in cls.__dataclass_fields__}
        if "chexficient" not in fields:
            raise ValueError(f"{path}: missing field 'chexficient'.")
        return cls(**fields), data


def num_image_tokens(image_processor: Any, patch_size: int, strategy: str = "default") -> int:
    """Image placeholder tokens per image: (crop_h / patch) * (crop_w / patch), plus CLS unless "default" drops it."""
    crop = image_processor.crop_size
    height, width = crop["height"], crop["width"]
    if height % patch_size or width % patch_size:
        raise ValueError(f"crop size {height}x{width} is not a multiple of the patch size {patch_size}.")
    return (height // patch_size) * (width // patch_size) + (0 if strategy == "default" else 1)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the `<image>` special token (LLaVA-Rad's sentinel; id = old vocab size) and a pad token (= unk, as Vicuna)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise ValueError("the tokenizer has neither a pad nor an unk token; set `tokenizer.pad_token` first.")
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerBase, image_processor: Any, patch_size: int, strategy: str = "default"
) -> LlavaProcessor:
    """`LlavaProcessor` that expands each `<image>` to the tower's patch-token count and knows the Vicuna v1 template."""
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=prepare_tokenizer(tokenizer),
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy drops again
    )


def load_chexficient_tower(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Dinov2Model:
    """CheXficient's image encoder (a `Dinov2Model`) from a saved CheXficient folder; the text tower is not loaded."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--chexficient {path}: not a folder holding a saved CheXficient model.")
    return CheXficientVisionModel.from_pretrained(path, dtype=dtype or torch.float32).vision_model


def assemble_llava(
    vision_tower: Dinov2Model,
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    image_seq_length: int,
) -> LlavaForConditionalGeneration:
    """Put an image tower, a fresh `mlp2x_gelu` projector and a causal LM into one `LlavaForConditionalGeneration`.

    The tower and the LM are moved in as they are (no copy); the skeleton is built on the meta device, so a 7B LM is
    never allocated twice. The embeddings grow by one row for `<image>` (its row is never read: image features
    replace it).
    """
    tokenizer = prepare_tokenizer(tokenizer)
    config = LlavaConfig(
        vision_config=vision_tower.config,
        text_config=language_model.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    base = getattr(language_model, language_model.base_model_prefix, None)
    if base is None or not isinstance(base, type(model.model.language_model)):
        raise TypeError(
            f"{type(language_model).__name__} does not fit LLaVA: expected a causal LM whose "
            f"`{language_model.base_model_prefix}` is a {type(model.model.language_model).__name__}."
        )
    dtype = language_model.dtype
    model.model.vision_tower = vision_tower
    model.model.language_model = base
    model.lm_head = language_model.get_output_embeddings()
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)  # nn.Linear's default init
    model.config.pad_token_id = tokenizer.pad_token_id
    leftover = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [config.image_token_index]  # never emit a bare image placeholder
    return model


def build_llava_rad(
    sources: LlavaRadSources,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained LLaVA-Rad: CheXficient tower + fresh projector + pretrained LM, and its processor.

    `sources.image_size` overrides the processor's crop (default: the CheXficient config's image_size, 378 for the
    released model, whose position table then needs no interpolation).
    """
    tower = load_chexficient_tower(sources.chexficient, dtype)
    vision = tower.config
    image_size = sources.image_size or vision.image_size
    image_processor = CheXficientImageProcessor(size={"shortest_edge": image_size})
    tokenizer = AutoTokenizer.from_pretrained(sources.tokenizer or sources.language_model)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    language_model = AutoModelForCausalLM.from_pretrained(sources.language_model, **kwargs)
    processor = build_processor(tokenizer, image_processor, vision.patch_size)
    model = assemble_llava(
        tower, language_model, processor.tokenizer, num_image_tokens(image_processor, vision.patch_size)
    )
    return model, processor


def projector(model: nn.Module) -> nn.Module:
    """The multimodal projector of a LLaVA model, a PEFT-wrapped one included (its trained copy under PEFT)."""
    for name, module in model.named_modules():
        if name.endswith(PROJECTOR_NAME):
            return module
    raise ValueError(f"{type(model).__name__} has no {PROJECTOR_NAME}.")


def projector_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's entries of a LLaVA model's state dict (PEFT-wrapped or not, any key prefix), keyed
    linear_1.weight, ...: PEFT's trained copy (`modules_to_save.default`), never its frozen `original_module`."""
    marker = f"{PROJECTOR_NAME}."
    state = {}
    for key, value in state_dict.items():
        if marker not in key or "original_module" in key:
            continue
        name = key.split(marker, 1)[1]
        state[name.split("modules_to_save.default.")[-1]] = value
    return state


def save_projector(
    model: nn.Module, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Save the projector as safetensors with keys linear_1.weight, ... (PEFT's copy when wrapped).

    `state_dict` (the model's, or only its trained tensors, e.g. gathered from ZeRO-3 partitions by
    `gather_trainable_state`) is saved instead of the module's own tensors, which ZeRO-3 leaves empty.
    """
    if state_dict is None:
        state = {k.split("modules_to_save.default.")[-1]: v for k, v in projector(model).state_dict().items()}
        state = {k: v for k, v in state.items() if "original_module" not in k}
    else:
        state = projector_state(state_dict)
    expected = {k: tuple(v.shape) for k, v in projector_state(dict(model.named_parameters())).items()}
    if state_dict is not None and set(state) != set(expected):
        raise ValueError(f"projector tensors {sorted(state)} do not match the model's {sorted(expected)}.")
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(
            f"projector tensors {empty} are empty: partitioned by DeepSpeed ZeRO-3? Gather them first "
            "(`gather_trainable_state`)."
        )
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def is_partitioned(parameter: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 has partitioned across processes (its data is a shard)."""
    return hasattr(parameter, "ds_id")


def gather_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full tensors of `model`'s trainable parameters (the projector, LoRA), keyed by parameter name, on the CPU.

    Under DeepSpeed ZeRO-3 each process holds a shard of every parameter: they are gathered here
    (`deepspeed.zero.GatheredParameters`, a collective: call it on every process). Only the trained tensors are
    gathered, never the frozen 7B, so no process needs the whole model in memory.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if is_partitioned(p)]
    if not partitioned:
        return {name: p.detach().cpu().clone() for name, p in named}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {name: p.detach().cpu().clone() for name, p in named}


def load_projector(model: LlavaForConditionalGeneration, path: str | os.PathLike) -> None:
    """Load projector weights saved by `save_projector` (e.g. from the stage-1 folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no projector weights (expected the stage-1 {PROJECTOR_FILENAME}).")
    module = model.model.multi_modal_projector
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: projector keys do not match (missing {missing}, unexpected {unexpected}).")


@torch.no_grad()
def vision_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen tower's selected features [B, N, H] before the projector, exactly as `get_image_features` picks
    them (`vision_feature_layer`, CLS dropped by the "default" strategy): what the feature store holds."""
    config = model.config
    tower = model.model.vision_tower
    layers = config.vision_feature_layer
    outputs = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
    picked = [outputs.hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
    if config.vision_feature_select_strategy == "default":
        picked = [h[:, 1:] for h in picked]
    return torch.cat(picked, dim=-1)


def freeze_for_alignment(model: LlavaForConditionalGeneration) -> None:
    """Stage 1: only the projector trains; tower and LM are frozen (the tower also in eval mode)."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.vision_tower.eval()


def apply_lora(
    model: LlavaForConditionalGeneration, r: int = 64, alpha: int = 128, dropout: float = 0.05
) -> torch.nn.Module:
    """Stage 2: LoRA on the LM's q/k/v/o/gate/up/down, the projector fully trained (PEFT `modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=[PROJECTOR_NAME],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    return peft_model


__all__ = [
    "DEFAULT_LANGUAGE_MODEL",
    "IMAGE_PROCESSOR_FIELDS",
    "LORA_TARGET_MODULES",
    "LlavaRadSources",
    "apply_lora",
    "assemble_llava",
    "build_llava_rad",
    "build_processor",
    "freeze_for_alignment",
    "gather_trainable_state",
    "is_partitioned",
    "load_chexficient_tower",
    "load_projector",
    "num_image_tokens",
    "prepare_tokenizer",
    "projector",
    "projector_state",
    "save_projector",
    "vision_features",
]
