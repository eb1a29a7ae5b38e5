"""Shared fixtures: tiny CheXficient configs and a tiny tokenizer, all built offline."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from configuration_chexficient import CheXficientConfig


TINY_WORDS = (
    "no there is finding pneumothorax effusion pleural cardiomegaly heart lungs clear normal size the are of and "
    "right left small large opacity consolidation nodule tube fracture rib acute process"
).split()


def tiny_config(**overrides) -> CheXficientConfig:
    """A CheXficient config small enough for CPU tests (hidden 32, 2 layers, 28 px images, patch 14)."""
    values = dict(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=14
        ),
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
        ),
        projection_dim=16,
        num_prototypes=3,
    )
    values.update(overrides)
    return CheXficientConfig(**values)


def tiny_tokenizer() -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over a few report words (ids < 64, the tiny vocab size)."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


@pytest.fixture
def config() -> CheXficientConfig:
    return tiny_config()


@pytest.fixture
def tokenizer() -> BertTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def save_tiny_model(folder, **config_overrides):
    """Save a tiny random CheXficient with its processor and tokenizer (28 px images) to `folder`; returns it."""
    from image_processing_chexficient import CheXficientImageProcessor
    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    model = CheXficientModel(tiny_config(**config_overrides)).eval()
    model.save_pretrained(folder)
    CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tiny_tokenizer()).save_pretrained(
        folder
    )
    return model
