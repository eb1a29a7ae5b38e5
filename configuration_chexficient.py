"""CheXficient configuration: a DINOv2 image tower and a BERT text tower joined by CLIP projections."""

from __future__ import annotations

import math
from typing import Any

from transformers import BertConfig, Dinov2Config, PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The released model: DINOv2 ViT-B/14 run at 378 px without register tokens (27 x 27 patches + CLS).
RELEASED_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 378,
    "num_channels": 3,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "use_swiglu_ffn": False,
    "drop_path_rate": 0.0,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

# The released model: Bio_ClinicalBERT (a cased BERT-base vocabulary of 28,996 tokens).
RELEASED_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 28996,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "pad_token_id": 0,
}


def _build_sub_config(value: dict | PretrainedConfig | None, config_class: type, defaults: dict, name: str):
    """Turn a dict, a config object or None into a `config_class` instance (None gives the released tower)."""
    if value is None:
        return config_class(**defaults)
    if isinstance(value, config_class):
        return value
    if isinstance(value, PretrainedConfig):
        return config_class(**value.to_dict())
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")}
        return config_class(**{**defaults, **value})
    raise TypeError(f"`{name}` must be a dict or a {config_class.__name__}, got {type(value).__name__}.")


def _validate(config: CheXficientConfig) -> None:
    vision, text = config.vision_config, config.text_config
    image_size, patch_size = vision.image_size, vision.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(
            f"vision_config.image_size and patch_size must be integers (square inputs), got {image_size!r} and "
            f"{patch_size!r}."
        )
    if image_size % patch_size != 0:
        raise ValueError(
            f"vision_config.image_size ({image_size}) must be a multiple of vision_config.patch_size ({patch_size})."
        )
    for name, tower in (("vision_config", vision), ("text_config", text)):
        if tower.hidden_size % tower.num_attention_heads != 0:
            raise ValueError(
                f"{name}.hidden_size ({tower.hidden_size}) must be divisible by {name}.num_attention_heads "
                f"({tower.num_attention_heads})."
            )
    if not isinstance(config.projection_dim, int) or config.projection_dim <= 0:
        raise ValueError(f"projection_dim must be a positive integer, got {config.projection_dim!r}.")
    if not isinstance(config.num_prototypes, int) or config.num_prototypes <= 0:
        raise ValueError(f"num_prototypes must be a positive integer, got {config.num_prototypes!r}.")
    if not math.isfinite(config.logit_scale_init_value):
        raise ValueError(f"logit_scale_init_value must be finite, got {config.logit_scale_init_value!r}.")


class CheXficientConfig(PretrainedConfig):
    r"""
    Configuration of a [`CheXficientModel`]. The defaults build the released CheXficient architecture.

    Args:
        vision_config (`dict` or `Dinov2Config`, *optional*):
            The image tower, in `Dinov2Config` field names (`hidden_size`, `num_hidden_layers`, `num_attention_heads`,
            `mlp_ratio`, `patch_size`, `image_size`, `layerscale_value`, `layer_norm_eps`, `qkv_bias`, `hidden_act`).
            Defaults to ViT-B/14 at 378 px without register tokens. Fields a dict leaves out take the released values.
        text_config (`dict` or `BertConfig`, *optional*):
            The text tower, in `BertConfig` field names. Defaults to Bio_ClinicalBERT (vocab 28996, 12 layers, 768).
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the shared image-text embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 4.6052):
            Initial log of the contrastive temperature scale: log(1 / 0.01) = log(100).
        num_prototypes (`int`, *optional*, defaults to 6):
            Number of curation prototypes, stored in the model as a `[num_prototypes, 2 * projection_dim]` buffer.

    Example:

    ```python
    >>> from configuration_chexficient import CheXficientConfig
    >>> from modeling_chexficient import CheXficientModel

    >>> config = CheXficientConfig()  # the released architecture
    >>> tiny = CheXficientConfig(
    ...     vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28},
    ...     text_config={"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                  "intermediate_size": 37},
    ...     projection_dim=16,
    ... )
    >>> model = CheXficientModel(tiny)
    ```"""

    model_type = "chexficient"
    sub_configs = {"vision_config": Dinov2Config, "text_config": BertConfig}

    def __init__(
        self,
        vision_config: dict | Dinov2Config | None = None,
        text_config: dict | BertConfig | None = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = math.log(100.0),
        num_prototypes: int = 6,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vision_config = _build_sub_config(vision_config, Dinov2Config, RELEASED_VISION_CONFIG, "vision_config")
        self.text_config = _build_sub_config(text_config, BertConfig, RELEASED_TEXT_CONFIG, "text_config")
        self.projection_dim = projection_dim
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.num_prototypes = num_prototypes
        self.initializer_range = initializer_range
        # The text tower's tokenizer family: transformers < 4.57's `pipeline()` loads a tokenizer only for configs that
        # name one (or that its tables know).
        kwargs.setdefault("tokenizer_class", "BertTokenizer")
        super().__init__(**kwargs)
        _validate(self)

    @property
    def prototype_dim(self) -> int:
        """Width of a prototype: the concatenated [image ; text] embedding."""
        return 2 * self.projection_dim


CheXficientConfig.register_for_auto_class()

__all__ = ["CheXficientConfig", "RELEASED_TEXT_CONFIG", "RELEASED_VISION_CONFIG"]
