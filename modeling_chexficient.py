"""CheXficient: a chest X-ray CLIP of a DINOv2 image tower and a BERT text tower (Wang et al., arXiv 2602.22843).

The towers are transformers' own `Dinov2Model` and `BertModel`; this file adds the linear projections, the learnable
temperature, the curation prototypes, the contrastive loss and the zero-shot protocol of the released model.

Importing it registers `CheXficientModel` with `AutoModelForZeroShotImageClassification` (`AutoModelForX.register`,
transformers' supported way to map a custom config to a model class). `pipeline("zero-shot-image-classification")`
checks the model's class against that Auto class's table and logs "not supported" for any other class; loading a
folder by name with `trust_remote_code=True` registers the class already (the folder's `auto_map` names it), but a
model object handed to the pipeline (loaded with `AutoModel`, or from this file) is only known through this call.
"""

from __future__ import annotations

import importlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForZeroShotImageClassification,
    BertModel,
    Dinov2Model,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput, logging


try:
    from transformers import initialization as init
except ImportError:  # transformers < 5 has no flag-aware init helpers
    init = nn.init

# transformers < 5 copies only the direct relative imports of a local folder's entry file into its module cache, so
# this file names every sibling it needs, the image processor's decoding included.
try:
    from .configuration_chexficient import CheXficientConfig
    from .image_decoding_chexficient import load_image as load_image
    from .image_processing_chexficient import CheXficientImageProcessor
except ImportError:
    # a top-level module (a checkout, the wheel): imported by name, which transformers < 4.52's scanner of remote
    # code (a regex that keeps `except` bodies) would take for a package to install
    CheXficientConfig = importlib.import_module("configuration_chexficient").CheXficientConfig
    load_image = importlib.import_module("image_decoding_chexficient").load_image
    CheXficientImageProcessor = importlib.import_module("image_processing_chexficient").CheXficientImageProcessor


logger = logging.get_logger(__name__)

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Auto classes a saved folder maps to this file's models (the zero-shot pipeline uses the second).
_AUTO_CLASSES = {
    "AutoModel": "CheXficientModel",
    "AutoModelForZeroShotImageClassification": "CheXficientModel",
    "AutoModelForImageClassification": "CheXficientForImageClassification",
}

