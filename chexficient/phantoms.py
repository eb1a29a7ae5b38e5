"""Built-in synthetic chest-radiograph phantoms with template reports: the demo's and the tests' dataset.

Each phantom is rendered procedurally (body outline, lungs with vessel texture, heart, diaphragm, ribs, spine,
clavicles) and its findings change the image: a wider heart, a basal effusion with a meniscus, an apical
pneumothorax with a pleural line, airspace opacities, a nodule, a band of atelectasis, perihilar oedema, tubes and
leads, a broken rib. Labels are long-tailed (no finding dominant, fractures below 1%); the training split also has
near-duplicates, a few mismatched reports and a few corrupt files, as real corpora do. Everything is deterministic
by seed.

    python -m chexficient.phantoms outputs/phantoms --num-train 2000 --num-test 400
    python -m chexficient.phantoms outputs/phantom_seg --segmentation --num-train 160 --num-val 40 --num-test 80
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from .manifests import read_manifest


PHANTOM_FINDINGS: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Lung Lesion",
    "Atelectasis",
    "Edema",
    "Support Devices",
    "Fracture",
)
PHANTOM_LABELS: tuple[str, ...] = PHANTOM_FINDINGS + ("No Finding",)
# Independent per-finding prevalences; about half of the phantoms end up with no finding.
PREVALENCE: dict[str, float] = {
    "Cardiomegaly": 0.14,
    "Pleural Effusion": 0.12,
    "Pneumothorax": 0.015,
    "Consolidation": 0.08,
    "Lung Lesion": 0.04,
    "Atelectasis": 0.07,
    "Edema": 0.05,
    "Support Devices": 0.13,
    "Fracture": 0.007,
}
DUPLICATE_RATE = 0.03
MISMATCH_RATE = 0.01
CORRUPT_KINDS = ("empty", "truncated", "not_an_image")
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}

_POSITIVE = {
    "Cardiomegaly": [
        "The heart is enlarged.",
        "Cardiomegaly is present.",
        "{size} enlargement of the cardiac silhouette.",
    ],
    "Pleural Effusion": ["{size} {side} pleural effusion.", "There is a {size} {side} pleural effusion."],
    "Pneumothorax": ["{size} {side} pneumothorax.", "There is a {side} apical pneumothorax."],
    "Consolidation": ["Consolidation in the {side} {zone} lung.", "Airspace consolidation at the {side} {zone} zone."],
    "Lung Lesion": ["A {size} nodule in the {side} {zone} lung.", "There is a {side} {zone} lung mass."],
    "Atelectasis": ["Linear atelectasis at the {side} base.", "{side_cap} basilar atelectasis."],
    "Edema": ["Perihilar haziness consistent with pulmonary edema.", "Mild interstitial pulmonary edema."],
    "Support Devices": ["An endotracheal tube and a central line are in place.", "Support devices are present."],
    "Fracture": ["A displaced {side} rib fracture.", "There is a fracture of a {side} rib."],
}
_NEGATIVE = {
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Consolidation": ["No focal consolidation.", "No consolidation."],
    "Lung Lesion": ["No nodule or mass.", "No lung lesion."],
    "Atelectasis": ["No atelectasis."],
    "Edema": ["No pulmonary edema.", "No edema."],
    "Support Devices": [],
    "Fracture": ["No acute fracture.", "The ribs are intact."],
}
_NO_FINDING_FINDINGS = [
    "The lungs are clear. Heart size is normal.",
    "Clear lungs. Normal cardiomediastinal silhouette.",
]
_NO_FINDING_IMPRESSIONS = ["No acute cardiopulmonary process.", "Normal chest radiograph."]

# Label-only datasets: one sentence per label, as the paper builds pseudo-reports.
_PSEUDO_POSITIVE = ["There is {c}.", "Findings consistent with {c}.", "{c} is present.", "Evidence of {c}."]
_PSEUDO_NEGATIVE = ["There is no {c}.", "No evidence of {c}.", "{c} is absent."]
_PSEUDO_UNCERTAIN = ["{c} cannot be excluded.", "Possible {c}.", "Questionable {c}."]
_PSEUDO_NO_FINDING = ["No acute cardiopulmonary abnormality.", "The chest radiograph is normal."]


@dataclass
class PhantomSample:
    """One phantom: image, report and labels, plus the curation-relevant flags of the training split."""

    id: str
    image: np.ndarray
    findings: str
    impression: str
    labels: dict[str, int]
    duplicate_of: str | None = None
    mismatched: bool = False
    corrupt: str | None = None


# ----- rendering ---------------------------------------------------------------------------------------------------


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (periodic, by FFT) with standard deviation `sigma` pixels."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(field) * kernel, s=field.shape)


def _ellipse(x, y, cx, cy, rx, ry, softness=0.02):
    """Soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / softness, 0.0, 1.0)


