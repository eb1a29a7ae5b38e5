"""Each evaluation task end to end on small phantom sets with a tiny model, plus the protocol checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import save_tiny_model

from eval.common import encode_images, load_model_and_processor
from eval.retrieval import deduplicate_texts, evaluate_retrieval
from eval.zero_shot import load_prompts


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from chexficient.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, num_train=60, num_test=40, image_size=64)  # 3 corrupt training files
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    save_tiny_model(folder)
    return folder


# ----- protocol checks on fixed embeddings ----------------------------------------------------------------------------


def test_prompt_files_are_validated(tmp_path):
    assert load_prompts("report") == "report" and load_prompts("paper") == "paper"  # the model's presets
    good = tmp_path / "prompts.json"
    good.write_text(json.dumps([["{c} seen", "no {c_lower}"]]))
    assert load_prompts(str(good)) == (("{c} seen", "no {c_lower}"),)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"positive": "{c}"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_prompts("nonexistent")


def test_retrieval_deduplicates_texts_and_ranks_both_directions():
    texts, ids = deduplicate_texts(["a", "b", "a", "c"])
    assert texts == ["a", "b", "c"] and ids.tolist() == [0, 1, 0, 2]
    image = torch.eye(3)[[0, 1, 2, 2]]  # image 3 looks like text "c" but its report is "a"
    text = torch.eye(3)
    result = evaluate_retrieval(image, text, np.array([0, 1, 2, 0]), k=(1, 2), num_resamples=20)
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    assert i2t["recall@1"]["value"] == 0.75 and i2t["mean_rank"]["value"] == pytest.approx((1 + 1 + 1 + 2) / 4)
    assert t2i["recall@1"]["value"] == 1.0 and t2i["num_queries"] == 3 and t2i["gallery_size"] == 4


# ----- tasks end to end -----------------------------------------------------------------------------------------------


def test_encode_images_skips_and_reports_unreadable_files(phantoms, model_dir):
    loaded = load_model_and_processor(model_dir, device="cpu")
    paths = [str(phantoms / "images" / "test" / f"test-{i:06d}.png") for i in range(3)]
    bad = phantoms / "not_an_image.png"
    bad.write_text("a report, not an image")
    encoded = encode_images(
        paths[:2] + [str(bad)] + paths[2:],
        loaded.image_processor,
        loaded.model.get_image_features,
        loaded.device,
        batch_size=2,
    )
    assert encoded.indices.tolist() == [0, 1, 3]
    assert encoded.skipped[0]["path"] == str(bad) and "not_an_image.png" in encoded.skipped[0]["error"]
    direct = loaded.model.get_image_features(loaded.image_processor(paths)["pixel_values"])
    torch.testing.assert_close(encoded.features, direct, atol=1e-5, rtol=1e-4)


def test_zero_shot_cli_end_to_end(phantoms, model_dir, tmp_path):
    from eval.zero_shot import main

    result = main(
        [
            "--model",
            str(model_dir),
            "--dataset",
            "phantom",
            "--root",
            str(phantoms),
            "--out_dir",
            str(tmp_path),
            "--num_resamples",
            "30",
            "--batch_size",
            "16",
        ]
    )
    written = json.loads((tmp_path / "zero_shot_phantom.json").read_text())
    assert written["num_images"] == 40 and written["metrics"] == json.loads(json.dumps(result["metrics"]))
    macro = written["metrics"]["macro_auroc"]
    assert 0 <= macro["ci_low"] <= macro["value"] <= macro["ci_high"] <= 1
    assert "| **macro** |" in (tmp_path / "zero_shot_phantom.md").read_text()
    from eval.datasets import load_classification

    data = load_classification("phantom", phantoms, "test")
    # every label is scored, or skipped when its known test labels are all positive or all negative
    defined = [label for label, column in zip(data.labels, data.targets.T) if len(set(column[column >= 0])) == 2]
    assert list(written["metrics"]["auroc"]) == defined and len(defined) >= 3
    assert written["metrics"]["skipped_classes"] == [label for label in data.labels if label not in defined]
    # The CLI's scores are the model's own zero-shot probabilities.
    loaded = load_model_and_processor(model_dir, device="cpu")
    probs = loaded.model.zero_shot_classify(
        data.labels, loaded.tokenizer, pixel_values=loaded.image_processor(data.image_paths)["pixel_values"]
    ).numpy()
    from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc

    assert macro["value"] == pytest.approx(multilabel_auc(probs, data.targets, data.labels)["macro_auroc"], abs=1e-6)


def test_retrieval_cli_end_to_end(phantoms, model_dir, tmp_path):
    from eval.retrieval import main

    main(
        [
            "--model",
            str(model_dir),
            "--dataset",
            "phantom",
            "--root",
            str(phantoms),
            "--out_dir",
            str(tmp_path),
            "--num_resamples",
            "20",
        ]
    )
    written = json.loads((tmp_path / "retrieval_phantom.json").read_text())
    assert written["num_images"] == 40 and 1 <= written["num_texts"] <= 40
    for direction in ("image_to_text", "text_to_image"):
        recalls = [written["metrics"][direction][f"recall@{k}"]["value"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and 0 <= recalls[0] and recalls[-1] <= 1
    assert "text to image" in (tmp_path / "retrieval_phantom.md").read_text()


def test_linear_probe_cli_caches_features_and_reports_seeds(phantoms, model_dir, tmp_path, monkeypatch):
    from eval import linear_probe

    argv = [
        "--model",
        str(model_dir),
        "--dataset",
        "phantom",
        "--root",
        str(phantoms),
        "--out_dir",
        str(tmp_path),
        "--label_fractions",
        "0.5,1.0",
        "--seeds",
        "0,1",
        "--epochs",
        "3",
        "--num_resamples",
        "20",
    ]
    first = linear_probe.main(argv)
    assert first["num_train"] + first["num_val"] == 57  # 60 training phantoms, 3 corrupt files skipped
    assert sorted(p.suffix for p in (tmp_path / "features").iterdir()) == [
        ".json",
        ".json",
        ".safetensors",
        ".safetensors",
    ]
    for entry in first["metrics"].values():
        assert [run["seed"] for run in entry["runs"]] == [0, 1]
        assert entry["macro_auroc"]["num_seeds"] == 2
        assert entry["macro_auroc"]["ci_low"] <= entry["macro_auroc"]["mean"] <= entry["macro_auroc"]["ci_high"]
    assert first["metrics"]["0.5"]["num_train"] == round(0.5 * first["num_train"])
    _check_saved_probe(first, phantoms, model_dir, tmp_path / "features")

    def no_encoding(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr("eval.common.encode_images", no_encoding)
    second = linear_probe.main(argv)
    assert second["metrics"]["1"]["macro_auroc"] == first["metrics"]["1"]["macro_auroc"]


def _check_saved_probe(result, phantoms, model_dir, cache_dir):
    """The probe the CLI saved is `CheXficientForImageClassification` with the head the eval trained: its
    probabilities are the eval head's on the cached embeddings, and its test AUROC is the one the eval reported."""
    from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc
    from eval.datasets import load_classification
    from eval.linear_probe import (
        FeatureSplit,
        cached_features,
        label_fraction_rows,
        split_off_validation,
        train_linear_head,
    )

    from modeling_chexficient import CheXficientForImageClassification

    saved = result["probe"]
    assert saved["path"] == str(cache_dir.parent / "phantom_probe") and saved["label_fraction"] == 1.0
    probe = CheXficientForImageClassification.from_pretrained(saved["path"]).eval()
    test_set = load_classification("phantom", phantoms, "test")
    assert probe.config.id2label == dict(enumerate(test_set.labels)) and probe.config.label2id["Fracture"] >= 0
    assert probe.config.problem_type == "multi_label_classification"
    loaded = load_model_and_processor(model_dir, device="cpu")
    train, test = (
        cached_features(loaded, load_classification("phantom", phantoms, split), cache_dir, split=split)
        for split in ("train", "test")
    )
    # The eval's head, trained again from the cache exactly as the CLI did (its default optimiser settings).
    train, val = split_off_validation(train, 0.1, seed=0)
    rows = label_fraction_rows(len(train.ids), saved["label_fraction"], saved["seed"])
    subset = FeatureSplit(train.features[rows], train.targets[rows], [train.ids[i] for i in rows])
    head, _ = train_linear_head(subset, val, epochs=3, seed=saved["seed"])
    paths = dict(zip(test_set.ids, test_set.image_paths))
    pixel_values = loaded.image_processor([paths[i] for i in test.ids])["pixel_values"]
    with torch.no_grad():
        logits = probe(pixel_values).logits
        torch.testing.assert_close(probe.get_image_features(pixel_values), test.features, atol=1e-5, rtol=1e-5)
        expected = torch.sigmoid(head(test.features[:5]))
    torch.testing.assert_close(torch.sigmoid(logits[:5]), expected, atol=1e-5, rtol=0)
    run = next(r for r in result["metrics"]["1"]["runs"] if r["seed"] == saved["seed"])
    auroc = multilabel_auc(torch.sigmoid(logits).numpy(), test.targets, test_set.labels)["macro_auroc"]
    assert auroc == pytest.approx(run["macro_auroc"]["value"], abs=1e-6)


