"""CheXficientConfig and the models: shapes, pooling, loss, zero-shot protocol, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from transformers import BertConfig, Dinov2Config

from configuration_chexficient import CheXficientConfig
from modeling_chexficient import (
    NO_FINDING_REPORT_PROMPTS,
    ZERO_SHOT_PROMPTS,
    CheXficientForImageClassification,
    CheXficientModel,
    CheXficientOutput,
    CheXficientVisionModel,
    clip_loss,
    last_token_pool,
    zero_shot_prompts,
    zero_shot_scores,
)


def _inputs(batch: int = 3, seq: int = 7, image_size: int = 28):
    input_ids = torch.randint(5, 64, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, 4:] = 0  # right padding on the first report
    input_ids[0, 4:] = 0
    pixel_values = torch.randn(batch, 3, image_size, image_size)
    return input_ids, attention_mask, pixel_values


# ----- configuration ---------------------------------------------------------------------------------------------


def test_default_config_is_released_architecture():
    config = CheXficientConfig()
    vision, text = config.vision_config, config.text_config
    assert isinstance(vision, Dinov2Config) and isinstance(text, BertConfig)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (768, 12, 14, 378)
    assert vision.layer_norm_eps == 1e-6 and vision.layerscale_value == 1.0 and not vision.use_swiglu_ffn
    assert (text.vocab_size, text.num_hidden_layers, text.hidden_size) == (28996, 12, 768)
    assert config.projection_dim == 512 and config.num_prototypes == 6
    assert config.logit_scale_init_value == pytest.approx(math.log(100.0))


def test_config_accepts_dicts_and_objects_and_round_trips(tmp_path):
    from_dicts = tiny_config()
    from_objects = CheXficientConfig(
        vision_config=from_dicts.vision_config, text_config=from_dicts.text_config, projection_dim=16, num_prototypes=3
    )
    assert from_objects.to_dict()["vision_config"] == from_dicts.to_dict()["vision_config"]
    from_dicts.save_pretrained(tmp_path)
    reloaded = CheXficientConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == from_dicts.to_dict()
    assert isinstance(reloaded.vision_config, Dinov2Config) and reloaded.vision_config.hidden_size == 32
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "chexficient"
    assert on_disk["auto_map"]["AutoConfig"] == "configuration_chexficient.CheXficientConfig"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(vision_config=dict(image_size=30, patch_size=14)), "multiple of vision_config.patch_size"),
        (dict(vision_config=dict(hidden_size=30, num_attention_heads=4)), "vision_config.hidden_size"),
        (dict(text_config=dict(hidden_size=30, num_attention_heads=4)), "text_config.hidden_size"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(num_prototypes=0), "num_prototypes"),
        (dict(vision_config="vit"), "vision_config"),
    ],
)
def test_inconsistent_config_fails_at_construction(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CheXficientConfig(**overrides)


# ----- model ---------------------------------------------------------------------------------------------------


def test_forward_shapes_embeddings_and_loss(config):
    model = CheXficientModel(config).eval()
    input_ids, attention_mask, pixel_values = _inputs()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    assert isinstance(out, CheXficientOutput)
    assert out.logits_per_image.shape == (3, 3) and out.logits_per_text.shape == (3, 3)
    assert out.image_embeds.shape == (3, 16) and out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    # logits use the stored scale; the loss is the symmetric InfoNCE
    expected = math.exp(config.logit_scale_init_value) * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)
    targets = torch.arange(3)
    by_hand = (F.cross_entropy(expected, targets) + F.cross_entropy(expected.t(), targets)) / 2
    torch.testing.assert_close(out.loss, by_hand)
    out.loss.backward()
    assert model.visual_projection.weight.grad is not None and model.logit_scale.grad is not None
    assert model.prototypes.shape == (3, 32) and not model.prototypes.requires_grad
    assert model.logit_scale.ndim == 1


def test_features_match_forward_and_tuple_output(config):
    model = CheXficientModel(config).eval()
    input_ids, attention_mask, pixel_values = _inputs()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    torch.testing.assert_close(model.get_image_features(pixel_values), out.image_embeds)
    torch.testing.assert_close(model.get_text_features(input_ids, attention_mask), out.text_embeds)
    as_tuple = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits_per_image)


def test_loss_clamps_logit_scale_but_logits_do_not(config):
    model = CheXficientModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    input_ids, attention_mask, pixel_values = _inputs()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    cosine = out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, 1000.0 * cosine, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, clip_loss(100.0 * cosine))


def test_text_pooling_takes_last_real_token():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(last_token_pool(hidden, right), torch.stack([hidden[0, 2], hidden[1, 4]]))
    torch.testing.assert_close(last_token_pool(hidden, left), torch.stack([hidden[0, 4], hidden[1, 4]]))
    torch.testing.assert_close(last_token_pool(hidden, None), hidden[:, -1])


def test_padding_does_not_change_text_embedding(config):
    model = CheXficientModel(config).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    padded = torch.tensor([[2, 10, 11, 12, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(
        model.get_text_features(ids, torch.ones_like(ids)), model.get_text_features(padded, mask), atol=1e-5, rtol=1e-5
    )


def test_towers_are_transformers_classes_with_sdpa(config):
    from transformers import BertModel, Dinov2Model

    model = CheXficientModel(config)
    assert type(model.vision_model) is Dinov2Model and type(model.text_model) is BertModel
    assert model.text_model.pooler is None  # the released features pool [SEP], the pooler is unused
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert model.text_model.config._attn_implementation == "sdpa"
    assert model.visual_projection.bias is not None and model.text_projection.bias is not None


def test_vision_model_loads_from_full_checkpoint(config, tmp_path):
    model = CheXficientModel(config).eval()
    model.save_pretrained(tmp_path)
    vision = CheXficientVisionModel.from_pretrained(tmp_path).eval()
    assert not any(name.startswith("text_model") for name, _ in vision.named_parameters())
    pixel_values = torch.randn(2, 3, 28, 28)
    out = vision(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(out.image_embeds, model.get_image_features(pixel_values))
    assert out.last_hidden_state.shape == (2, 1 + 4, 32)  # CLS + (28 / 14)^2 patches
    assert len(out.hidden_states) == config.vision_config.num_hidden_layers + 1


def test_linear_probe_freezes_encoder_and_trains_head(config, tmp_path):
    clip = CheXficientModel(config).eval()
    clip.save_pretrained(tmp_path)
    probe = CheXficientForImageClassification.from_pretrained(tmp_path, num_labels=4)
    probe.train()
    assert not probe.vision_model.training and not probe.visual_projection.training
    trainable = {name for name, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert probe.classifier.in_features == config.projection_dim  # the paper's head: on the projected embedding
    pixel_values = torch.randn(5, 3, 28, 28)
    # The projection is loaded, not re-initialised: the probe's features are the CLIP model's image embeddings.
    features = probe.get_image_features(pixel_values)
    torch.testing.assert_close(features, clip.get_image_features(pixel_values), atol=0, rtol=0)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5))
    labels = torch.randint(0, 2, (5, 4)).float()
    out = probe(pixel_values, labels=labels)
    assert out.logits.shape == (5, 4)
    expected = F.binary_cross_entropy_with_logits(probe.classifier(features), labels)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert probe.classifier.weight.grad is not None
    assert all(p.grad is None for p in probe.visual_projection.parameters())
    classes = torch.randint(0, 4, (5,))
    torch.testing.assert_close(probe(pixel_values, labels=classes).loss, F.cross_entropy(out.logits, classes))


def test_linear_probe_loads_the_projection_of_a_chexficient_folder(config, tmp_path):
    CheXficientModel(config).save_pretrained(tmp_path)
    pixel_values = torch.randn(3, 3, 28, 28)
    probe = CheXficientForImageClassification.from_pretrained(tmp_path, num_labels=2).eval()
    clip = CheXficientModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(probe.get_image_features(pixel_values), clip.get_image_features(pixel_values))
    torch.testing.assert_close(probe.visual_projection.weight, clip.visual_projection.weight, atol=0, rtol=0)


# ----- every model class, in transformers' ModelTester style -------------------------------------------------------


class CheXficientModelTester:
    """Tiny configs and inputs for each CheXficient model class (hidden 32, 2 layers, 28 px, patch 14)."""

    def __init__(self, batch_size: int = 3, seq_length: int = 7, image_size: int = 28, num_labels: int = 4):
        self.batch_size, self.seq_length, self.image_size, self.num_labels = (
            batch_size,
            seq_length,
            image_size,
            num_labels,
        )

    def get_config(self, attn_implementation: str = "sdpa") -> CheXficientConfig:
        config = tiny_config(num_labels=self.num_labels)
        config._attn_implementation = attn_implementation
        return config

    def prepare_inputs(self, model_class: type) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        inputs = {
            "pixel_values": torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)
        }
        if model_class is CheXficientModel:
            input_ids = torch.randint(5, 64, (self.batch_size, self.seq_length), generator=generator)
            attention_mask = torch.ones_like(input_ids)
            attention_mask[0, 4:], input_ids[0, 4:] = 0, 0  # right padding on the first report
            inputs.update(input_ids=input_ids, attention_mask=attention_mask)
        return inputs

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A scalar that depends on every trainable parameter the class trains."""
        if isinstance(model, CheXficientModel):
            return model(**inputs, return_loss=True).loss
        if isinstance(model, CheXficientForImageClassification):
            labels = torch.randint(
                0, 2, (self.batch_size, self.num_labels), generator=torch.Generator().manual_seed(2)
            )
            return model(**inputs, labels=labels.float()).loss
        return model(**inputs).image_embeds.square().sum()

    @staticmethod
    def first_output(output) -> torch.Tensor:
        for name in ("logits_per_image", "logits", "image_embeds"):
            if getattr(output, name, None) is not None:
                return getattr(output, name)
        raise AssertionError(f"no main output in {type(output).__name__}")


