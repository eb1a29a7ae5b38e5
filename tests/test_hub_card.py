"""The Hub model cards as Jinja templates: every variable a template uses is given, the released architecture comes
from the configuration module, and the cards state what the folder says (visibility, reduced sizes, unknown fields)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jinja2
import pytest
import torch
from helpers import save_tiny_model
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from chexficient.data.subsets import curated_subset_record, write_curated_subset
from chexficient.hub import card
from chexficient.metrics.results import load_results

from configuration_chexficient import RELEASED_VISION_CONFIG


ROOT = Path(__file__).resolve().parent.parent
EVAL_JSON = ROOT / "docs" / "results" / "eval_demo"
REPORT_RESULTS = [
    {
        "dataset": "mimic_test",
        "num_reports": 12,
        "metrics": {"bleu4": {"value": 12.5, "ci_low": 11.0, "ci_high": 14.0}, "rougeL": 0.3},
        "not_run": ["radgraph"],
    }
]


@pytest.fixture
def strict_templates(monkeypatch):
    """Templates render with StrictUndefined: a variable the template names but Python does not give fails."""
    monkeypatch.setattr(jinja2, "Template", functools.partial(jinja2.Template, undefined=jinja2.StrictUndefined))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder)
    return folder


def llava_folder(folder: Path, config: dict) -> Path:
    """A folder llava_card can read: config.json and a safetensors file (nothing is loaded)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", **config}))
    save_file({"weight": torch.zeros(3, 4)}, folder / "model.safetensors")
    return folder


def test_templates_ship_with_the_package_and_carry_the_front_matter():
    for template in (card.CHEXFICIENT_TEMPLATE, card.LLAVA_RAD_TEMPLATE):
        assert template.parent == Path(card.__file__).parent / "templates" and template.suffix == ".md"
        assert template.read_text().startswith("---\n{{ card_data }}\n---\n")
    assert "hub/templates/*.md" in (ROOT / "setup.cfg").read_text()  # package data: installed with the library


def test_every_template_variable_is_given(strict_templates, tiny_folder, tmp_path):
    results = load_results(EVAL_JSON)
    write_curated_subset(tmp_path, curated_subset_record([0, 1], num_candidates=4, source="pairs.csv"))
    curation = card.load_curation(tmp_path)
    full = card.CardOptions(repo_id="o/full", space_id="o/space", visibility="public")
    run = {"arguments": {"train": {"num_epochs": 2}, "curation": {"curation_mode": "fps", "curation_epochs": 1}}}
    texts = [
        card.chexficient_card(tiny_folder, full, results, "eval/per_class_auroc.png", run, curation).text,
        card.chexficient_card(tiny_folder, card.CardOptions(repo_id="o/bare"), run={}).text,
        card.llava_card(llava_folder(tmp_path / "llava", {}), full, REPORT_RESULTS).text,
        card.llava_card(tmp_path / "llava", card.CardOptions(repo_id="o/bare")).text,
    ]
    full_card, bare_card, llava, bare_llava = texts
    assert "| curated pairs | 2 (50.0%) |" in full_card and "| curation mode / epochs | fps / 1 |" in full_card
    assert "[demo Space](https://huggingface.co/spaces/o/space)" in full_card and "demo Space" not in bare_card
    assert "carries no `curated_subset.json`" in bare_card and "No evaluation results were bundled" in bare_card
    assert "| bleu4 | 12.500 | 11.000–14.000 |" in llava and "| rougeL | 0.300 |  |" in llava
    assert "No evaluation results were bundled" in bare_llava
    for text in texts:
        assert "{{" not in text and "{%" not in text and "\n\n\n" not in text  # fully rendered, no stray gaps


def test_the_card_states_the_visibility_it_was_published_with(tiny_folder):
    for visibility in ("private", "public"):
        options = card.CardOptions(repo_id="o/n", visibility=visibility)
        text = card.chexficient_card(tiny_folder, options, run={}).text
        assert f"published as **{visibility}**" in text and f"`--visibility {visibility}`" in text
    assert card.CardOptions(repo_id="o/n").visibility == "private"


def test_the_released_architecture_is_the_configuration_modules(tiny_folder, tmp_path):
    assert card.is_released_architecture(RELEASED_VISION_CONFIG)
    assert card.is_released_architecture({**RELEASED_VISION_CONFIG, "drop_path_rate": 0.1})  # regularisation only
    assert card.is_released_architecture({"hidden_size": 768})  # missing fields take the released defaults
    for field, value in (("hidden_size", 384), ("image_size", 224), ("num_attention_heads", 6), ("mlp_ratio", 2)):
        assert not card.is_released_architecture({**RELEASED_VISION_CONFIG, field: value}), field

    tiny = card.chexficient_card(tiny_folder, card.CardOptions(repo_id="o/tiny"), run={}).text
    released = f"ViT-B/{RELEASED_VISION_CONFIG['patch_size']} at {RELEASED_VISION_CONFIG['image_size']} px"
    assert "Reduced configuration" in tiny and released in tiny
    folder = tmp_path / "released"
    folder.mkdir()
    for path in tiny_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(RELEASED_VISION_CONFIG)
    (folder / "config.json").write_text(json.dumps(config))
    text = card.chexficient_card(folder, card.CardOptions(repo_id="o/released"), run={}).text
    assert "Reduced configuration" not in text
    assert "12 layers, width 768, 12 heads, patch 14, 378 px input (730 tokens: CLS + 27×27 patches" in text


def test_llava_card_marks_what_the_config_does_not_say(tmp_path):
    folder = llava_folder(
        tmp_path / "llava",
        {"vision_config": {"model_type": "dinov2", "hidden_size": 768}, "text_config": {"hidden_size": 4096}},
    )
    text = ModelCard(str(card.llava_card(folder, card.CardOptions(repo_id="o/n")))).text
    assert "| vision tower | `dinov2`: ? layers, width 768, patch ?, ? px input;" in text
    assert "| language model | `?`: ? layers, width 4096, vocabulary 0 |" in text
    assert "?, ? tokens per image" not in text and "? tokens per image" in text
    assert "Reduced configuration" not in text  # the published sizes: CheXficient ViT-B and Vicuna-7B widths