def test_linear_head_learns_separable_features():
    from eval.linear_probe import FeatureSplit, train_linear_head

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(200, 2)).astype(np.float32)
    features = torch.from_numpy(np.concatenate([targets * 2 - 1, rng.normal(size=(200, 6))], 1).astype(np.float32))
    targets[:10, 1] = -1  # uncertain labels are left out of the loss
    split = FeatureSplit(features, targets, [str(i) for i in range(200)])
    head, history = train_linear_head(split, split, epochs=40, batch_size=64, lr=0.05)
    assert history[-1]["val_macro_auroc"] > 0.99
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_linear_head_keeps_the_best_validation_epoch_not_the_last():
    """A feature that separates the training labels perfectly but at a small scale, reversed on validation: the
    head first learns the noisy honest feature (validation AUROC rises), then the spurious one (it falls). The head
    returned is the one of the best validation epoch."""
    from chexficient.metrics.multilabel_auc.multilabel_auc import multilabel_auc
    from eval.linear_probe import FeatureSplit, train_linear_head

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(200, 1)).astype(np.float32)
    sign = targets * 2 - 1

    def split(spurious: float):
        honest = sign + rng.normal(scale=1.5, size=(200, 1))
        features = np.concatenate([honest, spurious * 0.5 * sign, rng.normal(size=(200, 2))], 1)
        return FeatureSplit(torch.from_numpy(features.astype(np.float32)), targets, [str(i) for i in range(200)])

    train, val = split(1.0), split(-1.0)
    head, history = train_linear_head(train, val, epochs=15, batch_size=50, lr=0.03)
    scores = [h["val_macro_auroc"] for h in history]
    best = int(np.argmax(scores))
    assert 0 < best < len(scores) - 1 and scores[best] - scores[-1] > 0.1  # a peak, then worse
    with torch.no_grad():
        returned = torch.sigmoid(head(val.features)).numpy()
    assert multilabel_auc(returned, val.targets, with_auprc=False)["macro_auroc"] == pytest.approx(scores[best])