def _device_of(name: str, device_map: dict[str, object]) -> object:
    """The device a parameter goes to under `device_map` (the longest module prefix that names it)."""
    prefixes = [p for p in device_map if p == "" or name == p or name.startswith(p + ".")]
    return device_map[max(prefixes, key=len)]


class ModelTesterMixin:
    model_class: type
    tester = CheXficientModelTester()

    def make(self, attn_implementation: str = "sdpa") -> torch.nn.Module:
        torch.manual_seed(0)
        return self.model_class(self.tester.get_config(attn_implementation)).eval()

    def test_towers_are_transformers_classes_and_the_claims_are_theirs(self):
        from transformers import BertModel, Dinov2Model

        model = self.make()
        assert type(model.vision_model) is Dinov2Model
        towers = [model.vision_model] + ([model.text_model] if hasattr(model, "text_model") else [])
        if hasattr(model, "text_model"):
            assert type(model.text_model) is BertModel and model.text_model.pooler is None  # features pool [SEP]
        for tower in towers:  # what CheXficient declares, its towers must support
            assert tower.config._attn_implementation == "sdpa"
            assert type(tower)._supports_sdpa and type(tower)._supports_flash_attn
            assert type(tower).supports_gradient_checkpointing
        layer_classes = {type(m).__name__ for m in model.modules()}
        assert set(self.model_class._no_split_modules) & layer_classes  # names real modules of this model

    def test_save_and_load_give_identical_outputs(self, tmp_path):
        model = self.make()
        inputs = self.tester.prepare_inputs(self.model_class)
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_chexficient.py").exists()
        reloaded = self.model_class.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            a, b = model(**inputs), reloaded(**inputs)
        torch.testing.assert_close(self.tester.first_output(a), self.tester.first_output(b), atol=0, rtol=0)

    def test_sdpa_and_eager_attention_agree(self):
        sdpa, eager = self.make("sdpa"), self.make("eager")
        eager.load_state_dict(sdpa.state_dict())
        assert eager.vision_model.config._attn_implementation == "eager"
        inputs = self.tester.prepare_inputs(self.model_class)
        with torch.no_grad():
            a, b = sdpa(**inputs), eager(**inputs)
        torch.testing.assert_close(self.tester.first_output(a), self.tester.first_output(b), atol=1e-4, rtol=1e-4)

    def test_hidden_states_and_attentions(self):
        model = self.make("eager")  # attention maps need the eager kernel
        inputs = self.tester.prepare_inputs(self.model_class)
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
        vision = out.vision_model_output if hasattr(out, "vision_model_output") else out
        layers = model.config.vision_config.num_hidden_layers
        tokens = 1 + (self.tester.image_size // model.config.vision_config.patch_size) ** 2
        assert len(vision.hidden_states) == layers + 1 and len(vision.attentions) == layers
        assert vision.hidden_states[-1].shape == (self.tester.batch_size, tokens, 32)
        heads = model.config.vision_config.num_attention_heads
        assert vision.attentions[0].shape == (self.tester.batch_size, heads, tokens, tokens)
        torch.testing.assert_close(vision.attentions[0].sum(-1), torch.ones(self.tester.batch_size, heads, tokens))
        if hasattr(out, "text_model_output"):
            text = out.text_model_output
            assert len(text.hidden_states) == model.config.text_config.num_hidden_layers + 1
            assert text.attentions[0].shape[-1] == self.tester.seq_length

    def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(self):
        inputs = self.tester.prepare_inputs(self.model_class)
        results = {}
        for checkpointing in (False, True):
            model = self.make()
            model.train()
            for module in model.modules():  # no dropout: both runs must see the same function
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            if checkpointing:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                assert model.is_activation_checkpointing
            calls: list[int] = []
            layer = next(m for m in model.vision_model.modules() if type(m).__name__ == "Dinov2Layer")
            layer.mlp.register_forward_hook(lambda *args, calls=calls: calls.append(1))  # inside the checkpoint
            self.tester.loss(model, inputs).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[checkpointing] = (len(calls), grads)
        (plain_calls, plain), (checkpointed_calls, checkpointed) = results[False], results[True]
        assert plain.keys() == checkpointed.keys() and plain
        for name in plain:
            torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4)
        if self.model_class is not CheXficientForImageClassification:  # its frozen encoder runs without autograd
            assert checkpointed_calls == 2 * plain_calls  # the layer ran again in the backward pass

    def test_device_map_keeps_no_split_modules_whole(self):
        """At a memory budget where accelerate, told nothing, cuts a transformer layer across devices, the model's
        `_no_split_modules` keeps every layer whole."""
        from accelerate import infer_auto_device_map
        from accelerate.utils import compute_module_sizes

        model = self.make()
        total = compute_module_sizes(model)[""]

        def split_layers(no_split: list[str], fraction: float) -> tuple[set[str], set[object]]:
            budget = {"cpu": int(total * fraction), "disk": total * 2}  # too small a CPU: the rest is offloaded
            device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
            split = set()
            for name, module in model.named_modules():
                if type(module).__name__ in model._no_split_modules:
                    devices = {_device_of(f"{name}.{p}", device_map) for p, _ in module.named_parameters()}
                    split |= {name} if len(devices) > 1 else set()
            return split, set(device_map.values())

        fractions = [f / 100 for f in range(50, 100, 2)]
        cutting = next((f for f in fractions if split_layers([], f)[0]), None)
        assert cutting is not None, "no budget splits a layer: the check would prove nothing"
        split, _ = split_layers(model._no_split_modules, cutting)
        assert not split, split