def _band(distance, width, softness=0.01):
    return np.clip((width - np.abs(distance)) / softness, 0.0, 1.0)


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    return {
        "shift_x": rng.uniform(-0.04, 0.04),
        "shift_y": rng.uniform(-0.04, 0.04),
        "angle": rng.uniform(-0.06, 0.06),
        "scale": rng.uniform(0.93, 1.05),
        "lung_w": rng.uniform(0.26, 0.31),
        "lung_h": rng.uniform(0.5, 0.58),
        "heart_w": rng.uniform(0.19, 0.23),
        "dome": rng.uniform(0.5, 0.58),
        "contrast": rng.uniform(0.85, 1.15),
        "exposure": rng.uniform(-0.05, 0.05),
        "texture_seed": float(rng.integers(2**31)),
    }


def _patient_coordinates(a: Mapping[str, float], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates [H, W] in the patient's frame (shifted, rotated and scaled by the anatomy)."""
    grid = (np.arange(image_size) + 0.5) / image_size * 2 - 1
    y0, x0 = np.meshgrid(grid, grid, indexing="ij")
    cos, sin = np.cos(a["angle"]), np.sin(a["angle"])
    x = (cos * x0 - sin * y0) / a["scale"] - a["shift_x"]
    y = (sin * x0 + cos * y0) / a["scale"] - a["shift_y"]
    return x, y


def _lung_mask(x: np.ndarray, y: np.ndarray, a: Mapping[str, float], s: int) -> np.ndarray:
    return _ellipse(x, y, s * 0.37, -0.05, a["lung_w"], a["lung_h"], 0.04)


def _heart_mask(x: np.ndarray, y: np.ndarray, a: Mapping[str, float], enlarged: bool) -> np.ndarray:
    return _ellipse(x, y, 0.07, 0.24, a["heart_w"] * (1.55 if enlarged else 1.0), 0.27, 0.04)


def render_phantom(
    labels: Mapping[str, int],
    rng: np.random.Generator,
    image_size: int = 256,
    bit_depth: int = 8,
    anatomy: Mapping[str, float] | None = None,
    noise_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render one radiograph [H, W] (uint8, or uint16 over the full 16-bit range) with the labelled findings.

    Air is dark, bone and soft tissue bright (MONOCHROME2). `anatomy` reuses a patient's geometry (near-duplicates);
    `rng` places the findings and, unless `noise_rng` is given, seeds the quantum noise (so that repeated studies of
    one patient can share their findings and differ in noise).
    """
    a = dict(anatomy) if anatomy is not None else _anatomy(rng)
    side = 1 if rng.random() < 0.5 else -1  # which lung the unilateral findings affect (image left/right)
    derived_noise = np.random.default_rng(int(rng.integers(2**31)))  # independent of how many findings draw
    noise_rng = noise_rng if noise_rng is not None else derived_noise
    x, y = _patient_coordinates(a, image_size)
    texture_rng = np.random.default_rng(int(a["texture_seed"]))

    body = _ellipse(x, y, 0.0, 0.08, 0.86, 1.05, 0.05)
    image = 0.05 + 0.33 * body
    lungs = [_lung_mask(x, y, a, s) for s in (-1, 1)]
    lung = np.maximum(*lungs)
    vessels = _blur(texture_rng.standard_normal(x.shape), image_size / 96)
    vessels = vessels / (vessels.std() + 1e-8)
    hilum = np.exp(-(((np.abs(x) - 0.2) / 0.25) ** 2 + (y / 0.35) ** 2))
    markings = 0.03 * np.clip(vessels, 0, None) * (0.4 + hilum)
    image = image - 0.24 * lung + markings * lung
    heart = _heart_mask(x, y, a, bool(labels.get("Cardiomegaly")))
    image = np.maximum(image, 0.5 * heart + (1 - heart) * image)
    dome_curve = a["dome"] + 0.6 * (np.abs(x) - 0.37) ** 2  # two domes, highest under each lung
    diaphragm = np.clip((y - dome_curve) / 0.03, 0, 1)
    image = np.maximum(image, 0.45 * diaphragm * body)
    spine = _band(x, 0.055, 0.02) * (y > -0.85)
    image = image + 0.16 * spine * body
    for s in (-1, 1):
        clavicle = _band(y - (-0.62 + 0.18 * (s * x - 0.25)), 0.025) * (np.abs(x - s * 0.3) < 0.3)
        image = image + 0.14 * clavicle
    broken = int(rng.integers(2, 7)) if labels.get("Fracture") else -1
    for s in (-1, 1):
        for r in range(8):
            offset = -0.58 + r * 0.145
            curve = y - (offset + 0.35 * (s * x - 0.15) ** 2)
            extent = (s * x > 0.05) & (s * x < 0.72)
            if s == side and r == broken:  # a gap and a step in one rib
                gap = np.abs(s * x - 0.45) < 0.03
                curve = np.where(s * x > 0.45, curve - 0.035, curve)
                extent = extent & ~gap
            image = image + 0.075 * _band(curve, 0.022) * extent * body

    if labels.get("Pleural Effusion"):
        level = -0.05 + a["lung_h"] - rng.uniform(0.2, 0.45)  # from the lung base upwards
        meniscus = level - 0.25 * (side * x - 0.37) * (side * x > 0.2)
        fluid = np.clip((y - meniscus) / 0.04, 0, 1) * lungs[(side + 1) // 2]
        image = np.maximum(image, 0.42 * fluid + (1 - fluid) * image)
    if labels.get("Pneumothorax"):
        edge = np.sqrt((x - side * 0.37) ** 2 / (a["lung_w"] * 0.75) ** 2 + (y + 0.05) ** 2 / (a["lung_h"] * 0.9) ** 2)
        apical = (edge > 1.0) * lungs[(side + 1) // 2] * (y < 0.15)
        image = image - apical * (markings * lung + 0.05)
        image = image + 0.12 * _band(edge - 1.0, 0.012) * (y < 0.15) * lungs[(side + 1) // 2]
    if labels.get("Consolidation"):
        cy = rng.uniform(-0.3, 0.25)
        patch = sum(
            np.exp(-(((x - side * 0.37 - rng.normal(0, 0.06)) ** 2 + (y - cy - rng.normal(0, 0.06)) ** 2) / 0.006))
            for _ in range(5)
        )
        image = image + 0.22 * np.clip(patch, 0, 1) * lung
    if labels.get("Lung Lesion"):
        radius = rng.uniform(0.035, 0.07)
        cx, cy = side * rng.uniform(0.25, 0.45), rng.uniform(-0.4, 0.2)
        image = image + 0.28 * _ellipse(x, y, cx, cy, radius, radius, 0.3) * lung
    if labels.get("Atelectasis"):
        t = rng.uniform(-0.3, 0.3)
        u = (x - side * 0.37) * np.cos(t) + (y - (a["dome"] - 0.15)) * np.sin(t)
        v = -(x - side * 0.37) * np.sin(t) + (y - (a["dome"] - 0.15)) * np.cos(t)
        image = image + 0.2 * _ellipse(u, v, 0, 0, 0.2, 0.025, 0.4) * lung
    if labels.get("Edema"):
        haze = np.exp(-(((np.abs(x) - 0.2) / 0.22) ** 2 + ((y - 0.05) / 0.3) ** 2))
        image = image + 0.16 * haze * lung
    if labels.get("Support Devices"):
        tube = _band(x - 0.01 * np.sin(6 * y), 0.012) * (y > -1.0) * (y < -0.2)
        line = _band(y - (-0.5 + 0.9 * (x + 0.55) ** 2), 0.011) * (x > -0.55) * (x < 0.0)
        image = np.maximum(image, 0.95 * np.maximum(tube, line))
        for lx, ly in rng.uniform([-0.7, -0.8], [0.7, 0.7], size=(3, 2)):
            image = np.maximum(image, 0.95 * _ellipse(x, y, lx, ly, 0.03, 0.03, 0.3))

    image = (image + a["exposure"]) * a["contrast"]
    image = image + 0.012 * noise_rng.standard_normal(image.shape)
    image = np.clip(image, 0.0, 1.0)
    if bit_depth == 16:
        return np.round(image * 65535).astype(np.uint16)
    if bit_depth != 8:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}.")
    return np.round(image * 255).astype(np.uint8)


# ----- reports -------------------------------------------------------------------------------------------------------


def _sentence(template: str, rng: np.random.Generator) -> str:
    side = str(rng.choice(["right", "left"]))
    text = template.format(
        size=str(rng.choice(["small", "moderate", "large"])),
        side=side,
        side_cap=side.capitalize(),
        zone=str(rng.choice(["upper", "middle", "lower"])),
    )
    return text[0].upper() + text[1:]


def make_report(labels: Mapping[str, int], rng: np.random.Generator) -> tuple[str, str]:
    """(findings, impression) describing `labels` in radiology-report style.

    Like real reports, both normal and abnormal studies state some absent findings ("No pneumothorax.").
    """
    positives = [f for f in PHANTOM_FINDINGS if labels.get(f)]
    sentences = [_sentence(str(rng.choice(_POSITIVE[f])), rng) for f in positives]
    if not positives:
        sentences.append(str(rng.choice(_NO_FINDING_FINDINGS)))
    negatives = [f for f in PHANTOM_FINDINGS if not labels.get(f) and _NEGATIVE[f]]
    for finding in rng.permutation(negatives)[: int(rng.integers(2, 6))]:
        sentences.append(str(rng.choice(_NEGATIVE[str(finding)])))
    if not positives:
        return " ".join(sentences), str(rng.choice(_NO_FINDING_IMPRESSIONS))
    impression = " ".join(f"{f.lower().capitalize()}." for f in positives)
    return " ".join(sentences), impression


def pseudo_report_from_labels(labels: Mapping[str, float | None], rng: np.random.Generator) -> str:
    """Template report from structured labels: 1 positive, 0 negative, -1 uncertain, None/NaN skipped."""

    def present(value):
        return value is not None and not (isinstance(value, float) and np.isnan(value))

    no_finding = {k for k in labels if k.strip().lower() == "no finding"}
    others = {k: v for k, v in labels.items() if k not in no_finding}
    if any(present(labels[k]) and labels[k] == 1 for k in no_finding) and not any(
        present(v) and v != 0 for v in others.values()
    ):
        return str(rng.choice(_PSEUDO_NO_FINDING))
    sentences = []
    for name, value in others.items():
        if not present(value):
            continue
        pool = _PSEUDO_POSITIVE if value == 1 else _PSEUDO_UNCERTAIN if value == -1 else _PSEUDO_NEGATIVE
        sentences.append(str(rng.choice(pool)).format(c=name.lower()).capitalize())
    return " ".join(sentences)


# ----- datasets ------------------------------------------------------------------------------------------------------


def _sample_labels(rng: np.random.Generator) -> dict[str, int]:
    labels = {f: int(rng.random() < p) for f, p in PREVALENCE.items()}
    labels["No Finding"] = int(not any(labels.values()))
    return labels


def generate_phantoms(
    num_samples: int, *, seed: int = 0, split: str = "train", image_size: int = 256, bit_depth: int = 8
) -> list[PhantomSample]:
    """`num_samples` phantoms of one split, deterministic for (seed, split); only "train" has flagged samples."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}.")
    flagged = split == "train"
    plan = np.random.default_rng([seed, _SPLIT_CODES[split], 1])
    samples: list[PhantomSample] = []
    anatomies: list[dict[str, float]] = []
    for i in range(num_samples):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0, i])
        duplicate_of = None
        if flagged and samples and plan.random() < DUPLICATE_RATE:
            source = int(plan.integers(len(samples)))
            labels, anatomy = dict(samples[source].labels), dict(anatomies[source])
            anatomy["shift_x"] += rng.uniform(-0.01, 0.01)
            duplicate_of = samples[source].id
            findings, impression = samples[source].findings, samples[source].impression
        else:
            labels, anatomy = _sample_labels(rng), _anatomy(rng)
            findings, impression = make_report(labels, rng)
        image = render_phantom(labels, rng, image_size, bit_depth, anatomy=anatomy)
        samples.append(PhantomSample(f"{split}-{i:06d}", image, findings, impression, labels, duplicate_of))
        anatomies.append(anatomy)
    if flagged and num_samples >= 20:
        ids = plan.permutation(num_samples)
        num_mismatched = max(1, int(MISMATCH_RATE * num_samples))
        for i in ids[:num_mismatched]:
            donor = next(s for s in samples if s.labels != samples[i].labels)
            samples[i].findings, samples[i].impression, samples[i].mismatched = donor.findings, donor.impression, True
        for i, kind in zip(ids[num_mismatched : num_mismatched + len(CORRUPT_KINDS)], CORRUPT_KINDS):
            samples[i].corrupt = kind
    return samples


