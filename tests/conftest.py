"""Shared fixtures: a tiny CheXficient config and a tiny tokenizer (builders in tests/helpers.py), a fixed seed."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from transformers import BertTokenizerFast

from configuration_chexficient import CheXficientConfig


@pytest.fixture
def config() -> CheXficientConfig:
    return tiny_config()


@pytest.fixture
def tokenizer() -> BertTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is several times faster than two, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
