"""Rendering of the synthetic chest-radiograph phantoms: anatomy, findings drawn into the image, template reports.

Each phantom is rendered procedurally (body outline, lungs with vessel texture, heart, diaphragm, ribs, spine,
clavicles) and its findings change the image: a wider heart, a basal effusion with a meniscus, an apical
pneumothorax with a pleural line, airspace opacities, a nodule, a band of atelectasis, perihilar oedema, tubes and
leads, a broken rib. Everything is deterministic given the random generator.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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


def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
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


def patient_coordinates(a: Mapping[str, float], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates [H, W] in the patient's frame (shifted, rotated and scaled by the anatomy)."""
    grid = (np.arange(image_size) + 0.5) / image_size * 2 - 1
    y0, x0 = np.meshgrid(grid, grid, indexing="ij")
    cos, sin = np.cos(a["angle"]), np.sin(a["angle"])
    x = (cos * x0 - sin * y0) / a["scale"] - a["shift_x"]
    y = (sin * x0 + cos * y0) / a["scale"] - a["shift_y"]
    return x, y


def lung_mask(x: np.ndarray, y: np.ndarray, a: Mapping[str, float], s: int) -> np.ndarray:
    return _ellipse(x, y, s * 0.37, -0.05, a["lung_w"], a["lung_h"], 0.04)


def heart_mask(x: np.ndarray, y: np.ndarray, a: Mapping[str, float], enlarged: bool) -> np.ndarray:
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
    a = dict(anatomy) if anatomy is not None else sample_anatomy(rng)
    side = 1 if rng.random() < 0.5 else -1  # which lung the unilateral findings affect (image left/right)
    derived_noise = np.random.default_rng(int(rng.integers(2**31)))  # independent of how many findings draw
    noise_rng = noise_rng if noise_rng is not None else derived_noise
    x, y = patient_coordinates(a, image_size)
    texture_rng = np.random.default_rng(int(a["texture_seed"]))

    body = _ellipse(x, y, 0.0, 0.08, 0.86, 1.05, 0.05)
    image = 0.05 + 0.33 * body
    lungs = [lung_mask(x, y, a, s) for s in (-1, 1)]
    lung = np.maximum(*lungs)
    vessels = _blur(texture_rng.standard_normal(x.shape), image_size / 96)
    vessels = vessels / (vessels.std() + 1e-8)
    hilum = np.exp(-(((np.abs(x) - 0.2) / 0.25) ** 2 + (y / 0.35) ** 2))
    markings = 0.03 * np.clip(vessels, 0, None) * (0.4 + hilum)
    image = image - 0.24 * lung + markings * lung
    heart = heart_mask(x, y, a, bool(labels.get("Cardiomegaly")))
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


def sample_labels(rng: np.random.Generator) -> dict[str, int]:
    labels = {f: int(rng.random() < p) for f, p in PREVALENCE.items()}
    labels["No Finding"] = int(not any(labels.values()))
    return labels


SEGMENTATION_CLASSES: tuple[str, ...] = ("right lung", "left lung", "heart")


def phantom_anatomy_masks(
    anatomy: Mapping[str, float], labels: Mapping[str, int], image_size: int = 256
) -> np.ndarray:
    """Bool masks [3, H, W] of the right lung (image left), left lung (image right) and heart of a phantom."""
    x, y = patient_coordinates(anatomy, image_size)
    masks = [lung_mask(x, y, anatomy, -1), lung_mask(x, y, anatomy, 1)]
    masks.append(heart_mask(x, y, anatomy, bool(labels.get("Cardiomegaly"))))
    return np.stack(masks) >= 0.5