def test_segmentation_predicts_where_the_logit_is_positive():
    """A pixel is predicted where sigmoid(logit) > 0.5, i.e. logit > 0: a logit of 0.3 is foreground."""
    from eval.segmentation import predict_masks

    class Identity(torch.nn.Module):  # the decoder's interface: L feature maps -> logits at the output size
        def forward(self, features, output_size):
            return features[0]

    logits = torch.tensor([-2.0, -0.3, -1e-3, 1e-3, 0.3, 0.49, 0.51, 2.0]).view(1, 1, 2, 4)
    features = torch.stack([logits, logits], dim=1)  # [N, L, K, h, w], as the cached feature maps are stacked
    predicted = predict_masks(Identity(), features, (2, 4), batch_size=1)
    assert predicted.dtype == torch.bool
    assert predicted.flatten().tolist() == [False, False, False, True, True, True, True, True]
    assert torch.equal(predicted, torch.sigmoid(logits) > 0.5)


def test_segmentation_cli_end_to_end(model_dir, tmp_path):
    from chexficient.phantoms import write_phantom_segmentation
    from eval.segmentation import main

    root = write_phantom_segmentation(tmp_path / "seg", num_train=8, num_val=4, num_test=4, image_size=64)
    result = main(
        [
            "--model",
            str(model_dir),
            "--dataset",
            "phantom_segmentation",
            "--root",
            str(root),
            "--out_dir",
            str(tmp_path / "out"),
            "--epochs",
            "3",
            "--decoder_channels",
            "16,8,8,8,8",
            "--batch_size",
            "4",
            "--num_resamples",
            "20",
        ]
    )
    assert result["num_levels"] == 3  # the tiny encoder has 2 layers: 3 hidden states
    assert len(result["history"]) == 3 and result["metrics"]["num_images"] == 4
    assert set(result["metrics"]["dice"]) == {"right lung", "left lung", "heart"}
    assert 0 <= result["metrics"]["mean_dice"]["value"] <= 1
    assert (tmp_path / "out" / "segmentation_phantom_segmentation.json").exists()