class TestCheXficientModel(ModelTesterMixin):
    model_class = CheXficientModel


class TestCheXficientVisionModel(ModelTesterMixin):
    model_class = CheXficientVisionModel


class TestCheXficientForImageClassification(ModelTesterMixin):
    model_class = CheXficientForImageClassification


# ----- zero-shot ---------------------------------------------------------------------------------------------------


def test_zero_shot_prompts_follow_the_paper():
    assert zero_shot_prompts("Pneumothorax") == [("Pneumothorax", "no Pneumothorax")]
    assert zero_shot_prompts("No Finding") == [("No Finding", "there is Finding")]
    report = zero_shot_prompts("Edema", "report")
    assert report[0] == ("There is edema.", "There is no edema.") and len(report) == len(ZERO_SHOT_PROMPTS["report"])
    assert zero_shot_prompts("Edema", [("{c} seen", "no {c_lower}")]) == [("Edema seen", "no edema")]
    # a templated "No Finding" would read "There is no no finding.": normal-study sentences instead, one per template
    assert zero_shot_prompts("No Finding", "report") == list(NO_FINDING_REPORT_PROMPTS)
    assert zero_shot_prompts("No Finding", [("{c} seen", "no {c_lower}")]) == [NO_FINDING_REPORT_PROMPTS[0]]
    with pytest.raises(ValueError, match="unknown prompt preset"):
        zero_shot_prompts("Edema", "papers")


