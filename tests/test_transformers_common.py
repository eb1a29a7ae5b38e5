"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against the CheXficient models.

Modelled on how transformers tests CLIP: a tester per model builds a tiny config and inputs
(`prepare_config_and_inputs_for_common`), and a `unittest.TestCase` per model class inherits every common test. The
common tests come from the source distribution of the installed transformers, unpacked once (online) into
`.cache/transformers-tests/<version>/` by `make setup` (`python scripts/prepare_transformers_checks.py --only tests`);
this module fails at collection when they are missing, so that a run never passes by testing nothing.

Only tests that cannot apply to a two-tower model (or to the frozen linear probe) are skipped, each with its reason;
`SKIPPED` lists them all, by test class. transformers' pipeline tests (`PipelineTesterMixin`) are not run: their
per-task tests and tiny-model summary are not in the source distribution and need the Hub.
"""

from __future__ import annotations

import copy
import re
import sys
import unittest
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import tiny_config
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from configuration_chexficient import CheXficientConfig
from modeling_chexficient import (
    CheXficientForImageClassification,
    CheXficientModel,
    CheXficientVisionModel,
)


ROOT = Path(__file__).resolve().parent.parent
COMMON_TESTS = ROOT / ".cache" / "transformers-tests" / transformers.__version__
if not (COMMON_TESTS / "transformers_tests" / "__init__.py").is_file():
    pytest.fail(
        f"transformers' common tests for transformers {transformers.__version__} are not unpacked in {COMMON_TESTS}: "
        "run `make setup` (or `python scripts/prepare_transformers_checks.py --only tests`) once, online.",
        pytrace=False,
    )
sys.path.insert(0, str(COMMON_TESTS))

with warnings.catch_warnings():
    # marks of transformers' own pytest configuration (flash_attn_test, torch_compile_test, ...), unknown here
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import (
        ModelTesterMixin,
        floats_tensor,
        ids_tensor,
    )


# ----- what is skipped, and why ----------------------------------------------------------------------------------

_EMBEDS_TWO_TOWERS = (
    "CheXficientModel needs both towers' inputs: it takes `input_ids` and `pixel_values` and has no `inputs_embeds`"
)
_ONE_TOWER_SHAPES = (
    "the two-tower model returns each tower's states in `vision_model_output` / `text_model_output`, not one "
    "`hidden_states` / `attentions` of one sequence length; the vision model's test covers the image tower"
)
_FEATURES_TENSOR = (
    "get_image_features / get_text_features return the L2-normalised embedding tensor by default (the v4 contract "
    "the library and its users rely on, the same on every transformers version) and a BaseModelOutputWithPooling "
    "only with an explicit return_dict=True; `config.return_dict` does not switch it (tested in this file)"
)
_NO_TOKENS = "image-only model: no token embeddings to resize; `get_input_embeddings` is the patch embedding"
_NO_LOSS = (
    "an embedding model without a training objective (no labels, no loss), as transformers' base models such as "
    "CLIPVisionModel, which these tests leave out; CheXficientModel's test trains the same tower"
)
_FROZEN_PROBE = (
    "the linear probe's image tower and projection are frozen and run without autograd by design: only the head "
    "trains, so no hidden state or attention map has a gradient"
)
_FROZEN_PROBE_CHECKPOINTING = (
    "the probe's only checkpointed layers are its frozen image tower's, run without autograd: gradient "
    "checkpointing has nothing to recompute there (the head's gradients are checked by test_training)"
)

SKIPPED: dict[str, dict[str, str]] = {
    "CheXficientModelTest": {
        "test_inputs_embeds": _EMBEDS_TWO_TOWERS,
        "test_inputs_embeds_matches_input_ids": _EMBEDS_TWO_TOWERS,
        "test_hidden_states_output": _ONE_TOWER_SHAPES,
        "test_attention_outputs": _ONE_TOWER_SHAPES,
        "test_retain_grad_hidden_states_attentions": _ONE_TOWER_SHAPES,
        "test_get_text_features_output": _FEATURES_TENSOR,
        "test_get_text_features_hidden_states": _FEATURES_TENSOR,
        "test_get_text_features_attentions": _FEATURES_TENSOR,
        "test_get_image_features_output": _FEATURES_TENSOR,
        "test_get_image_features_hidden_states": _FEATURES_TENSOR,
        "test_get_image_features_attentions": _FEATURES_TENSOR,
    },
    "CheXficientVisionModelTest": {
        "test_inputs_embeds": "an image model: `pixel_values` only, no `inputs_embeds`",
        "test_inputs_embeds_matches_input_ids": "an image model: `pixel_values` only, no `input_ids`",
        "test_resize_tokens_embeddings": _NO_TOKENS,
        "test_resize_embeddings_untied": _NO_TOKENS,
        "test_training": _NO_LOSS,
        "test_training_gradient_checkpointing": _NO_LOSS,
        "test_training_gradient_checkpointing_use_reentrant_false": _NO_LOSS,
        "test_training_gradient_checkpointing_use_reentrant_true": _NO_LOSS,
    },
    "CheXficientForImageClassificationTest": {
        "test_inputs_embeds": "an image model: `pixel_values` only, no `inputs_embeds`",
        "test_inputs_embeds_matches_input_ids": "an image model: `pixel_values` only, no `input_ids`",
        "test_resize_tokens_embeddings": _NO_TOKENS,
        "test_resize_embeddings_untied": _NO_TOKENS,
        "test_retain_grad_hidden_states_attentions": _FROZEN_PROBE,
        "test_training_gradient_checkpointing": _FROZEN_PROBE_CHECKPOINTING,
        "test_training_gradient_checkpointing_use_reentrant_false": _FROZEN_PROBE_CHECKPOINTING,
        "test_training_gradient_checkpointing_use_reentrant_true": _FROZEN_PROBE_CHECKPOINTING,
        "test_get_image_features_output": _FEATURES_TENSOR,
        "test_get_image_features_hidden_states": _FEATURES_TENSOR,
        "test_get_image_features_attentions": _FEATURES_TENSOR,
    },
}


def _skipping(test_class: type) -> type:
    """Replace each test that `SKIPPED` names for `test_class` by an explicit `unittest.skip` with its reason."""
    for name, reason in SKIPPED[test_class.__name__].items():
        if not hasattr(test_class, name):
            raise AttributeError(f"{test_class.__name__}.{name} is no test of transformers {transformers.__version__}")
        # a `parameterized.expand` test runs as `name_0`, `name_1`, ... (`name` itself is no test): skip every case
        cases = [case for case in dir(test_class) if re.fullmatch(rf"{name}_\d+(_\w+)?", case)]
        for case in cases or [name]:

            @unittest.skip(reason=reason)
            def skipped(self, *args, **kwargs):
                pass

            skipped.__name__ = skipped.__qualname__ = case
            setattr(test_class, case, skipped)
    return test_class


# ----- testers: tiny configs and inputs --------------------------------------------------------------------------


class CheXficientVisionModelTester:
    """Tiny image-side config and `pixel_values`: 28 px images in 14 px patches (4 patches + CLS)."""

    def __init__(self, parent, batch_size=4, image_size=28, patch_size=14, num_channels=3, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.projection_dim = 16
        self.num_labels = 3
        self.seq_length = (image_size // patch_size) ** 2 + 1

    def get_config(self) -> CheXficientConfig:
        return tiny_config(
            vision_config=dict(
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                mlp_ratio=2,
                image_size=self.image_size,
                patch_size=self.patch_size,
                num_channels=self.num_channels,
            ),
            projection_dim=self.projection_dim,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class CheXficientTextModelTester:
    """Tiny BERT-side config values and right-padded `input_ids` / `attention_mask` / `token_type_ids`."""

    def __init__(self, parent, batch_size=4, seq_length=7, vocab_size=64, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.is_training = is_training
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.type_vocab_size = 2

    def text_config(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            max_position_embeddings=64,
            type_vocab_size=self.type_vocab_size,
        )

    def prepare_inputs(self) -> dict[str, torch.Tensor]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # right padding, as the tokenizer gives: a prefix of 2 .. seq_length tokens per report (the last one full)
        lengths = torch.randint(2, self.seq_length + 1, (self.batch_size,))
        lengths[-1] = self.seq_length
        attention_mask = (torch.arange(self.seq_length)[None] < lengths[:, None]).long()
        token_type_ids = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


class CheXficientModelTester:
    """Both towers: the image tester's images and the text tester's reports, one of each per pair."""

    def __init__(self, parent, is_training=True):
        self.parent = parent
        self.vision_model_tester = CheXficientVisionModelTester(parent)
        self.text_model_tester = CheXficientTextModelTester(parent)
        self.batch_size = self.text_model_tester.batch_size
        self.is_training = is_training
        self.vision_config = {"num_hidden_layers": self.vision_model_tester.num_hidden_layers}
        self.text_config = {"num_hidden_layers": self.text_model_tester.num_hidden_layers}

    def get_config(self) -> CheXficientConfig:
        vision = self.vision_model_tester
        return tiny_config(
            vision_config=vision.get_config().vision_config.to_dict(),
            text_config=self.text_model_tester.text_config(),
            projection_dim=vision.projection_dim,
        )

    def prepare_config_and_inputs(self):
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        return self.get_config(), self.text_model_tester.prepare_inputs(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, text_inputs, pixel_values = self.prepare_config_and_inputs()
        return config, {**text_inputs, "pixel_values": pixel_values, "return_loss": True}


# ----- the common tests ------------------------------------------------------------------------------------------


@_skipping
class CheXficientModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CheXficientModel,)
    fx_compatible = False
    test_resize_embeddings = True
    _is_composite = True
    # besides the main input (`input_ids`), what the SDPA-against-eager comparison feeds the model
    additional_model_inputs = ["pixel_values"]

    def setUp(self):
        self.model_tester = CheXficientModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=CheXficientConfig,
            has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value", "num_prototypes"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, text_inputs, pixel_values = self.model_tester.prepare_config_and_inputs()
        model = CheXficientModel(config).eval()
        with torch.no_grad():
            out = model(**text_inputs, pixel_values=pixel_values, return_loss=True)
        batch = self.model_tester.batch_size
        self.assertEqual(out.logits_per_image.shape, (batch, batch))
        self.assertEqual(out.logits_per_text.shape, (batch, batch))
        self.assertEqual(out.image_embeds.shape, (batch, config.projection_dim))
        self.assertEqual(out.text_embeds.shape, (batch, config.projection_dim))
        self.assertEqual(out.loss.dim(), 0)


@_skipping
class CheXficientVisionModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CheXficientVisionModel,)
    fx_compatible = False
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = CheXficientVisionModelTester(self)

    def test_model_get_set_embeddings(self):
        # as transformers' CLIPVisionModelTest: an image model's input embedding is its patch embedding
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config))
            embeddings = model.get_input_embeddings()
            self.assertIsInstance(embeddings, nn.Module)
            self.assertIs(embeddings, model.vision_model.embeddings.patch_embeddings)
            self.assertIsNone(model.get_output_embeddings())

    def test_model(self):
        config, pixel_values = self.model_tester.prepare_config_and_inputs()
        model = CheXficientVisionModel(config).eval()
        with torch.no_grad():
            out = model(pixel_values)
        tester = self.model_tester
        self.assertEqual(out.image_embeds.shape, (tester.batch_size, config.projection_dim))
        self.assertEqual(out.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
        self.assertEqual(out.pooler_output.shape, (tester.batch_size, tester.hidden_size))


@_skipping
class CheXficientForImageClassificationTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CheXficientForImageClassification,)
    fx_compatible = False
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = CheXficientVisionModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin builds labels only for classes in transformers' own Auto tables; a remote-code probe gets the
        # same class-index labels (batch_size,) that it gives an image classifier.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    def test_model_get_set_embeddings(self):
        # as transformers' CLIPVisionModelTest: an image model's input embedding is its patch embedding
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = CheXficientForImageClassification(config)
        self.assertIs(model.get_input_embeddings(), model.vision_model.embeddings.patch_embeddings)
        self.assertIsNone(model.get_output_embeddings())

    def test_model(self):
        config, pixel_values = self.model_tester.prepare_config_and_inputs()
        model = CheXficientForImageClassification(config).eval()
        labels = torch.randint(0, config.num_labels, (self.model_tester.batch_size,))
        with torch.no_grad():
            out = model(pixel_values, labels=labels)
        self.assertEqual(out.logits.shape, (self.model_tester.batch_size, config.num_labels))
        self.assertEqual(out.loss.dim(), 0)


# ----- the features methods' own contract (what the skipped `test_get_*_features_*` assume of v5 CLIP) -------------


class FeaturesContractTest(unittest.TestCase):
    """`get_image_features` / `get_text_features`: the normalised tensor by default, a `BaseModelOutputWithPooling`
    of the tower (with the normalised embedding as `pooler_output`) with an explicit `return_dict=True`."""

    def setUp(self):
        torch.manual_seed(0)
        self.tester = CheXficientModelTester(self)
        self.config, self.text_inputs, self.pixel_values = self.tester.prepare_config_and_inputs()
        self.config._attn_implementation = "eager"  # attention maps need eager attention

    def _check(self, default, output, tower_layers: int, shape: tuple[int, ...]):
        self.assertIsInstance(default, torch.Tensor)
        torch.testing.assert_close(default.norm(dim=-1), torch.ones(default.shape[0]))
        self.assertIsInstance(output, BaseModelOutputWithPooling)
        self.assertEqual(tuple(output.last_hidden_state.shape), shape)
        self.assertEqual(len(output.hidden_states), tower_layers + 1)
        self.assertEqual(len(output.attentions), tower_layers)
        self.assertEqual(tuple(output.hidden_states[-1].shape), shape)
        torch.testing.assert_close(output.pooler_output, default)

    def test_image_features(self):
        vision = self.tester.vision_model_tester
        shape = (vision.batch_size, vision.seq_length, vision.hidden_size)
        for model_class in (CheXficientModel, CheXficientForImageClassification):
            config = copy.deepcopy(self.config)
            config.return_dict = True  # the config's return_dict does not switch the default
            model = model_class(config).eval()
            with torch.no_grad():
                default = model.get_image_features(self.pixel_values)
                output = model.get_image_features(
                    pixel_values=self.pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True
                )
                as_tuple = model.get_image_features(self.pixel_values, return_dict=False)
            with self.subTest(model_class.__name__):
                self._check(default, output, vision.num_hidden_layers, shape)
                torch.testing.assert_close(as_tuple, default)

    def test_text_features(self):
        text = self.tester.text_model_tester
        config = copy.deepcopy(self.config)
        config.return_dict = True
        model = CheXficientModel(config).eval()
        with torch.no_grad():
            default = model.get_text_features(**self.text_inputs)
            output = model.get_text_features(
                **self.text_inputs, output_hidden_states=True, output_attentions=True, return_dict=True
            )
        self._check(default, output, text.num_hidden_layers, (text.batch_size, text.seq_length, text.hidden_size))

    def test_features_match_forward(self):
        model = CheXficientModel(self.config).eval()
        with torch.no_grad():
            out = model(**self.text_inputs, pixel_values=self.pixel_values)
            image = model.get_image_features(self.pixel_values, return_dict=True)
            text = model.get_text_features(**self.text_inputs, return_dict=True)
        torch.testing.assert_close(image.pooler_output, out.image_embeds)
        torch.testing.assert_close(text.pooler_output, out.text_embeds)
        torch.testing.assert_close(image.last_hidden_state, out.vision_model_output.last_hidden_state)
        torch.testing.assert_close(text.last_hidden_state, out.text_model_output.last_hidden_state)