def test_unet_decoder_returns_raw_logits_at_the_input_size():
    from eval.segmentation import UNetDecoder, patch_feature_maps

    decoder = UNetDecoder(hidden_size=12, num_classes=3, channels=(16, 8, 8)).eval()
    states = [torch.randn(2, 1 + 9, 12) for _ in range(4)]  # CLS + 3x3 patches, 4 hidden states
    maps = patch_feature_maps(states, 3, (3, 3))
    assert [m.shape for m in maps] == [torch.Size([2, 12, 3, 3])] * 3
    torch.testing.assert_close(maps[0], states[-1][:, 1:].transpose(1, 2).reshape(2, 12, 3, 3))
    logits = decoder(maps, (42, 42))
    assert logits.shape == (2, 3, 42, 42)
    assert logits.min() < 0 < logits.max()  # no sigmoid / ReLU on the output
    assert isinstance(list(decoder.children())[-1], torch.nn.Conv2d)


def test_mask_geometry_follows_the_image_processor():
    from eval.segmentation import mask_to_model_grid

    from image_processing_chexficient import CheXficientImageProcessor

    processor = CheXficientImageProcessor(size={"shortest_edge": 10})
    masks = np.zeros((1, 40, 20), dtype=bool)
    masks[0, 18:22, :] = True  # a band across the middle survives the centre crop
    out = mask_to_model_grid(masks, processor)
    assert out.shape == (1, 10, 10) and out[0, 4:6].all() and not out[0, :3].any()


def test_report_aggregates_results_into_a_card_section(phantoms, model_dir, tmp_path):
    from chexficient.metrics.results import model_index_entries
    from eval.report import main as report_main
    from eval.retrieval import main as retrieval_main
    from eval.zero_shot import main as zero_shot_main

    common = [
        "--model",
        str(model_dir),
        "--dataset",
        "phantom",
        "--root",
        str(phantoms),
        "--out_dir",
        str(tmp_path),
        "--num_resamples",
        "10",
    ]
    zero_shot_main(common)
    retrieval_main(common)
    markdown = report_main([str(tmp_path)])
    assert "Zero-shot classification" in markdown and "Image-report retrieval" in markdown
    assert "| phantom | 40 |" in markdown and "per_class_auroc.png" in markdown
    assert (tmp_path / "per_class_auroc.png").stat().st_size > 1000
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert {e["task_type"] for e in index} == {"zero-shot-image-classification", "image-text-retrieval"}
    assert index == json.loads(
        json.dumps(
            model_index_entries(
                [json.loads((tmp_path / f).read_text()) for f in ("zero_shot_phantom.json", "retrieval_phantom.json")]
            )
        )
    )


def test_linear_probe_takes_any_hf_image_encoder(phantoms, tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from eval import linear_probe

    folder = tmp_path / "dinov2"
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    loaded = load_model_and_processor(folder, device="cpu")
    assert not loaded.is_chexficient and loaded.tokenizer is None
    result = linear_probe.main(
        [
            "--model",
            str(folder),
            "--dataset",
            "phantom",
            "--root",
            str(phantoms),
            "--out_dir",
            str(tmp_path / "out"),
            "--features",
            "backbone",
            "--label_fractions",
            "1.0",
            "--seeds",
            "0",
            "--epochs",
            "2",
            "--num_resamples",
            "10",
        ]
    )
    assert result["num_test"] == 40 and 0 <= result["metrics"]["1"]["macro_auroc"]["mean"] <= 1
    assert result["probe"] is None  # a head on raw pooled features: no CheXficient probe to save
    with pytest.raises(ValueError, match="text tower"):
        from eval.zero_shot import main as zero_shot_main

        zero_shot_main(["--model", str(folder), "--dataset", "phantom", "--root", str(phantoms)])
