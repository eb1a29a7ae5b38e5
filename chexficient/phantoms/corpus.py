"""The phantom corpora written to disk: image-report datasets with train/test splits, pretraining splits with a clean
validation set, and the lung/heart segmentation set. Labels are long-tailed (no finding dominant, fractures below
1%); the training split also has near-duplicates, a few mismatched reports and a few corrupt files, as real corpora
do. Everything is deterministic by seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from ..data.manifests import read_manifest
from .render import (
    PHANTOM_LABELS,
    SEGMENTATION_CLASSES,
    make_report,
    phantom_anatomy_masks,
    render_phantom,
    sample_anatomy,
    sample_labels,
)


DUPLICATE_RATE = 0.03
MISMATCH_RATE = 0.01
CORRUPT_KINDS = ("empty", "truncated", "not_an_image")
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


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
            labels, anatomy = sample_labels(rng), sample_anatomy(rng)
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
            labels, anatomy = sample_labels(rng), sample_anatomy(rng)
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