def test_zero_shot_scores_are_a_softmax_over_raw_cosines():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[[0.6, 0.8], [0.8, 0.6]]])  # one class: positive, negative prompt
    expected = [math.exp(0.6) / (math.exp(0.6) + math.exp(0.8)), math.exp(0.8) / (math.exp(0.8) + math.exp(0.6))]
    torch.testing.assert_close(zero_shot_scores(image, text)[:, 0], torch.tensor(expected), rtol=1e-6, atol=1e-7)


def _prompt_embeds(model, tokenizer, prompts):
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    return model.get_text_features(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])


def test_zero_shot_matches_hand_computation_and_caches(config, tokenizer):
    model = CheXficientModel(config).eval()
    labels = ["Pneumothorax", "Cardiomegaly", "No Finding"]
    image_embeds = F.normalize(torch.randn(4, 16), dim=-1)
    probs = model.zero_shot_classify(labels, tokenizer, image_embeds=image_embeds)
    assert probs.shape == (4, 3)
    for c, label in enumerate(labels):
        ((positive, negative),) = zero_shot_prompts(label)
        text = _prompt_embeds(model, tokenizer, [positive, negative])
        cos = image_embeds @ text.t()  # [4, 2], no temperature
        expected = torch.exp(cos[:, 0]) / (torch.exp(cos[:, 0]) + torch.exp(cos[:, 1]))
        torch.testing.assert_close(probs[:, c], expected, atol=1e-5, rtol=1e-5)
    cached = model.get_zero_shot_text_embeds(labels, tokenizer)
    assert model.get_zero_shot_text_embeds(labels, tokenizer) is cached
    model.train()
    assert model.get_zero_shot_text_embeds(labels, tokenizer) is not cached  # training invalidates the cache
    with pytest.raises(ValueError, match="exactly one"):
        model.zero_shot_classify(labels, tokenizer)


