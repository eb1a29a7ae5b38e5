"""The evaluate modules and the bootstrap against direct scikit-learn / numpy computations on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from chexficient.metrics import METRIC_NAMES, load_metric
from chexficient.metrics.bootstrap import bootstrap_ci, flatten_metrics, seed_summary
from chexficient.metrics.dice.dice import dice_per_image
from chexficient.metrics.multilabel_auc.multilabel_auc import binary_auprc, binary_auroc, multilabel_auc
from chexficient.metrics.retrieval_recall.retrieval_recall import retrieval_ranks


@pytest.fixture(scope="module")
def multilabel_inputs():
    rng = np.random.default_rng(7)
    targets = rng.integers(0, 2, size=(60, 4)).astype(np.int64)
    targets[rng.random((60, 4)) < 0.15] = -1  # uncertain labels, masked per class
    targets[:, 3] = np.where(targets[:, 3] == 1, 1, -1)  # class 3: positives and unknowns only -> skipped
    scores = np.round(rng.random((60, 4)) + 0.4 * (targets == 1), 2)  # rounded: ties exercise mid-ranks
    return scores, targets


def test_multilabel_auc_module_matches_sklearn(multilabel_inputs):
    scores, targets = multilabel_inputs
    labels = ["Atelectasis", "Edema", "Effusion", "Hernia"]
    result = load_metric("multilabel_auc").compute(predictions=scores, references=targets, labels=labels)
    expected_auroc, expected_auprc = {}, {}
    for c, label in enumerate(labels[:3]):
        known = targets[:, c] != -1
        expected_auroc[label] = roc_auc_score(targets[known, c], scores[known, c])
        expected_auprc[label] = average_precision_score(targets[known, c], scores[known, c])
    assert result["skipped_classes"] == ["Hernia"]
    assert result["auroc"] == pytest.approx(expected_auroc, abs=1e-12)
    assert result["auprc"] == pytest.approx(expected_auprc, abs=1e-12)
    assert result["macro_auroc"] == pytest.approx(np.mean(list(expected_auroc.values())), abs=1e-12)
    assert result["macro_auprc"] == pytest.approx(np.mean(list(expected_auprc.values())), abs=1e-12)


def test_binary_auc_helpers_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for size in (2, 9, 200):
        truth = rng.integers(0, 2, size)
        truth[:2] = [0, 1]
        scores = np.round(rng.random(size), 1)
        assert binary_auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
        assert binary_auprc(truth, scores) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


def test_multilabel_auc_rejects_mismatched_shapes_and_labels():
    with pytest.raises(ValueError, match="same shape"):
        multilabel_auc(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="labels"):
        multilabel_auc(np.zeros((3, 2)), np.zeros((3, 2)), ["only one"])
    assert np.isnan(multilabel_auc(np.zeros((3, 1)), np.ones((3, 1)))["macro_auroc"])


def test_retrieval_module_matches_argsort_ranks():
    rng = np.random.default_rng(1)
    similarity = rng.normal(size=(25, 40))
    correct = rng.integers(0, 40, size=25)
    result = load_metric("retrieval_recall").compute(
        predictions=similarity, references=[[int(c)] for c in correct], k=[1, 5, 10]
    )
    order = np.argsort(-similarity, axis=1)
    ranks = np.array([int(np.flatnonzero(order[q] == correct[q])[0]) + 1 for q in range(25)])
    for k in (1, 5, 10):
        assert result[f"recall@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert result["mean_rank"] == pytest.approx(ranks.mean())
    assert result["median_rank"] == pytest.approx(np.median(ranks))
    assert result["gallery_size"] == 40 and result["num_queries"] == 25


def test_retrieval_ranks_take_the_best_of_several_correct_items():
    similarity = np.array([[0.9, 0.8, 0.1, 0.7], [0.2, 0.3, 0.4, 0.5]])
    positives = np.array([[False, False, True, True], [True, False, False, False]])
    assert retrieval_ranks(similarity, positives).tolist() == [3, 4]
    with pytest.raises(ValueError, match="no correct gallery item"):
        retrieval_ranks(similarity, np.zeros_like(positives))


def test_dice_module_matches_numpy():
    rng = np.random.default_rng(5)
    predictions = rng.random((6, 2, 8, 8)) > 0.5
    references = rng.random((6, 2, 8, 8)) > 0.4
    predictions[0, 1] = references[0, 1] = False  # empty vs empty scores 1
    references[1, 0] = False  # empty reference, non-empty prediction scores 0
    expected = np.zeros((6, 2))
    for n in range(6):
        for k in range(2):
            p, r = predictions[n, k], references[n, k]
            expected[n, k] = 1.0 if p.sum() + r.sum() == 0 else 2 * (p & r).sum() / (p.sum() + r.sum())
    assert expected[1, 0] == 0.0 and expected[0, 1] == 1.0
    np.testing.assert_allclose(dice_per_image(predictions, references), expected)
    result = load_metric("dice").compute(
        predictions=predictions.reshape(6, 2, -1).astype(np.int8),
        references=references.reshape(6, 2, -1).astype(np.int8),
        class_names=["lung", "heart"],
    )
    assert result["dice"] == pytest.approx({"lung": expected[:, 0].mean(), "heart": expected[:, 1].mean()})
    assert result["mean_dice"] == pytest.approx(expected.mean())


def test_every_metric_loads_offline_by_path():
    import evaluate

    from chexficient.metrics import METRICS_DIR

    for name in METRIC_NAMES:
        assert isinstance(evaluate.load(str(METRICS_DIR / name)), evaluate.Metric)
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("accuracy")


def test_bootstrap_percentiles_match_a_direct_computation():
    values = np.random.default_rng(0).normal(size=50)
    result = bootstrap_ci(lambda rows: {"mean": values[rows].mean()}, 50, num_resamples=300, seed=11)["mean"]
    rng = np.random.default_rng(11)
    draws = [values[rng.integers(0, 50, 50)].mean() for _ in range(300)]
    assert result["value"] == pytest.approx(values.mean())
    assert result["ci_low"] == pytest.approx(np.percentile(draws, 2.5))
    assert result["ci_high"] == pytest.approx(np.percentile(draws, 97.5))
    assert result["ci_low"] < result["value"] < result["ci_high"]
    again = bootstrap_ci(lambda rows: {"mean": values[rows].mean()}, 50, num_resamples=300, seed=11)["mean"]
    assert again == result


def test_bootstrap_leaves_undefined_resamples_out():
    truth = np.array([1] + [0] * 9)  # most resamples lose the single positive: AUROC undefined there
    scores = np.linspace(1, 0, 10)
    result = bootstrap_ci(lambda rows: multilabel_auc(scores[rows], truth[rows]), 10, num_resamples=200, seed=0)[
        "macro_auroc"
    ]
    assert result["value"] == 1.0
    assert 0 < result["num_resamples"] < 200


def test_seed_summary_is_mean_plus_minus_1_96_standard_errors():
    summary = seed_summary([0.70, 0.74, 0.72])
    se = np.std([0.70, 0.74, 0.72], ddof=1) / np.sqrt(3)
    assert summary["mean"] == pytest.approx(0.72)
    assert summary["ci_low"] == pytest.approx(0.72 - 1.96 * se)
    assert summary["ci_high"] == pytest.approx(0.72 + 1.96 * se)
    assert seed_summary([0.5])["ci_low"] == 0.5


def test_flatten_metrics_keeps_scalars_only():
    flat = flatten_metrics({"macro": 0.5, "auroc": {"Edema": 0.7}, "skipped": ["Hernia"], "n": 3, "ok": True})
    assert flat == {"macro": 0.5, "auroc/Edema": 0.7, "n": 3.0}