NO_FINDING_LABELS = frozenset({"no finding", "no findings", "normal"})
# The CheXpert 14 observations, in the reference code's order: the findings the released model is evaluated on.
CHEXPERT_LABELS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
PromptTemplates = tuple[tuple[str, str], ...]
# What templated prompts say for "No Finding" (a negated template would read "There is no no finding."): report
# sentences of a normal study against an abnormal one.
NO_FINDING_REPORT_PROMPTS: PromptTemplates = (
    ("No acute cardiopulmonary process.", "There is an acute cardiopulmonary process."),
    ("Normal chest radiograph.", "Abnormal chest radiograph."),
    ("The lungs are clear.", "The lungs are not clear."),
)
# Zero-shot prompt presets: (positive, negative) template pairs; `{c}` is the label as written, `{c_lower}` lower-cased.
# "paper" is the released model's protocol; "report" is an ensemble in the style of report sentences, whose text
# embeddings are averaged (an option beyond the paper, robust where a small text tower misreads bare labels).
ZERO_SHOT_PROMPTS: dict[str, PromptTemplates] = {
    "paper": (("{c}", "no {c}"),),
    "report": (
        ("There is {c_lower}.", "There is no {c_lower}."),
        ("{c} is present.", "No {c_lower}."),
        ("Findings consistent with {c_lower}.", "No evidence of {c_lower}."),
    ),
}


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` [N, N] against its diagonal partner."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a [N, N] text-image similarity matrix whose matching pairs lie on the diagonal."""
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_text.t())) / 2.0


def resolve_prompt_templates(prompts: str | Sequence[Sequence[str]] = "paper") -> PromptTemplates:
    """A preset name of `ZERO_SHOT_PROMPTS` or a sequence of (positive, negative) templates, validated."""
    if isinstance(prompts, str):
        if prompts not in ZERO_SHOT_PROMPTS:
            raise ValueError(f"unknown prompt preset {prompts!r}; presets are {sorted(ZERO_SHOT_PROMPTS)}.")
        return ZERO_SHOT_PROMPTS[prompts]
    templates = tuple((str(pair[0]), str(pair[1])) for pair in prompts if len(pair) == 2)
    if not templates or len(templates) != len(prompts):
        raise ValueError("prompts must be a preset name or a non-empty sequence of (positive, negative) templates.")
    return templates


def zero_shot_prompts(label: str, prompts: str | Sequence[Sequence[str]] = "paper") -> list[tuple[str, str]]:
    """The (positive, negative) prompt pairs of one finding, one pair per template.

    The paper's templates give "{label}" and "no {label}"; "No Finding" has no sensible negation, so its negative
    prompt is then "there is Finding", as in the reference code. Other templates would read "There is no no
    finding.": "No Finding" takes `NO_FINDING_REPORT_PROMPTS` instead, one pair per template.
    """
    templates = resolve_prompt_templates(prompts)
    no_finding = label.strip().lower() in NO_FINDING_LABELS
    if templates == ZERO_SHOT_PROMPTS["paper"]:
        return [(label, "there is Finding")] if no_finding else [(label, f"no {label}")]
    if no_finding:
        return [NO_FINDING_REPORT_PROMPTS[i % len(NO_FINDING_REPORT_PROMPTS)] for i in range(len(templates))]
    return [
        (pos.format(c=label, c_lower=label.lower()), neg.format(c=label, c_lower=label.lower()))
        for pos, neg in templates
    ]


def zero_shot_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """p(finding) [B, C]: a softmax over the raw cosines of each image [B, D] with the positive and negative prompt
    embeddings [C, 2, D] of each finding (no temperature), as the released model scores findings."""
    cosine = torch.einsum("bd,ckd->bck", image_embeds.float(), text_embeds.to(image_embeds.device).float())
    return cosine.softmax(dim=-1)[..., 0]


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of the last non-padding token of each sequence ([SEP] for BERT).

    `hidden_states` [B, L, H], `attention_mask` [B, L] -> [B, H]. Equals indexing at `attention_mask.sum(-1) - 1`
    for right padding, and stays right for left padding too.
    """
    batch_size, seq_len = hidden_states.shape[:2]
    if attention_mask is None:
        index = torch.full((batch_size,), seq_len - 1, device=hidden_states.device, dtype=torch.long)
    else:
        positions = torch.arange(seq_len, device=hidden_states.device)
        index = (attention_mask.to(torch.long) * positions).argmax(dim=-1)  # [B]
    return hidden_states[torch.arange(batch_size, device=hidden_states.device), index]


def _tower_kwargs(output_attentions: bool | None, output_hidden_states: bool | None) -> dict[str, bool]:
    """The output flags a tower is called with: only those given, so that the tower's config decides the others."""
    flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
    return {k: v for k, v in flags.items() if v is not None}


def _features_output(
    embeds: torch.Tensor, tower_outputs: Any, return_dict: bool | None
) -> torch.Tensor | BaseModelOutputWithPooling:
    """What `get_image_features` / `get_text_features` return: the normalised `embeds` unless `return_dict` is
    explicitly True, then the tower's states with `embeds` as `pooler_output` (never switched by the config)."""
    if return_dict is not True:
        return embeds
    return BaseModelOutputWithPooling(
        last_hidden_state=tower_outputs.last_hidden_state,
        pooler_output=embeds,
        hidden_states=tower_outputs.hidden_states,
        attentions=tower_outputs.attentions,
    )


@dataclass
class CheXficientOutput(ModelOutput):
    """
    Output of [`CheXficientModel`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True`):
            Symmetric InfoNCE loss, with the temperature scale clamped at 100 as in CLIP.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities, `exp(logit_scale) * image_embeds @ text_embeds.T`.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised text embeddings.
        vision_model_output (`BaseModelOutputWithPooling`):
            Output of the `Dinov2Model` image tower.
        text_model_output (`BaseModelOutputWithPooling`):
            Output of the `BertModel` text tower.
        logit_scale (`torch.FloatTensor` of shape `(1,)`):
            The stored log temperature scale, returned so that losses computed outside the model (over embeddings
            gathered across processes) need not reach into partitioned parameters.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    logit_scale: torch.FloatTensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("vision_model_output", "text_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


@dataclass
class CheXficientVisionOutput(ModelOutput):
    """
    Output of [`CheXficientVisionModel`].

    Args:
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised projected image embeddings (the CLIP space).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, hidden_size)`):
            Final-LayerNorm hidden states of the image tower (CLS first).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The CLS token after the final LayerNorm.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Per-layer hidden states, returned with `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Per-layer attention maps, returned with `output_attentions=True` (eager attention only).
    """

    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class CheXficientPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the CheXficient models."""

    config_class = CheXficientConfig
    base_model_prefix = "chexficient"
    main_input_name = "pixel_values"  # the first argument of `forward`; `CheXficientModel` sets "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Dinov2Layer", "BertLayer", "Dinov2Embeddings", "BertEmbeddings"]

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, with every Auto class of a CheXficient folder in `config.auto_map`, so
        that `AutoModel`, `AutoModelForZeroShotImageClassification` (the zero-shot pipeline) and
        `AutoModelForImageClassification` load the folder, whichever class saved it."""
        module = type(self).__module__.split(".")[-1]  # "modeling_chexficient", also for a Hub copy
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class, class_name in _AUTO_CLASSES.items():
            auto_map.setdefault(auto_class, f"{module}.{class_name}")
        self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if type(self)._auto_class is None:  # an unregistered class (the vision model) still ships the code it needs
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(self, save_directory)
        return result

    def get_input_embeddings(self) -> nn.Module:
        """The image tower's patch embedding (as CLIPVisionModel's): an image model has no token
        embeddings (`CheXficientModel` returns its text tower's instead)."""
        return self.vision_model.embeddings.patch_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vision_model.embeddings.patch_embeddings = value

    def _freeze_mask_token(self) -> None:
        """Freeze the image tower's `mask_token`: `Dinov2Model` builds it for masked-image modelling
        (`bool_masked_pos`), which no CheXficient forward takes, so it never gets a gradient, and a trainable parameter
        without one stops `DistributedDataParallel` (unused parameters) and any check that every weight learns.

        It is frozen rather than dropped (`Dinov2Config(use_mask_token=False)`): that option only exists in recent
        transformers (not in 4.46), and without the parameter the state dict loses `embeddings.mask_token`, which the
        released checkpoint and the converter (`chexficient/hub/convert.py`, strict key match) carry. A frozen tensor
        keeps every checkpoint loading on transformers 4.46 to 5.x. It is frozen at construction and again by
        `train()`, as transformers 5 hands loaded weights back as new, trainable parameters (`from_pretrained` ends
        with `eval()`)."""
        vision_model = getattr(self, "vision_model", None)
        mask_token = getattr(getattr(vision_model, "embeddings", None), "mask_token", None)
        if isinstance(mask_token, nn.Parameter):
            mask_token.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_mask_token()
        return self

    def post_init(self) -> None:
        super().post_init()
        self._freeze_mask_token()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise CheXficient's own modules; the towers initialise themselves as transformers sub-models."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, CheXficientModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.zeros_(module.prototypes)


class CheXficientModel(CheXficientPreTrainedModel):
    """The CheXficient CLIP model: image and text towers, projections, temperature and curation prototypes."""

    main_input_name = "input_ids"  # `forward`'s first argument, as CLIPModel's
    zero_shot_cache_size = 32  # prompt-embedding sets kept by `get_zero_shot_text_embeds` (least recently used out)
    zero_shot_default_labels = CHEXPERT_LABELS

    def __init__(self, config: CheXficientConfig):
        super().__init__(config)
        self.vision_model = Dinov2Model(config.vision_config)
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=True)
        # 1-d (not 0-d) so that DeepSpeed ZeRO can partition it across processes.
        self.logit_scale = nn.Parameter(torch.full((1,), config.logit_scale_init_value))
        # Prototypes live in the space of the L2-normalised [image ; text] concatenation. Curation updates them by
        # k-means and EMA, never by gradient, so they are a buffer; zeros until a curator initialises them.
        self.register_buffer("prototypes", torch.zeros(config.num_prototypes, config.prototype_dim), persistent=True)
        self._zero_shot_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.post_init()

    def train(self, mode: bool = True) -> CheXficientModel:
        self.clear_zero_shot_cache()  # cached text embeddings go stale once weights move
        return super().train(mode)

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's word embeddings (as CLIPModel's `text_model`): `resize_token_embeddings` resizes them and
        sets `config.text_config.vocab_size`."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> torch.FloatTensor | BaseModelOutputWithPooling:
        """L2-normalised image embeddings [B, projection_dim] from `pixel_values` [B, 3, H, W].

        By default (`return_dict` None or False) the embedding tensor itself, whatever `config.return_dict` says:
        the contract of transformers 4.x's CLIP, which this library and its users rely on, kept identical on every
        transformers version. With an explicit `return_dict=True`, a `BaseModelOutputWithPooling` (the type of
        transformers 5's CLIP) whose `last_hidden_state`, `hidden_states` and `attentions` are the image tower's
        (`output_hidden_states` / `output_attentions` ask for the latter two) and whose `pooler_output` is the same
        L2-normalised, projected embedding (unlike v5 CLIP's unnormalised projection). Other keyword arguments are
        accepted for signature compatibility and ignored.
        """
        outputs = self.vision_model(
            pixel_values=pixel_values, return_dict=True, **_tower_kwargs(output_attentions, output_hidden_states)
        )
        image_embeds = F.normalize(self.visual_projection(outputs.pooler_output), dim=-1)  # pooled: CLS after LN
        return _features_output(image_embeds, outputs, return_dict)

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> torch.FloatTensor | BaseModelOutputWithPooling:
        """L2-normalised text embeddings [B, projection_dim], pooled at the last non-padding token ([SEP]).

        As `get_image_features`: the tensor by default (`config.return_dict` does not change it), and with an
        explicit `return_dict=True` a `BaseModelOutputWithPooling` of the text tower's states whose `pooler_output`
        is that normalised embedding.
        """
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
            **_tower_kwargs(output_attentions, output_hidden_states),
        )
        text_embeds = F.normalize(
            self.text_projection(last_token_pool(outputs.last_hidden_state, attention_mask)), dim=-1
        )
        return _features_output(text_embeds, outputs, return_dict)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CheXficientOutput | tuple:
        """Embed a batch of images and reports and score every image against every report.

        The loss (with `return_loss=True`) is the single-process symmetric InfoNCE; distributed training gathers
        embeddings across processes first (`curated_clip_loss` in the project's `chexficient/curation/loss.py`).
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("CheXficientModel.forward needs both `input_ids` and `pixel_values`.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        tower_kwargs = _tower_kwargs(output_attentions, output_hidden_states)

        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
        text_outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
            **tower_kwargs,
        )
        image_embeds = F.normalize(self.visual_projection(vision_outputs.pooler_output), dim=-1)  # [B, D]
        text_embeds = F.normalize(
            self.text_projection(last_token_pool(text_outputs.last_hidden_state, attention_mask)), dim=-1
        )  # [B, D]

        cosine = text_embeds @ image_embeds.t()  # [B_text, B_image]
        logits_per_text = cosine * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()

        loss = None
        if return_loss:
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's clamp, for training only
            loss = clip_loss(cosine * scale)

        output = CheXficientOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            vision_model_output=vision_outputs,
            text_model_output=text_outputs,
            logit_scale=self.logit_scale,
        )
        # a plain tuple, the towers' outputs as tuples too (as CLIP's), the loss first when there is one
        return output if return_dict else output.to_tuple()

    # ----- zero-shot classification (the paper's protocol, or prompt ensembles) ------------------------------------

    def clear_zero_shot_cache(self) -> None:
        """Forget cached prompt embeddings (done automatically on `train()`/`eval()`)."""
        self._zero_shot_cache.clear()

    @torch.no_grad()
    def get_zero_shot_text_embeds(
        self,
        labels: Sequence[str],
        tokenizer: Callable[..., Any],
        prompts: str | Sequence[Sequence[str]] = "paper",
        max_length: int = 256,
        batch_size: int = 256,
    ) -> torch.FloatTensor:
        """Prompt embeddings [C, 2, projection_dim] (positive, negative) of each label, averaged over the templates
        of `prompts` and re-normalised. The last `zero_shot_cache_size` label sets are cached (least recently used
        goes first)."""
        labels = tuple(labels)
        if not labels:
            raise ValueError("zero-shot classification needs at least one label.")
        templates = resolve_prompt_templates(prompts)
        key = (labels, templates, id(tokenizer), max_length, self.device, self.dtype)
        cached = self._zero_shot_cache.get(key)
        if cached is not None:
            self._zero_shot_cache.move_to_end(key)
            return cached
        pairs = [zero_shot_prompts(label, templates) for label in labels]
        texts = [prompt for label_pairs in pairs for pair in label_pairs for prompt in pair]  # C x T x 2
        embeds = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in _TEXT_INPUTS}
            embeds.append(self.get_text_features(**tokens))
        embeds = torch.cat(embeds).view(len(labels), len(templates), 2, -1).mean(dim=1)
        embeds = F.normalize(embeds, dim=-1)  # [C, 2, D]
        self._zero_shot_cache[key] = embeds
        while len(self._zero_shot_cache) > self.zero_shot_cache_size:
            self._zero_shot_cache.popitem(last=False)
        return embeds

    @torch.no_grad()
    def zero_shot_classify(
        self,
        labels: Sequence[str],
        tokenizer: Callable[..., Any],
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        prompts: str | Sequence[Sequence[str]] = "paper",
    ) -> torch.FloatTensor:
        """Probability [B, C] that each finding is present.

        For each label the image is compared with the positive and negative prompts ("{label}" and "no {label}"
        for the paper's protocol, the default); a softmax over the two raw cosine similarities (no temperature)
        gives the probability of the positive prompt. `prompts` may name another preset of `ZERO_SHOT_PROMPTS` or
        give (positive, negative) templates; several templates are averaged as a prompt ensemble.
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("pass exactly one of `pixel_values` or `image_embeds`.")
        if image_embeds is None:
            image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_zero_shot_text_embeds(labels, tokenizer, prompts)  # [C, 2, D]
        return zero_shot_scores(image_embeds.to(text_embeds.device), text_embeds)


class CheXficientVisionModel(CheXficientPreTrainedModel):
    """The image encoder and its projection alone: for embedding services and LLaVA-Rad.

    Loads from a full CheXficient checkpoint; the text tower's weights are left out.
    """

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale", r"^prototypes"]

    def __init__(self, config: CheXficientConfig):
        super().__init__(config)
        self.vision_model = Dinov2Model(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CheXficientVisionOutput | tuple:
        """Embed images: `pixel_values` [B, 3, H, W] -> normalised `image_embeds` [B, projection_dim] and states."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vision_model(
            pixel_values=pixel_values, return_dict=True, **_tower_kwargs(output_attentions, output_hidden_states)
        )
        image_embeds = F.normalize(self.visual_projection(outputs.pooler_output), dim=-1)
        result = CheXficientVisionOutput(
            image_embeds=image_embeds,
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=outputs.pooler_output,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


class CheXficientForImageClassification(CheXficientPreTrainedModel):
    """The paper's linear probe: a linear head on the L2-normalised, projected image embedding.

    The features are `CheXficientModel.get_image_features`: the image tower's pooled CLS output through
    `visual_projection`, L2-normalised (`projection_dim`, 512 for the released model, the head size of the reference
    code's probe). Both the image tower and the projection are frozen (no gradient, eval mode, dropout included), and
    only `classifier` trains. `from_pretrained` on a CheXficient folder loads the tower and the projection and leaves
    the text tower out; the head is new. `eval/linear_probe.py` trains this same head (`classifier_head`) on cached
    embeddings and saves the probe as a folder of this class.

    `config.num_labels` sets the head size; `config.problem_type` picks the loss as in transformers
    (multi-label BCE for float multi-hot labels, cross-entropy for class indices, MSE for one regression output).
    """

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale", r"^prototypes"]

    def __init__(self, config: CheXficientConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = Dinov2Model(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)
        self.classifier = self.classifier_head(config.projection_dim, config.num_labels)
        self._freeze_encoder()
        self.post_init()

    @staticmethod
    def classifier_head(in_features: int, num_labels: int) -> nn.Linear:
        """The probe's head, logits = W x + b over `in_features`-d features (PyTorch's default initialisation when
        built alone, as `eval/linear_probe.py` does; the model's `_init_weights` when built inside the model)."""
        return nn.Linear(in_features, num_labels)

    def _freeze_encoder(self) -> None:
        for frozen in (self.vision_model, self.visual_projection):
            frozen.requires_grad_(False)  # loading may hand back trainable parameters
            frozen.eval()

    def train(self, mode: bool = True) -> CheXficientForImageClassification:
        super().train(mode)
        self._freeze_encoder()  # the encoder and its projection stay frozen, dropout included
        return self

    @torch.no_grad()
    def _embed(self, pixel_values: torch.FloatTensor, **tower_kwargs) -> tuple[Any, torch.FloatTensor]:
        """The frozen tower's outputs and the normalised embedding [B, projection_dim], without autograd."""
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
        return outputs, F.normalize(self.visual_projection(outputs.pooler_output), dim=-1)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> torch.FloatTensor | BaseModelOutputWithPooling:
        """L2-normalised image embeddings [B, projection_dim], the features the head reads (the values of
        `CheXficientModel.get_image_features` for the same weights), computed without autograd (the encoder is
        frozen). The tensor by default; a `BaseModelOutputWithPooling` of the tower with an explicit
        `return_dict=True`, exactly as `CheXficientModel.get_image_features`."""
        outputs, image_embeds = self._embed(pixel_values, **_tower_kwargs(output_attentions, output_hidden_states))
        return _features_output(image_embeds, outputs, return_dict)

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """Logits [B, num_labels] from `pixel_values` [B, 3, H, W]; a loss when `labels` are given."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs, image_embeds = self._embed(pixel_values, **_tower_kwargs(output_attentions, output_hidden_states))
        logits = self.classifier(image_embeds)

        loss = None
        if labels is not None:
            problem_type = self.config.problem_type
            if problem_type is None:
                if self.num_labels == 1:
                    problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem_type = "single_label_classification"
                else:
                    problem_type = "multi_label_classification"
            if problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            elif problem_type == "single_label_classification":
                loss = F.cross_entropy(logits, labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

        result = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict else result.to_tuple()


CheXficientModel.register_for_auto_class("AutoModel")
CheXficientForImageClassification.register_for_auto_class("AutoModelForImageClassification")

AutoModelForZeroShotImageClassification.register(CheXficientConfig, CheXficientModel, exist_ok=True)
# transformers < 4.57's `pipeline()` builds an image processor only for configs in AutoImageProcessor's table.
AutoImageProcessor.register(CheXficientConfig, slow_image_processor_class=CheXficientImageProcessor, exist_ok=True)

__all__ = [
    "CheXficientForImageClassification",
    "CheXficientModel",
    "CheXficientPreTrainedModel",
    "CheXficientVisionModel",
]