def _corrupt_bytes(kind: str, image: np.ndarray) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        import io

        buffer = io.BytesIO()
        PIL.Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()[: len(buffer.getvalue()) // 3]
    return b"FINDINGS: this file is a report, not an image.\n"


def write_phantom_dataset(
    output_dir: str | os.PathLike,
    *,
    num_train: int = 2000,
    num_test: int = 400,
    seed: int = 0,
    image_size: int = 256,
    bit_depth: int = 8,
) -> dict[str, Path]:
    """Write PNGs and `train.csv` / `test.csv` manifests (id, path, findings, impression, one column per label).

    Corrupt training samples are written as their corrupt bytes and stay in the manifest. Re-running with the same
    parameters returns at once.
    """
    import pandas as pd

    root = Path(output_dir)
    params = {
        "num_train": num_train,
        "num_test": num_test,
        "seed": seed,
        "image_size": image_size,
        "bit_depth": bit_depth,
    }
    meta_path = root / "phantoms.json"
    result = {"train": root / "train.csv", "test": root / "test.csv", "root": root}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == params:
        return result
    meta: dict = {"params": params}
    for split, count in (("train", num_train), ("test", num_test)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        samples = generate_phantoms(count, seed=seed, split=split, image_size=image_size, bit_depth=bit_depth)
        for sample in samples:
            path = folder / f"{sample.id}.png"
            if sample.corrupt:
                path.write_bytes(_corrupt_bytes(sample.corrupt, sample.image))
            else:
                PIL.Image.fromarray(sample.image).save(path)
            rows.append(
                {
                    "id": sample.id,
                    "path": str(path.relative_to(root)),
                    "findings": sample.findings,
                    "impression": sample.impression,
                    **sample.labels,
                }
            )
        pd.DataFrame(rows).to_csv(result[split], index=False)
        meta[f"{split}_prevalence"] = {k: float(np.mean([s.labels[k] for s in samples])) for k in PHANTOM_LABELS}
        if split == "train":
            meta["corrupt_ids"] = [s.id for s in samples if s.corrupt]
            meta["mismatched_ids"] = [s.id for s in samples if s.mismatched]
            meta["duplicate_ids"] = [s.id for s in samples if s.duplicate_of]
    meta_path.write_text(json.dumps(meta, indent=2))
    return result


def write_pretraining_splits(
    output_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    image_size: int = 256,
) -> dict[str, Path]:
    """Phantoms for a pretraining run: `train_split.csv`, a held-out `val_split.csv` of `num_val` clean rows (never
    corrupt, mismatched or duplicated) carved off the training phantoms, and `test.csv`. Returns the manifests."""
    written = write_phantom_dataset(
        output_dir, num_train=num_train + num_val, num_test=num_test, seed=seed, image_size=image_size
    )
    root = Path(output_dir)
    frame = read_manifest(written["train"])
    meta = json.loads((root / "phantoms.json").read_text())
    flagged = {i for key in ("corrupt_ids", "mismatched_ids", "duplicate_ids") for i in meta.get(key, [])}
    clean = frame.index[~frame["id"].isin(flagged)]
    val_rows = clean[-num_val:] if num_val else clean[:0]
    for name, part in (("val_split.csv", frame.loc[val_rows]), ("train_split.csv", frame.drop(index=val_rows))):
        partial = root / f".{name}.partial"
        part.to_csv(partial, index=False)
        os.replace(partial, root / name)  # atomic: a reader never sees a half-written manifest
    return {"train": root / "train_split.csv", "val": root / "val_split.csv", "test": written["test"], "root": root}


SEGMENTATION_CLASSES: tuple[str, ...] = ("right lung", "left lung", "heart")


def phantom_anatomy_masks(
    anatomy: Mapping[str, float], labels: Mapping[str, int], image_size: int = 256
) -> np.ndarray:
    """Bool masks [3, H, W] of the right lung (image left), left lung (image right) and heart of a phantom."""
    x, y = _patient_coordinates(anatomy, image_size)
    masks = [_lung_mask(x, y, anatomy, -1), _lung_mask(x, y, anatomy, 1)]
    masks.append(_heart_mask(x, y, anatomy, bool(labels.get("Cardiomegaly"))))
    return np.stack(masks) >= 0.5


def write_phantom_segmentation(
    output_dir: str | os.PathLike,
    *,
    num_train: int = 160,
    num_val: int = 40,
    num_test: int = 80,
    seed: int = 0,
    image_size: int = 256,
) -> Path:
    """Write a segmentation set of phantoms with lung and heart masks (the JSRT task in miniature).

    Layout: `images/<id>.png`, `masks/<class>/<id>.png` (0 or 255), `segmentation.csv` (id, split) and
    `segmentation.json` ({"classes": [...], "params": {...}}). Re-running with the same parameters returns at once.
    """
    import pandas as pd

    root = Path(output_dir)
    params = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "seed": seed, "image_size": image_size}
    meta_path = root / "segmentation.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == params:
        return root
    for folder in [root / "images", *(root / "masks" / name for name in SEGMENTATION_CLASSES)]:
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], 2, i])
            labels, anatomy = _sample_labels(rng), _anatomy(rng)
            sample_id = f"seg-{split}-{i:05d}"
            PIL.Image.fromarray(render_phantom(labels, rng, image_size, anatomy=anatomy)).save(
                root / "images" / f"{sample_id}.png"
            )
            for name, mask in zip(SEGMENTATION_CLASSES, phantom_anatomy_masks(anatomy, labels, image_size)):
                PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name / f"{sample_id}.png")
            rows.append({"id": sample_id, "split": split})
    pd.DataFrame(rows).to_csv(root / "segmentation.csv", index=False)
    meta_path.write_text(json.dumps({"classes": list(SEGMENTATION_CLASSES), "params": params}, indent=2))
    return root


