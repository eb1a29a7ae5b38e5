"""An archive-like phantom corpus: the regime the paper's curation is meant for, in miniature.

A clinical archive is not an i.i.d. sample of findings. This corpus has, by construction:

- **a dominant normal class** (about 59% No Finding) and **common findings saturated at the subset size**
  (Cardiomegaly 15%, Pleural Effusion 12%, Support Devices 12%: hundreds of studies even in a 22% random subset);
- **a long tail of rare findings**, each at most 2% (Pneumothorax, Consolidation, Lung Lesion, Atelectasis, Edema
  2%; Fracture 1.5%);
- **redundancy**: each patient has 1 + Poisson(`extra_studies`) studies (2.5 on average) that differ only by
  quantum noise, positioning (shift, rotation, scale, exposure) and report wording; the findings, their place and
  the anatomy are the patient's;
- **report wording varied enough that the text tower has to read it**: several phrasings per finding and per
  negative, shuffled sentence order, optional technique lines, and descriptions of what the image shows besides the
  findings (rotation, lung volumes, exposure), which tie each report to its own image.

Test splits hold one study per patient (an i.i.d. sample of patients). Patients of different seeds or splits are
disjoint, so a "foundation" corpus of another seed shares no patient with the pool.

    python -m chexficient.phantoms outputs/archive --archive --num-train 6000 --num-test 1500
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from .render import PHANTOM_FINDINGS, PHANTOM_LABELS, render_phantom, sample_anatomy


ARCHIVE_PREVALENCE: dict[str, float] = {
    "Cardiomegaly": 0.15,
    "Pleural Effusion": 0.12,
    "Support Devices": 0.12,
    "Pneumothorax": 0.02,
    "Consolidation": 0.02,
    "Lung Lesion": 0.02,
    "Atelectasis": 0.02,
    "Edema": 0.02,
    "Fracture": 0.015,
}
COMMON_FINDINGS: tuple[str, ...] = ("Cardiomegaly", "Pleural Effusion", "Support Devices")
RARE_FINDINGS: tuple[str, ...] = tuple(f for f in PHANTOM_FINDINGS if f not in COMMON_FINDINGS)
EXTRA_STUDIES = 1.5  # mean of the Poisson number of follow-up studies per patient
# How much one patient's studies differ in positioning (uniform half-widths, in the renderer's units).
STUDY_JITTER = {"shift_x": 0.015, "shift_y": 0.015, "angle": 0.025, "scale": 0.02, "exposure": 0.03, "contrast": 0.05}
STUDY_NOISE = 0.01  # extra quantum noise of each study (image intensity units, [0, 1])
_SPLIT_CODES = {"train": 10, "test": 11, "val": 12}

_POSITIVE = {
    "Cardiomegaly": [
        "The heart is enlarged.",
        "Cardiomegaly.",
        "{size_cap} cardiomegaly.",
        "The cardiac silhouette is enlarged.",
        "Enlarged cardiac silhouette.",
        "{size_cap} enlargement of the heart.",
    ],
    "Pleural Effusion": [
        "{size_cap} {side} pleural effusion.",
        "There is a {size} {side} pleural effusion.",
        "{side_cap} effusion with blunting of the costophrenic angle.",
        "Fluid layers in the {side} pleural space.",
        "Blunting of the {side} costophrenic angle from a {size} effusion.",
    ],
    "Pneumothorax": [
        "{size_cap} {side} pneumothorax.",
        "There is a {side} apical pneumothorax.",
        "A {side} pleural line with absent lung markings beyond it: pneumothorax.",
        "{side_cap} pneumothorax is seen at the apex.",
    ],
    "Consolidation": [
        "Consolidation in the {side} {zone} lung.",
        "Airspace consolidation at the {side} {zone} zone.",
        "{side_cap} {zone} zone airspace opacity, likely pneumonia.",
        "Patchy consolidation of the {side} {zone} lobe.",
    ],
    "Lung Lesion": [
        "A {size} nodule in the {side} {zone} lung.",
        "There is a {side} {zone} lung mass.",
        "A rounded {side} {zone} zone opacity, concerning for a mass.",
        "{size_cap} pulmonary nodule projecting over the {side} lung.",
    ],
    "Atelectasis": [
        "Linear atelectasis at the {side} base.",
        "{side_cap} basilar atelectasis.",
        "Plate-like atelectasis in the {side} lower zone.",
        "Subsegmental atelectasis at the {side} lung base.",
    ],
    "Edema": [
        "Perihilar haziness consistent with pulmonary edema.",
        "Mild interstitial pulmonary edema.",
        "Vascular congestion with perihilar edema.",
        "Bilateral perihilar opacities in keeping with edema.",
    ],
    "Support Devices": [
        "An endotracheal tube and a central line are in place.",
        "Support devices are present.",
        "Lines and tubes in standard position.",
        "A central venous catheter and monitoring leads overlie the chest.",
    ],
    "Fracture": [
        "A displaced {side} rib fracture.",
        "There is a fracture of a {side} rib.",
        "{side_cap} rib fracture with step-off.",
        "Acute fracture of a {side} lateral rib.",
    ],
}
_NEGATIVE = {
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly.", "The cardiac silhouette is within normal limits."],
    "Pleural Effusion": [
        "No pleural effusion.",
        "There is no pleural effusion.",
        "The costophrenic angles are sharp.",
    ],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No pleural air."],
    "Consolidation": ["No focal consolidation.", "No consolidation.", "No airspace opacity."],
    "Lung Lesion": ["No nodule or mass.", "No lung lesion.", "No suspicious pulmonary nodule."],
    "Atelectasis": ["No atelectasis.", "No volume loss."],
    "Edema": ["No pulmonary edema.", "No edema.", "No vascular congestion."],
    "Support Devices": [],
    "Fracture": ["No acute fracture.", "The ribs are intact.", "No displaced rib fracture."],
}
_NORMAL_FINDINGS = [
    "The lungs are clear.",
    "Clear lungs.",
    "The lungs are well aerated and clear.",
    "No focal airspace disease.",
]
_NORMAL_IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "No acute disease.",
    "No acute cardiopulmonary abnormality.",
    "Unremarkable chest radiograph.",
]
_TECHNIQUE = ["Frontal view of the chest.", "Portable AP view.", "PA view of the chest.", ""]


@dataclass
class ArchiveStudy:
    """One study of the archive: its image, report, labels and patient."""

    id: str
    patient_id: str
    image: np.ndarray
    findings: str
    impression: str
    labels: dict[str, int]


def sample_archive_labels(rng: np.random.Generator, prevalence: Mapping[str, float] = ARCHIVE_PREVALENCE) -> dict:
    """Independent findings at the archive's prevalences; No Finding when none is present."""
    labels = {f: int(rng.random() < prevalence[f]) for f in PHANTOM_FINDINGS}
    labels["No Finding"] = int(not any(labels.values()))
    return labels