def test_prompt_ensemble_averages_normalised_text_embeddings(config, tokenizer):
    model = CheXficientModel(config).eval()
    templates = [("{c} is present", "no {c_lower}"), ("there is {c_lower}", "{c} is normal")]
    image_embeds = F.normalize(torch.randn(5, 16), dim=-1)
    probs = model.zero_shot_classify(["Effusion"], tokenizer, image_embeds=image_embeds, prompts=templates)
    pairs = zero_shot_prompts("Effusion", templates)
    text = _prompt_embeds(model, tokenizer, [p for pair in pairs for p in pair]).view(2, 2, -1)
    ensemble = F.normalize(text.mean(dim=0), dim=-1)  # [2 (pos, neg), D]
    cos = image_embeds @ ensemble.t()
    torch.testing.assert_close(probs[:, 0], cos.softmax(dim=-1)[:, 0], atol=1e-5, rtol=1e-5)
    single = model.zero_shot_classify(["Effusion"], tokenizer, image_embeds=image_embeds, prompts=templates[:1])
    assert not torch.allclose(single, probs)  # the second template changes the scores


def test_zero_shot_cache_is_a_bounded_lru(config, tokenizer, monkeypatch):
    model = CheXficientModel(config).eval()
    monkeypatch.setattr(CheXficientModel, "zero_shot_cache_size", 2)
    first = model.get_zero_shot_text_embeds(["Edema"], tokenizer)
    model.get_zero_shot_text_embeds(["Pneumothorax"], tokenizer)
    assert model.get_zero_shot_text_embeds(["Edema"], tokenizer) is first  # a hit refreshes "Edema"
    model.get_zero_shot_text_embeds(["Cardiomegaly"], tokenizer)  # evicts the least recently used: Pneumothorax
    assert len(model._zero_shot_cache) == 2
    assert model.get_zero_shot_text_embeds(["Edema"], tokenizer) is first
    keys = [key[0] for key in model._zero_shot_cache]
    assert ("Pneumothorax",) not in keys and ("Cardiomegaly",) in keys