def phantom_datasets(output_dir: str | os.PathLike, **kwargs):
    """The phantoms as a `datasets.DatasetDict` (image paths, reports, labels)."""
    import datasets

    written = write_phantom_dataset(output_dir, **kwargs)
    splits = {}
    for split in ("train", "test"):
        frame = __import__("pandas").read_csv(written[split])
        frame["image"] = [str(Path(output_dir) / p) for p in frame.pop("path")]
        splits[split] = datasets.Dataset.from_pandas(frame, preserve_index=False)
    return datasets.DatasetDict(splits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size", type=int, default=None, help="Image side in pixels (default 256; 128 with --archive)."
    )
    parser.add_argument("--bit-depth", type=int, default=8, choices=(8, 16))
    parser.add_argument(
        "--segmentation",
        action="store_true",
        help="Write the lung/heart segmentation set instead (--num-train, --num-val and --num-test images).",
    )
    parser.add_argument(
        "--num-val",
        type=int,
        default=None,
        help="Validation images (default 40 with --segmentation, 0 with --archive).",
    )
    parser.add_argument(
        "--archive",
        action="store_true",
        help="Write the archive-like corpus instead (chexficient.phantom_archive: patients with repeated studies, a "
        "dominant normal class, a long tail of rare findings, varied reports); --num-val adds a val split.",
    )
    args = parser.parse_args(argv)
    if args.archive:
        from .phantom_archive import write_archive_dataset

        written = write_archive_dataset(
            args.output_dir,
            num_train=args.num_train,
            num_val=0 if args.num_val is None else args.num_val,
            num_test=args.num_test,
            seed=args.seed,
            image_size=128 if args.image_size is None else args.image_size,
        )
        meta = json.loads((Path(args.output_dir) / "archive.json").read_text())
        for split in ("train", "val", "test"):
            if split in meta:
                print(
                    f"{split}: {written[split]} ({meta[split]['studies']} studies, {meta[split]['patients']} patients)"
                )
                for label, share in meta[split]["shares"].items():
                    print(f"  {label:<18} {share:6.1%}")
        return
    image_size = 256 if args.image_size is None else args.image_size
    if args.segmentation:
        root = write_phantom_segmentation(
            args.output_dir,
            num_train=args.num_train,
            num_val=40 if args.num_val is None else args.num_val,
            num_test=args.num_test,
            seed=args.seed,
            image_size=image_size,
        )
        print(f"segmentation phantoms with {', '.join(SEGMENTATION_CLASSES)} masks: {root}")
        return
    written = write_phantom_dataset(
        args.output_dir,
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        image_size=image_size,
        bit_depth=args.bit_depth,
    )
    meta = json.loads((Path(args.output_dir) / "phantoms.json").read_text())
    for split in ("train", "test"):
        print(f"{split}: {written[split]}")
        for label, share in meta[f"{split}_prevalence"].items():
            print(f"  {label:<18} {share:6.1%}")


if __name__ == "__main__":
    main()