def jittersample_anatomy(anatomy: Mapping[str, float], rng: np.random.Generator) -> dict[str, float]:
    """One study's positioning of a patient: the patient's anatomy, shifted, rotated, scaled and exposed anew."""
    study = dict(anatomy)
    for key, width in STUDY_JITTER.items():
        study[key] = study[key] + rng.uniform(-width, width)
    return study


def describe_image(anatomy: Mapping[str, float], rng: np.random.Generator) -> list[str]:
    """Sentences about what the image shows besides findings: rotation, lung volumes, exposure (each when marked)."""
    sentences = []
    if abs(anatomy["angle"]) > 0.035:
        side = "right" if anatomy["angle"] > 0 else "left"
        sentences.append(str(rng.choice([f"The patient is rotated to the {side}.", f"Mild {side}ward rotation."])))
    if anatomy["lung_h"] < 0.52:
        sentences.append(str(rng.choice(["Low lung volumes.", "Lung volumes are low."])))
    elif anatomy["lung_h"] > 0.565:
        sentences.append(str(rng.choice(["Lungs are well expanded.", "Lung volumes are high."])))
    exposure = (anatomy["exposure"] + 0.2) * anatomy["contrast"]
    if exposure > 0.27:
        sentences.append(str(rng.choice(["The film is overexposed.", "Overpenetrated study."])))
    elif exposure < 0.14:
        sentences.append(str(rng.choice(["The film is underexposed.", "Underpenetrated study."])))
    return sentences


def _fill(template: str, rng: np.random.Generator) -> str:
    side = str(rng.choice(["right", "left"]))
    size = str(rng.choice(["small", "moderate", "large", "mild"]))
    text = template.format(
        size=size,
        size_cap=size.capitalize(),
        side=side,
        side_cap=side.capitalize(),
        zone=str(rng.choice(["upper", "middle", "lower"])),
    )
    return text[0].upper() + text[1:]


def make_archive_report(labels: Mapping[str, int], anatomy: Mapping[str, float], rng: np.random.Generator):
    """(findings, impression) in varied report style: findings, some stated negatives and image descriptions in a
    shuffled order, an optional technique line, and an impression naming the positives in other words."""
    positives = [f for f in PHANTOM_FINDINGS if labels.get(f)]
    sentences = [_fill(str(rng.choice(_POSITIVE[f])), rng) for f in positives]
    if not positives:
        sentences.append(str(rng.choice(_NORMAL_FINDINGS)))
    negatives = [f for f in PHANTOM_FINDINGS if not labels.get(f) and _NEGATIVE[f]]
    for finding in rng.permutation(negatives)[: int(rng.integers(1, 5))]:
        sentences.append(str(rng.choice(_NEGATIVE[str(finding)])))
    sentences += describe_image(anatomy, rng)
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    technique = str(rng.choice(_TECHNIQUE))
    findings = " ".join(([technique] if technique else []) + sentences)
    if not positives:
        return findings, str(rng.choice(_NORMAL_IMPRESSIONS))
    named = [_fill(str(rng.choice(_POSITIVE[f])), rng) for f in positives]
    return findings, " ".join(named)


