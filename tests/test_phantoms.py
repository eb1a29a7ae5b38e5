"""The built-in phantoms: determinism, visible findings, long tail, reports, files on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from chexficient.data.manifests import pseudo_report_from_labels
from chexficient.phantoms import (
    PHANTOM_FINDINGS,
    PHANTOM_LABELS,
    PREVALENCE,
    generate_phantoms,
    render_phantom,
    sample_anatomy,
    write_phantom_dataset,
)


SIZE = 128


def _render(labels, seed=3):
    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(np.random.default_rng(99))
    return render_phantom(labels, rng, SIZE, anatomy=anatomy).astype(float)


def _region(image, y0, y1, x0, x1):
    """Mean over a box given in [-1, 1] image coordinates."""

    def index(v):
        return int((v + 1) / 2 * SIZE)

    return image[index(y0) : index(y1), index(x0) : index(x1)]


def test_deterministic_by_seed_and_split():
    a, b = generate_phantoms(6, seed=1, image_size=64), generate_phantoms(6, seed=1, image_size=64)
    assert all(np.array_equal(x.image, y.image) and x.findings == y.findings for x, y in zip(a, b))
    c = generate_phantoms(6, seed=2, image_size=64)
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    test = generate_phantoms(6, seed=1, split="test", image_size=64)
    assert test[0].id == "test-000000" and not np.array_equal(test[0].image, a[0].image)


@pytest.mark.parametrize("finding", PHANTOM_FINDINGS)
def test_every_finding_changes_the_image(finding):
    normal, abnormal = _render({}), _render({finding: 1})
    assert np.array_equal(_render({}), normal)  # same seed, same noise: any difference is the finding
    assert (np.abs(abnormal - normal) > 10).sum() >= 40  # a visible structure, not a few pixels


def test_findings_change_the_expected_regions():
    normal = _render({})
    heart = _render({"Cardiomegaly": 1})
    # a wider heart brightens the zone beside the normal heart border
    assert _region(heart, 0.1, 0.4, -0.3, -0.18).mean() > _region(normal, 0.1, 0.4, -0.3, -0.18).mean() + 10
    effusion = _render({"Pleural Effusion": 1})
    lower = [
        _region(img, 0.25, 0.45, -0.6, -0.15).mean() + _region(img, 0.25, 0.45, 0.15, 0.6).mean()
        for img in (normal, effusion)
    ]
    assert lower[1] > lower[0] + 10  # an opaque lung base
    ptx = _render({"Pneumothorax": 1})
    assert np.abs(ptx - normal)[: SIZE // 2].sum() > np.abs(ptx - normal)[SIZE // 2 :].sum()  # apical


def test_sixteen_bit_uses_the_full_range():
    image = render_phantom({}, np.random.default_rng(0), 64, bit_depth=16)
    assert image.dtype == np.uint16 and image.max() > 256 * 100
    assert len(np.unique(image)) > 2000  # more levels than 8 bits can hold


def test_long_tailed_labels():
    samples = generate_phantoms(1500, seed=0, image_size=16)
    share = {k: np.mean([s.labels[k] for s in samples]) for k in PHANTOM_LABELS}
    assert 0.45 <= share["No Finding"] <= 0.62
    assert share["Fracture"] < 0.01 and share["Pneumothorax"] < 0.03
    for finding, prevalence in PREVALENCE.items():
        assert abs(share[finding] - prevalence) < 0.03, finding


def test_reports_follow_labels_except_mismatches():
    samples = generate_phantoms(300, seed=0, image_size=16)
    keywords = {
        "Cardiomegaly": ("heart is enlarged", "cardiomegaly", "cardiac silhouette"),
        "Pleural Effusion": ("effusion",),
        "Support Devices": ("tube", "devices"),
    }
    for sample in samples:
        if sample.mismatched or sample.duplicate_of:
            continue
        text = (sample.findings + " " + sample.impression).lower()
        if sample.labels["No Finding"]:
            assert "clear" in text
        for finding, words in keywords.items():
            if sample.labels[finding]:
                assert any(w in text for w in words), (finding, text)
    assert sum(s.mismatched for s in samples) >= 1 and sum(s.duplicate_of is not None for s in samples) >= 3
    assert sum(s.corrupt is not None for s in samples) == 3


def test_written_dataset(tmp_path):
    written = write_phantom_dataset(tmp_path, num_train=60, num_test=20, image_size=32)
    train, test = pd.read_csv(written["train"]), pd.read_csv(written["test"])
    assert list(train.columns[:4]) == ["id", "path", "findings", "impression"]
    assert list(train.columns[4:]) == list(PHANTOM_LABELS) and len(train) == 60 and len(test) == 20
    flagged = generate_phantoms(60, seed=0, image_size=32)
    corrupt = {s.id for s in flagged if s.corrupt}
    for row in train.itertuples():
        if row.id in corrupt:
            with pytest.raises((OSError, SyntaxError, ValueError)):
                PIL.Image.open(tmp_path / row.path).load()
        else:
            assert PIL.Image.open(tmp_path / row.path).size == (32, 32)
    assert not any(
        s.corrupt or s.mismatched or s.duplicate_of for s in generate_phantoms(20, split="test", image_size=32)
    )
    mtime = written["train"].stat().st_mtime_ns
    write_phantom_dataset(tmp_path, num_train=60, num_test=20, image_size=32)  # same parameters: untouched
    assert written["train"].stat().st_mtime_ns == mtime


def test_pseudo_reports():
    rng = np.random.default_rng(0)
    text = pseudo_report_from_labels(
        {"Cardiomegaly": 1.0, "Edema": 0.0, "Pneumonia": -1.0, "Fracture": None, "Nodule": float("nan")}, rng
    )
    sentences = text.split(". ")
    assert len(sentences) == 3 and "cardiomegaly" in sentences[0].lower()
    assert "edema" in sentences[1].lower() and "pneumonia" in sentences[2].lower()
    assert "fracture" not in text.lower() and "nodule" not in text.lower()
    normal = pseudo_report_from_labels({"No Finding": 1.0, "Edema": 0.0, "Fracture": None}, rng)
    assert "normal" in normal.lower() or "no acute" in normal.lower()