def generate_archive(
    num_studies: int,
    *,
    seed: int = 0,
    split: str = "train",
    image_size: int = 128,
    extra_studies: float = EXTRA_STUDIES,
) -> list[ArchiveStudy]:
    """`num_studies` studies of one split, deterministic for (seed, split). Train splits group studies by patient
    (1 + Poisson(`extra_studies`) each, in consecutive ids); test and val splits have one study per patient."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}.")
    code = _SPLIT_CODES[split]
    plan = np.random.default_rng([seed, code, 1])
    studies: list[ArchiveStudy] = []
    patient = 0
    while len(studies) < num_studies:
        count = 1 + int(plan.poisson(extra_studies)) if split == "train" else 1
        patient_rng = np.random.default_rng([seed, code, 0, patient])
        labels, anatomy = sample_archive_labels(patient_rng), sample_anatomy(patient_rng)
        findings_seed = int(patient_rng.integers(2**31))  # where the findings sit: the patient's
        patient_id = f"{split}-s{seed}-p{patient:06d}"
        for visit in range(min(count, num_studies - len(studies))):
            study_rng = np.random.default_rng([seed, code, 2, patient, visit])
            studysample_anatomy = jittersample_anatomy(anatomy, study_rng) if visit else anatomy
            image = render_phantom(
                labels,
                np.random.default_rng(findings_seed),
                image_size,
                anatomy=studysample_anatomy,
                noise_rng=np.random.default_rng([seed, code, 3, patient, visit]),
            )
            noise = study_rng.normal(0.0, STUDY_NOISE * 255, image.shape)
            image = np.clip(np.round(image + noise), 0, 255).astype(np.uint8)
            findings, impression = make_archive_report(labels, studysample_anatomy, study_rng)
            studies.append(ArchiveStudy(f"{patient_id}-v{visit}", patient_id, image, findings, impression, labels))
        patient += 1
    return studies


def write_archive_dataset(
    output_dir: str | os.PathLike,
    *,
    num_train: int = 6000,
    num_test: int = 1500,
    num_val: int = 0,
    seed: int = 0,
    image_size: int = 128,
    extra_studies: float = EXTRA_STUDIES,
) -> dict[str, Path]:
    """PNGs and `{split}.csv` manifests (id, patient_id, path, findings, impression, one column per label) and
    `archive.json` (parameters and per-split statistics). Re-running with the same parameters returns at once."""
    import pandas as pd

    root = Path(output_dir)
    params = {
        "kind": "archive",
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "seed": seed,
        "image_size": image_size,
        "extra_studies": extra_studies,
    }
    meta_path = root / "archive.json"
    splits = {"train": num_train, "val": num_val, "test": num_test}
    result = {split: root / f"{split}.csv" for split, count in splits.items() if count}
    result["root"] = root
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == params:
        return result
    meta: dict = {"params": params, "prevalence": ARCHIVE_PREVALENCE}
    for split, count in splits.items():
        if not count:
            continue
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        studies = generate_archive(count, seed=seed, split=split, image_size=image_size, extra_studies=extra_studies)
        rows = []
        for study in studies:
            path = folder / f"{study.id}.png"
            PIL.Image.fromarray(study.image).save(path)
            rows.append(
                {
                    "id": study.id,
                    "patient_id": study.patient_id,
                    "path": str(path.relative_to(root)),
                    "findings": study.findings,
                    "impression": study.impression,
                    **study.labels,
                }
            )
        frame = pd.DataFrame(rows)
        frame.to_csv(result[split], index=False)
        meta[split] = {
            "studies": len(frame),
            "patients": int(frame["patient_id"].nunique()),
            "shares": {label: float(frame[label].mean()) for label in PHANTOM_LABELS},
        }
    meta_path.write_text(json.dumps(meta, indent=2))
    return result


def archive_prompts(label: str) -> tuple[list[str], list[str]]:
    """Report-style prompt ensembles for one label, in the corpus's own wording: (positive sentences, negative
    sentences), each template filled for both sides. For zero-shot evaluation on archive phantoms."""
    if label == "No Finding":
        abnormal = [
            _fill(t, np.random.default_rng(i)) for i, f in enumerate(PHANTOM_FINDINGS) for t in _POSITIVE[f][:1]
        ]
        return list(_NORMAL_IMPRESSIONS + _NORMAL_FINDINGS), abnormal
    positives = [
        template.format(size="moderate", size_cap="Moderate", side=side, side_cap=side.capitalize(), zone="lower")
        for template in _POSITIVE[label]
        for side in ("right", "left")
    ]
    negatives = _NEGATIVE[label] or ["No lines or tubes.", "No support devices."]
    return list(dict.fromkeys(positives)), list(negatives)


__all__ = [
    "ARCHIVE_PREVALENCE",
    "COMMON_FINDINGS",
    "RARE_FINDINGS",
    "ArchiveStudy",
    "archive_prompts",
    "describe_image",
    "generate_archive",
    "make_archive_report",
    "write_archive_dataset",
]
