"""Benchmark dataset adapters: official on-disk layouts -> classification, retrieval and segmentation sets.

Every adapter reads only index files (CSV, TXT, JSON) and directory listings at load time; images are never decoded
and segmentation masks are decoded lazily by `SegmentationSet.read_mask`. A missing file, folder or column raises
`DatasetLayoutError` naming the dataset, what is missing and the full path.

Layouts (root = the folder passed to the loader):

Classification
- chexpert (test): `groundtruth.csv` (column `Study`, one row per study; image = the study's `view1_frontal.jpg`)
  or `test_labels.csv` (column `Path`), in root or root/CheXpert; images under root or root/CheXpert.
  split "valid" (alias "val") / "train": `{split}.csv` of CheXpert-v1.0(-small) (column `Path`, frontal rows only,
  blank -> 0, -1 kept).
- mimic: `test.csv` (Path, ViewPosition, 14 labels) in root or root/2.0.0/yulequan, or the MIMIC-CXR-JPG files
  `mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]` + `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`; AP/PA only.
- nih: `Data_Entry_2017*.csv` + `test_list.txt` ("test") / `train_val_list.txt` ("train" = "trainval"); images in
  root/images, root/data or root/images_0xx/images.
- vindr_cxr / vindr_pcxr: `image_labels_{split}.csv` in root or root/annotations; images `{split}_png/<id>.png`
  or `{split}/<id>.dicom`. Several reader rows per image are merged by any-positive.
- siim_ptx: RLE CSV (`train-rle*.csv` or `stage_2_train.csv`; ImageId, EncodedPixels) + `png-images-{split}[-512]/`.
- pneumonia2017: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*` (root may also be chest_xray or one split).
- tbx11k: `lists/TBX11K_{train,val}.txt` + `imgs/<line>`; "test" reads the val list (test labels are not public).
- phantom: `{train,test}.csv` written by `train.phantoms.write_phantom_dataset`.

Retrieval
- chexpert_5x200: `chexpert_5x200.csv` (Path) + `df_chexpert_plus_240401.csv` (path_to_image, section_findings,
  section_impression); text = impression + " " + findings.
- mimic: `master.csv` (Path, split, ViewPosition, findings, impression) in root or root/2.0.0/yulequan, or the
  MIMIC-CXR-JPG split/metadata files + `mimic_cxr_sectioned.csv` (study, impression, findings); text = findings +
  " " + impression.
- phantom: `test.csv`; text = findings + " " + impression.

Segmentation
- jsrt: `All247images/*.IMG` (or `images/*.IMG|png`) + SCR `fold{1,2}/masks/<class>/<id>.gif` (also under `scratch/`
  or `SCR/`). Split: `splits.csv` (id, split) if present, else SCR fold2 -> test and fold1 -> train, with the fold1
  ids whose SHA-1 bucket is below 20% -> val.
- siim_ptx: RLE CSV + `png-images-{train,val,test}[-512]/` (split from the folder) or `png_images/` (split from
  `splits.csv`, else by SHA-1 bucket 70/10/20). The RLE canvas is 1024x1024; masks are resized to the image.
- vindr_ribcxr: `{train,val,test}/img/*.png` + `{split}/Vindr_RibCXR_{split}_mask.json` (also under root/data).
- phantom_segmentation: `images/<id>.png`, `masks/<class>/<id>.png`, `segmentation.csv` (id, split),
  `segmentation.json` ({"classes": [...]}).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import PIL.Image
import PIL.ImageDraw


PathLike = str | os.PathLike


class DatasetLayoutError(FileNotFoundError):
    """A benchmark folder lacks a file, folder or column its adapter needs; the message names it and its path."""


# ----- containers ----------------------------------------------------------------------------------------------------


@dataclass
class ClassificationSet:
    """Images with multi-label targets: 1 positive, 0 negative, -1 uncertain (masked by the metrics)."""

    name: str
    labels: list[str]
    image_paths: list[str]
    targets: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)


@dataclass
class RetrievalSet:
    """Images paired with their report text (texts may repeat; retrieval de-duplicates them)."""

    name: str
    image_paths: list[str]
    texts: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)


@dataclass
class SegmentationSet:
    """Images with lazily decoded multi-label masks (bool [K, H, W] at each image's own resolution)."""

    name: str
    classes: list[str]
    image_paths: list[str]
    splits: list[str]
    ids: list[str]
    mask_reader: Callable[[int], np.ndarray]
    image_reader: Callable[[int], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_mask(self, index: int) -> np.ndarray:
        """Bool masks [K, H, W] of sample `index`."""
        return self.mask_reader(index)

    def read_image(self, index: int) -> np.ndarray | str:
        """The decoded image where the image processor cannot read the file (raw JSRT), else the path."""
        if self.image_reader is not None:
            return self.image_reader(index)
        return self.image_paths[index]

    def subset(self, split: str) -> SegmentationSet:
        """The samples of one split, with readers re-indexed to the subset."""
        keep = [i for i, s in enumerate(self.splits) if s == split]
        mask_reader, image_reader = self.mask_reader, self.image_reader
        return SegmentationSet(
            name=self.name,
            classes=list(self.classes),
            image_paths=[self.image_paths[i] for i in keep],
            splits=[self.splits[i] for i in keep],
            ids=[self.ids[i] for i in keep],
            mask_reader=lambda j: mask_reader(keep[j]),
            image_reader=None if image_reader is None else (lambda j: image_reader(keep[j])),
        )


# ----- label lists (reference section 4.2; order = target column order) ---------------------------------------------

CHEXPERT_LABELS = [
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
]
LABELS: dict[str, list[str]] = {
    "chexpert": list(CHEXPERT_LABELS),
    "mimic": list(CHEXPERT_LABELS),
    "nih": [
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural Thickening",
        "Hernia",
        "No Finding",
    ],
    "vindr_cxr": [
        "Aortic enlargement",
        "Atelectasis",
        "Calcification",
        "Cardiomegaly",
        "Clavicle fracture",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Enlarged PA (Pulmonary Artery)",
        "ILD (Interstitial Lung Disease)",
        "Infiltration",
        "Lung Opacity",
        "Lung cavity",
        "Lung cyst",
        "Mediastinal shift",
        "Nodule/Mass",
        "Pleural effusion",
        "Pleural thickening",
        "Pneumothorax",
        "Pulmonary fibrosis",
        "Rib fracture",
        "COPD (Chronic Obstructive Pulmonary Disease)",
        "Lung tumor",
        "Pneumonia",
        "Tuberculosis",
        "Other lesion",
        "Other disease",
        "No finding",
    ],
    "vindr_pcxr": [
        "Bronchitis",
        "Bronchopneumonia",
        "Bronchiolitis",
        "Situs inversus",
        "Pneumonia",
        "Pleuropneumonia",
        "Diaphragmatic hernia",
        "Tuberculosis",
        "Congenital emphysema",
        "CPAM (Congenital Pulmonary Airway Malformation)",
        "Hyaline membrane disease",
        "Mediastinal tumor",
        "Lung tumor",
        "Other disease",
        "No finding",
    ],
    "siim_ptx": ["Pneumothorax"],
    "pneumonia2017": ["Pneumonia"],
    "tbx11k": ["Tuberculosis"],
}
# Column spellings found in the official CSVs besides the display name and its short form (parenthesis dropped).
_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "Lung Opacity": ("Airspace Opacity",),
    "Other disease": ("Other diseases",),
    "Bronchopneumonia": ("Brocho-pneumonia", "Broncho-pneumonia"),
    "Pleuropneumonia": ("Pleuro-pneumonia",),
    "Diaphragmatic hernia": ("Diagphramatic hernia",),
}
JSRT_CLASSES = ["left lung", "right lung", "heart", "left clavicle", "right clavicle"]
RIBCXR_CLASSES = [f"R{i}" for i in range(1, 11)] + [f"L{i}" for i in range(1, 11)]
# SIIM-ACR encodes masks on the 1024 x 1024 DICOM grid (height, width).
SIIM_RLE_SHAPE = (1024, 1024)
JSRT_SIDE = 2048
_SPLITS = ("train", "val", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


# ----- helpers -------------------------------------------------------------------------------------------------------


def _missing(dataset: str, what: str, path: PathLike) -> DatasetLayoutError:
    return DatasetLayoutError(f"{dataset}: missing {what}: {os.fspath(path)}")


def _need_file(dataset: str, path: Path, what: str = "file") -> Path:
    if not path.is_file():
        raise _missing(dataset, what, path)
    return path


def _need_dir(dataset: str, path: Path, what: str = "folder") -> Path:
    if not path.is_dir():
        raise _missing(dataset, what, path)
    return path


def _first_existing(dataset: str, candidates: Sequence[Path], what: str, kind: str = "file") -> Path:
    """The first candidate that exists as a file (kind="file") or folder (kind="dir"), else DatasetLayoutError."""
    for path in candidates:
        if path.is_file() if kind == "file" else path.is_dir():
            return path
    tried = ", ".join(os.fspath(p) for p in candidates)
    raise DatasetLayoutError(f"{dataset}: missing {what}; looked for {tried}")


def _read_csv(
    dataset: str, path: Path, columns: Iterable[str] = (), str_columns: Iterable[str] = (), **kwargs
) -> pd.DataFrame:
    """Read a CSV (column names stripped of whitespace) and check that `columns` are present."""
    _need_file(dataset, path, "file")
    frame = pd.read_csv(path, dtype={c: str for c in str_columns}, **kwargs)
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in columns:
        _need_column(dataset, frame, column, path)
    return frame


def _need_column(dataset: str, frame: pd.DataFrame, column: str, path: Path) -> None:
    if column not in frame.columns:
        raise DatasetLayoutError(f"{dataset}: missing column {column!r} in {os.fspath(path)}")


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


def _label_columns(dataset: str, frame: pd.DataFrame, labels: Sequence[str], path: Path) -> list[str]:
    """The CSV column of each display label: by name, short form (no parenthesis), '_' for ' ', or known alias."""
    by_name = {_normalise(c): c for c in frame.columns}
    columns = []
    for label in labels:
        short = re.sub(r"\s*\(.*\)\s*$", "", label)
        for candidate in (label, short, *_COLUMN_ALIASES.get(label, ())):
            if _normalise(candidate) in by_name:
                columns.append(by_name[_normalise(candidate)])
                break
        else:
            raise DatasetLayoutError(f"{dataset}: missing column {short!r} (label {label!r}) in {os.fspath(path)}")
    return columns


def _targets(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Label columns -> float32 [N, C]; blanks/NaN -> 0, -1 (uncertain) kept."""
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
    return np.nan_to_num(values, nan=0.0).reshape(len(frame), len(columns))


def _path_resolver(dataset: str, example: str, bases: Sequence[Path]) -> Callable[[str], str]:
    """Find which base folder (and how many leading components to drop) makes `example` an existing path.

    Index files write image paths relative to different folders (CheXpert's 'CheXpert-v1.0-small/train/…', MIMIC's
    'files/…'); one probe with the first row decides the rule for all rows, so loading stays one stat per base.
    """
    if os.path.isabs(example) and os.path.exists(example):
        return lambda path: path
    parts = PurePosixPath(str(example).replace("\\", "/")).parts
    tried = []
    for strip in (0, 1):
        for base in bases:
            if len(parts) <= strip:
                continue
            candidate = base.joinpath(*parts[strip:])
            tried.append(os.fspath(candidate))
            if candidate.exists():
                return lambda path, base=base, strip=strip: os.fspath(
                    base.joinpath(*PurePosixPath(str(path).replace("\\", "/")).parts[strip:])
                )
    raise DatasetLayoutError(f"{dataset}: missing image {example!r}; looked for {', '.join(tried)}")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a sample id (SHA-1), for splits that do not depend on file order."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def hash_split(key: str, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> str:
    """Deterministic train/val/test assignment of `key` with the given fractions."""
    value = _hash_fraction(key)
    if value < fractions[0]:
        return "train"
    return "val" if value < fractions[0] + fractions[1] else "test"


def _splits_file(dataset: str, root: Path, ids: Sequence[str]) -> list[str] | None:
    """Splits from an optional `root/splits.csv` (id, split), or None when the file is absent."""
    path = root / "splits.csv"
    if not path.is_file():
        return None
    frame = _read_csv(dataset, path, ("id", "split"), str_columns=("id",))
    table = dict(zip(frame["id"], frame["split"].str.strip().str.lower()))
    missing = [i for i in ids if i not in table]
    if missing:
        raise DatasetLayoutError(f"{dataset}: id {missing[0]!r} has no row in {os.fspath(path)}")
    return [table[i] for i in ids]


def _check_split(dataset: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {list(allowed)}, got {split!r}.")


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    with PIL.Image.open(path) as image:
        return image.size


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W] mask -> bool mask at `size` = (width, height), nearest neighbour."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    image = PIL.Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize(size, PIL.Image.Resampling.NEAREST)) > 127


def _read_binary_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image (GIF/PNG, any mode) -> bool [H, W] (nonzero = foreground), resized to `size` if given."""
    with PIL.Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    return mask if size is None else _resize_mask(mask, size)


def _join_text(*parts: object) -> str:
    return " ".join(str(p).strip() for p in parts if isinstance(p, str) and p.strip())


# ----- classification ------------------------------------------------------------------------------------------------


def _chexpert(root: Path, split: str = "test") -> ClassificationSet:
    name = "chexpert"
    _check_split(name, split, ("test", "valid", "val", "train"))
    split = "valid" if split == "val" else split
    labels = LABELS[name]
    if split == "test":
        csv = _first_existing(
            name,
            [root / f for f in ("groundtruth.csv", "test_labels.csv", "test.csv")]
            + [root / "CheXpert" / f for f in ("groundtruth.csv", "test_labels.csv", "test.csv")],
            "test ground truth CSV",
        )
        frame = _read_csv(name, csv, str_columns=("Path", "Study"))
        key = "Study" if "Study" in frame.columns else "Path"
        _need_column(name, frame, key, csv)
    else:
        csv = _first_existing(
            name,
            [root / f"{split}.csv"] + [root / d / f"{split}.csv" for d in ("CheXpert-v1.0", "CheXpert-v1.0-small")],
            f"{split} CSV",
        )
        frame = _read_csv(name, csv, ("Path",), str_columns=("Path",))
        key = "Path"
    if key == "Path":
        frontal = ~frame["Path"].str.lower().str.contains("lateral")
        if "Frontal/Lateral" in frame.columns:
            frontal &= frame["Frontal/Lateral"].astype(str).str.lower() != "lateral"
        frame = frame[frontal].reset_index(drop=True)
    columns = _label_columns(name, frame, labels, csv)
    bases = [root, root / "CheXpert", csv.parent, root.parent]
    if frame.empty:
        return ClassificationSet(name, list(labels), [], np.zeros((0, len(labels)), np.float32), [])
    resolve = _path_resolver(name, frame[key].iloc[0], bases)
    if key == "Path":
        paths = [resolve(p) for p in frame["Path"]]
    else:
        paths = [_study_frontal_image(name, Path(resolve(s))) for s in frame["Study"]]
    return ClassificationSet(name, list(labels), paths, _targets(frame, columns), [str(k) for k in frame[key]])


def _study_frontal_image(dataset: str, study: Path) -> str:
    """The first frontal view (view1_frontal.jpg) of a CheXpert study folder."""
    if not study.is_dir():
        raise _missing(dataset, "study folder", study)
    images = [p for p in _list_images(study) if "lateral" not in p.name.lower()]
    if not images:
        raise _missing(dataset, "frontal image in study folder", study)
    view1 = [p for p in images if p.name.lower().startswith("view1")]
    return os.fspath((view1 or images)[0])


_MIMIC_SPLIT_NAMES = {"train": "train", "val": "validate", "valid": "validate", "validate": "validate", "test": "test"}


def _mimic_file(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "2.0.0", root / "mimic-cxr-jpg" / "2.0.0"):
        for suffix in (".csv", ".csv.gz"):
            if (folder / (stem + suffix)).is_file():
                return folder / (stem + suffix)
    return None


def _mimic_official(name: str, root: Path, split: str) -> pd.DataFrame:
    """MIMIC-CXR-JPG split + metadata files -> frontal images of one split (dicom_id, study_id, path)."""
    split_csv, meta_csv = _mimic_file(root, "mimic-cxr-2.0.0-split"), _mimic_file(root, "mimic-cxr-2.0.0-metadata")
    if split_csv is None or meta_csv is None:
        raise _missing(name, "mimic-cxr-2.0.0-split.csv / mimic-cxr-2.0.0-metadata.csv", root)
    splits = _read_csv(name, split_csv, ("dicom_id", "study_id", "subject_id", "split"), str_columns=("dicom_id",))
    meta = _read_csv(name, meta_csv, ("dicom_id", "ViewPosition"), str_columns=("dicom_id",))
    frame = splits[splits["split"] == _MIMIC_SPLIT_NAMES[split]].merge(
        meta[["dicom_id", "ViewPosition"]], on="dicom_id"
    )
    frame = frame[frame["ViewPosition"].isin(["AP", "PA"])].reset_index(drop=True)
    files = _need_dir(name, split_csv.parent / "files", "image folder")
    frame["path"] = [
        os.fspath(files / f"p{str(s)[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
        for s, t, d in zip(frame["subject_id"], frame["study_id"], frame["dicom_id"])
    ]
    return frame


def _mimic_prepared(name: str, root: Path, filename: str) -> Path | None:
    for folder in (root, root / "2.0.0" / "yulequan"):
        if (folder / filename).is_file():
            return folder / filename
    return None


def _mimic(root: Path, split: str = "test") -> ClassificationSet:
    name = "mimic"
    _check_split(name, split, tuple(_MIMIC_SPLIT_NAMES))
    labels = LABELS[name]
    csv = _mimic_prepared(name, root, f"{split}.csv")
    if csv is not None:
        frame = _read_csv(name, csv, ("Path", "ViewPosition"), str_columns=("Path",))
        frame = frame[frame["ViewPosition"].isin(["AP", "PA"])].reset_index(drop=True)
        columns = _label_columns(name, frame, labels, csv)
        if frame.empty:
            return ClassificationSet(name, list(labels), [], np.zeros((0, len(labels)), np.float32), [])
        bases = [root, csv.parent, root / "2.0.0", root / "mimic-cxr-jpg" / "2.0.0"]
        resolve = _path_resolver(name, frame["Path"].iloc[0], bases)
        paths = [resolve(p) for p in frame["Path"]]
        ids = [PurePosixPath(str(p)).stem for p in frame["Path"]]
        return ClassificationSet(name, list(labels), paths, _targets(frame, columns), ids)
    if _mimic_file(root, "mimic-cxr-2.0.0-split") is None:
        raise DatasetLayoutError(
            f"{name}: missing {split}.csv in {os.fspath(root)} or {os.fspath(root / '2.0.0' / 'yulequan')}, "
            f"and missing mimic-cxr-2.0.0-split.csv in {os.fspath(root)}"
        )
    frame = _mimic_official(name, root, split)
    chexpert_csv = _mimic_file(root, "mimic-cxr-2.0.0-chexpert")
    if chexpert_csv is None:
        raise _missing(name, "mimic-cxr-2.0.0-chexpert.csv", root)
    chexpert = _read_csv(name, chexpert_csv, ("study_id",))
    columns = _label_columns(name, chexpert, labels, chexpert_csv)
    frame = frame.merge(chexpert[["study_id", *columns]], on="study_id", how="left")
    return ClassificationSet(
        name, list(labels), list(frame["path"]), _targets(frame, columns), list(frame["dicom_id"])
    )


def _nih(root: Path, split: str = "test") -> ClassificationSet:
    name = "nih"
    _check_split(name, split, ("test", "train", "trainval"))
    labels = LABELS[name]
    entry = _first_existing(
        name, [root / "Data_Entry_2017.csv", root / "Data_Entry_2017_v2020.csv"], "Data_Entry_2017.csv"
    )
    frame = _read_csv(name, entry, ("Image Index", "Finding Labels"), str_columns=("Image Index",))
    list_file = _need_file(name, root / ("test_list.txt" if split == "test" else "train_val_list.txt"), "split list")
    wanted = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    findings = dict(zip(frame["Image Index"], frame["Finding Labels"].fillna("")))
    index = {_normalise(label): c for c, label in enumerate(labels)}
    folders = [d for d in (root / "images", root / "data") if d.is_dir()]
    folders += sorted(d / "images" for d in root.glob("images_*") if (d / "images").is_dir())
    folders += sorted(d for d in root.glob("images_*") if d.is_dir() and not (d / "images").is_dir())
    if not folders:
        raise DatasetLayoutError(
            f"{name}: missing image folder; looked for {os.fspath(root / 'images')}, {os.fspath(root / 'data')}, "
            f"{os.fspath(root / 'images_0xx' / 'images')}"
        )
    location = {}
    for folder in folders:
        for entry_name in os.listdir(folder):
            location.setdefault(entry_name, folder)
    targets = np.zeros((len(wanted), len(labels)), np.float32)
    paths = []
    for row, image in enumerate(wanted):
        if image not in findings:
            raise DatasetLayoutError(f"{name}: image {image!r} of {os.fspath(list_file)} has no row in {entry}")
        if image not in location:
            raise _missing(name, f"image {image!r} (searched {', '.join(map(os.fspath, folders))})", root / image)
        paths.append(os.fspath(location[image] / image))
        for finding in str(findings[image]).split("|"):
            if not finding.strip():
                continue
            if _normalise(finding) not in index:
                raise ValueError(f"{name}: unknown finding {finding!r} for {image} in {entry}")
            targets[row, index[_normalise(finding)]] = 1.0
    return ClassificationSet(name, list(labels), paths, targets, wanted)


def _vindr(name: str, root: Path, split: str) -> ClassificationSet:
    _check_split(name, split, ("test", "train"))
    labels = LABELS[name]
    filename = f"image_labels_{split}.csv"
    csv = _first_existing(name, [root / filename, root / "annotations" / filename], filename)
    frame = _read_csv(name, csv, ("image_id",), str_columns=("image_id",))
    columns = _label_columns(name, frame, labels, csv)
    # Training images carry one row per radiologist: a finding is positive if any reader marked it.
    values = frame[["image_id"]].copy()
    values[columns] = _targets(frame, columns)
    merged = values.groupby("image_id", sort=False)[columns].max()
    ids = [str(i) for i in merged.index]
    png_dir, dicom_dir = root / f"{split}_png", root / split
    if png_dir.is_dir():
        paths = [os.fspath(png_dir / f"{i}.png") for i in ids]
    elif dicom_dir.is_dir():
        suffix = ".dicom"
        if ids and not (dicom_dir / f"{ids[0]}.dicom").exists():
            suffix = next((s for s in (".dcm", ".png") if (dicom_dir / f"{ids[0]}{s}").exists()), ".dicom")
        paths = [os.fspath(dicom_dir / f"{i}{suffix}") for i in ids]
    else:
        raise DatasetLayoutError(
            f"{name}: missing image folder; looked for {os.fspath(png_dir)}, {os.fspath(dicom_dir)}"
        )
    if paths and not os.path.exists(paths[0]):
        raise _missing(name, "image", paths[0])
    return ClassificationSet(name, list(labels), paths, merged.to_numpy(np.float32), ids)


def _vindr_cxr(root: Path, split: str = "test") -> ClassificationSet:
    return _vindr("vindr_cxr", root, split)


def _vindr_pcxr(root: Path, split: str = "test") -> ClassificationSet:
    return _vindr("vindr_pcxr", root, split)


_SIIM_CSVS = ("train-rle_zhihong.csv", "train-rle.csv", "stage_2_train.csv")


def _siim_rle_table(name: str, root: Path) -> tuple[Path, dict[str, list[str]]]:
    """ImageId -> its RLE strings ('-1' = no pneumothorax), from the first SIIM RLE CSV found."""
    csv = _first_existing(name, [root / f for f in _SIIM_CSVS], "RLE CSV")
    frame = _read_csv(name, csv, ("ImageId", "EncodedPixels"), str_columns=("ImageId", "EncodedPixels"))
    table: dict[str, list[str]] = {}
    for image_id, rle in zip(frame["ImageId"].str.strip(), frame["EncodedPixels"].fillna("-1")):
        table.setdefault(image_id, []).append(str(rle).strip())
    return csv, table


def _siim_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split in _SPLITS:
        for folder in (f"png-images-{split}-512", f"png-images-{split}", f"{split}_png"):
            if (root / folder).is_dir():
                found[split] = root / folder
                break
    return found


def _siim_images(name: str, folder: Path, table: dict[str, list[str]], csv: Path) -> list[Path]:
    images = _list_images(folder)
    for image in images:
        if image.stem not in table:
            raise DatasetLayoutError(f"{name}: image {os.fspath(image)} has no row in {os.fspath(csv)}")
    return images


def _siim_ptx(root: Path, split: str = "test") -> ClassificationSet:
    name = "siim_ptx"
    _check_split(name, split, _SPLITS)
    csv, table = _siim_rle_table(name, root)
    folder = _siim_split_dirs(root).get(split)
    if folder is None:
        raise _missing(
            name, f"image folder png-images-{split}-512 (or png-images-{split})", root / f"png-images-{split}-512"
        )
    images = _siim_images(name, folder, table, csv)
    targets = np.array([[float(any(r != "-1" for r in table[p.stem]))] for p in images], np.float32).reshape(-1, 1)
    return ClassificationSet(
        name, list(LABELS[name]), [os.fspath(p) for p in images], targets, [p.stem for p in images]
    )


def _pneumonia2017(root: Path, split: str = "test") -> ClassificationSet:
    name = "pneumonia2017"
    _check_split(name, split, _SPLITS)
    if (root / "NORMAL").is_dir() and (root / "PNEUMONIA").is_dir():
        folder = root
    else:
        folder = _first_existing(name, [root / "chest_xray" / split, root / split], f"{split} folder", kind="dir")
    paths, targets, ids = [], [], []
    for cls, target in (("NORMAL", 0.0), ("PNEUMONIA", 1.0)):
        for image in _list_images(_need_dir(name, folder / cls, f"{cls} folder")):
            paths.append(os.fspath(image))
            targets.append([target])
            ids.append(f"{cls}/{image.stem}")
    return ClassificationSet(name, list(LABELS[name]), paths, np.array(targets, np.float32).reshape(-1, 1), ids)


def _tbx11k(root: Path, split: str = "test") -> ClassificationSet:
    name = "tbx11k"
    _check_split(name, split, ("test", "val", "train"))
    list_file = _need_file(name, root / "lists" / f"TBX11K_{'train' if split == 'train' else 'val'}.txt", "list")
    images = _need_dir(name, root / "imgs", "image folder")
    lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    targets = []
    for line in lines:
        category = line.split("/", 1)[0].lower()
        if category not in ("tb", "health", "sick"):
            raise ValueError(f"{name}: line {line!r} of {os.fspath(list_file)} is not tb/, health/ or sick/.")
        targets.append([float(category == "tb")])
    paths = [os.fspath(images / line) for line in lines]
    if paths and not os.path.exists(paths[0]):
        raise _missing(name, "image", paths[0])
    ids = [str(PurePosixPath(line).with_suffix("")) for line in lines]
    return ClassificationSet(name, list(LABELS[name]), paths, np.array(targets, np.float32).reshape(-1, 1), ids)


def _phantom_frame(name: str, root: Path, split: str) -> tuple[Path, pd.DataFrame]:
    csv = root / f"{split}.csv"
    frame = _read_csv(name, csv, ("id", "path", "findings", "impression"), str_columns=("id", "path"))
    return csv, frame


def _phantom(root: Path, split: str = "test") -> ClassificationSet:
    name = "phantom"
    _csv, frame = _phantom_frame(name, root, split)
    labels = list(frame.columns[list(frame.columns).index("impression") + 1 :])
    paths = [os.fspath(root / p) for p in frame["path"]]
    return ClassificationSet(name, labels, paths, _targets(frame, labels), list(frame["id"]))


# ----- retrieval -----------------------------------------------------------------------------------------------------


def _chexpert_key(path: str) -> str:
    """'CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg' -> 'train/patient1/study1/view1_frontal'."""
    text = str(path).replace("\\", "/")
    match = re.search(r"(?:^|/)((?:train|valid|test)/patient.*)$", text)
    return str(PurePosixPath(match.group(1) if match else text).with_suffix(""))


def _chexpert_5x200(root: Path) -> RetrievalSet:
    name = "chexpert_5x200"
    pairs_csv = _first_existing(
        name, [root / "chexpert_5x200.csv", root / "CheXpert-v1.0" / "chexpert_5x200.csv"], "chexpert_5x200.csv"
    )
    reports_csv = _first_existing(
        name,
        [root / "df_chexpert_plus_240401.csv", root / "CheXpert-v1.0" / "df_chexpert_plus_240401.csv"],
        "df_chexpert_plus_240401.csv",
    )
    pairs = _read_csv(name, pairs_csv, ("Path",), str_columns=("Path",))
    reports = _read_csv(
        name,
        reports_csv,
        ("path_to_image", "section_findings", "section_impression"),
        str_columns=("path_to_image", "section_findings", "section_impression"),
    )
    text = {
        _chexpert_key(p): _join_text(i, f)
        for p, f, i in zip(reports["path_to_image"], reports["section_findings"], reports["section_impression"])
    }
    keep = [(p, text[_chexpert_key(p)]) for p in pairs["Path"] if text.get(_chexpert_key(p))]
    if not keep:
        return RetrievalSet(name, [], [], [])
    bases = [root, root / "CheXpert-v1.0", root / "CheXpert-v1.0-small", pairs_csv.parent, root.parent]
    resolve = _path_resolver(name, keep[0][0], bases)
    return RetrievalSet(name, [resolve(p) for p, _ in keep], [t for _, t in keep], [_chexpert_key(p) for p, _ in keep])


def _mimic_retrieval(root: Path) -> RetrievalSet:
    name = "mimic"
    csv = _mimic_prepared(name, root, "master.csv")
    if csv is not None:
        frame = _read_csv(
            name,
            csv,
            ("Path", "split", "ViewPosition", "findings", "impression"),
            str_columns=("Path", "findings", "impression"),
        )
        frame = frame[(frame["split"] == "test") & frame["ViewPosition"].isin(["AP", "PA"])]
        texts = [_join_text(f, i) for f, i in zip(frame["findings"], frame["impression"])]
        rows = [(p, t) for p, t in zip(frame["Path"], texts) if t]
        if not rows:
            return RetrievalSet(name, [], [], [])
        bases = [root, csv.parent, root / "2.0.0", root / "mimic-cxr-jpg" / "2.0.0"]
        resolve = _path_resolver(name, rows[0][0], bases)
        return RetrievalSet(
            name, [resolve(p) for p, _ in rows], [t for _, t in rows], [PurePosixPath(p).stem for p, _ in rows]
        )
    sections = _mimic_file(root, "mimic_cxr_sectioned")
    if sections is None or _mimic_file(root, "mimic-cxr-2.0.0-split") is None:
        raise DatasetLayoutError(
            f"{name}: missing master.csv in {os.fspath(root)} or {os.fspath(root / '2.0.0' / 'yulequan')}, and "
            f"missing mimic-cxr-2.0.0-split.csv + mimic_cxr_sectioned.csv in {os.fspath(root)}"
        )
    frame = _mimic_official(name, root, "test")
    reports = _read_csv(
        name, sections, ("study", "findings", "impression"), str_columns=("study", "findings", "impression")
    )
    text = {
        str(s).lstrip("s"): _join_text(f, i)
        for s, f, i in zip(reports["study"], reports["findings"], reports["impression"])
    }
    rows = [(p, text.get(str(s), ""), d) for p, s, d in zip(frame["path"], frame["study_id"], frame["dicom_id"])]
    rows = [r for r in rows if r[1]]
    return RetrievalSet(name, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _phantom_retrieval(root: Path) -> RetrievalSet:
    name = "phantom"
    _csv, frame = _phantom_frame(name, root, "test")
    texts = [_join_text(f, i) for f, i in zip(frame["findings"], frame["impression"])]
    return RetrievalSet(name, [os.fspath(root / p) for p in frame["path"]], texts, list(frame["id"]))


# ----- segmentation --------------------------------------------------------------------------------------------------


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """SIIM-ACR run-length string -> bool [height, width].

    The SIIM convention: pixels are numbered column by column (the transposed image, row-major), each pair is
    (offset from the end of the previous run, run length), and '-1' or an empty string means an empty mask.
    """
    flat = np.zeros(height * width, dtype=bool)
    text = str(rle).strip()
    if text in ("", "-1"):
        return flat.reshape(height, width)
    numbers = np.asarray(text.split(), dtype=np.int64)
    position = 0
    for offset, length in zip(numbers[0::2], numbers[1::2]):
        position += int(offset)
        flat[position : position + int(length)] = True
        position += int(length)
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """Bool [H, W] -> SIIM-ACR relative run-length string ('-1' when empty); the inverse of `rle_decode`."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    if not flat.any():
        return "-1"
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    previous_end = np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s - p} {e - s}" for s, e, p in zip(starts, ends, previous_end))


def _read_jsrt_raw(path: str) -> np.ndarray:
    """JSRT .IMG (big-endian 12-bit, square, no header) -> float32 [H, W] in [0, 1], bone bright."""
    raw = np.fromfile(path, dtype=">u2")
    side = int(round(np.sqrt(raw.size)))
    if side * side != raw.size:
        raise ValueError(f"jsrt: {path} holds {raw.size} pixels, not a square raw image.")
    # JSRT stores optical density: 0 is white. Invert so that air is dark, as in every other dataset.
    return (1.0 - np.minimum(raw.reshape(side, side), 4095).astype(np.float32) / 4095.0).astype(np.float32)


def _jsrt_size(path: str) -> tuple[int, int]:
    if path.lower().endswith(".img"):
        side = int(round(np.sqrt(os.path.getsize(path) / 2)))
        return side, side
    return _image_size(path)


def _jsrt_split(image_id: str, fold: str) -> str:
    """SCR fold2 -> test; fold1 -> train, or val for ids whose SHA-1 bucket is below 0.2; no folds -> 70/10/20."""
    if fold == "fold2":
        return "test"
    if fold == "fold1":
        return "val" if _hash_fraction(image_id) < 0.2 else "train"
    return hash_split(image_id)


def _jsrt(root: Path) -> SegmentationSet:
    name = "jsrt"
    image_dir = _first_existing(name, [root / "All247images", root / "images", root / "jsrt"], "image folder", "dir")
    images = [p for p in _list_images(image_dir) if p.suffix.lower() in (".png",)]
    images += sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".img")
    by_id: dict[str, Path] = {}
    for image in images:
        if image.suffix.lower() == ".img" or image.stem not in by_id:
            by_id[image.stem] = image
    if not by_id:
        raise _missing(name, "JSRT images (*.IMG or *.png)", image_dir)
    ids = sorted(by_id)
    mask_roots = [d for d in (root, root / "scratch", root / "SCR", root / "scr") if d.is_dir()]
    fold_dirs: dict[str, Path] = {}
    for base in mask_roots:
        for fold in ("fold1", "fold2"):
            for candidate in (base / fold / "masks", base / fold):
                if fold not in fold_dirs and (candidate / JSRT_CLASSES[0]).is_dir():
                    fold_dirs[fold] = candidate
        if not fold_dirs and (base / "masks" / JSRT_CLASSES[0]).is_dir():
            fold_dirs["all"] = base / "masks"
    if not fold_dirs:
        raise _missing(name, f"SCR masks (fold1/masks/{JSRT_CLASSES[0]}/)", root / "fold1" / "masks" / JSRT_CLASSES[0])
    listing = {fold: {p.stem: p.suffix for p in (d / JSRT_CLASSES[0]).iterdir()} for fold, d in fold_dirs.items()}
    fold_of, suffix_of = {}, {}
    for image_id in ids:
        fold = next((f for f in fold_dirs if image_id in listing[f]), None)
        if fold is None:
            first = next(iter(fold_dirs.values()))
            raise _missing(name, "SCR mask", first / JSRT_CLASSES[0] / f"{image_id}.gif")
        fold_of[image_id], suffix_of[image_id] = fold, listing[fold][image_id]
    for cls in JSRT_CLASSES:
        for folder in fold_dirs.values():
            _need_dir(name, folder / cls, f"SCR mask folder {cls!r}")
    splits = _splits_file(name, root, ids)
    if splits is None:
        splits = [_jsrt_split(i, fold_of[i]) for i in ids]
    paths = [os.fspath(by_id[i]) for i in ids]

    def mask_reader(index: int) -> np.ndarray:
        image_id = ids[index]
        size = _jsrt_size(paths[index])
        folder = fold_dirs[fold_of[image_id]]
        masks = []
        for cls in JSRT_CLASSES:
            path = folder / cls / f"{image_id}{suffix_of[image_id]}"
            masks.append(_read_binary_mask(_need_file(name, path, f"{cls} mask"), size))
        return np.stack(masks)

    def image_reader(index: int) -> np.ndarray:
        path = paths[index]
        if path.lower().endswith(".img"):
            return _read_jsrt_raw(path)
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("L"))

    return SegmentationSet(name, list(JSRT_CLASSES), paths, splits, ids, mask_reader, image_reader)


def _siim_segmentation(root: Path) -> SegmentationSet:
    name = "siim_ptx"
    csv, table = _siim_rle_table(name, root)
    split_dirs = _siim_split_dirs(root)
    images: list[Path] = []
    splits: list[str] = []
    if split_dirs:
        for split, folder in split_dirs.items():
            found = _siim_images(name, folder, table, csv)
            images += found
            splits += [split] * len(found)
    else:
        folder = _first_existing(
            name,
            [root / "png_images", root / "images", root / "png-images", root / "png-images-512"],
            "image folder (png-images-{train,val,test}[-512] or png_images)",
            "dir",
        )
        images = _siim_images(name, folder, table, csv)
        ids = [p.stem for p in images]
        splits = _splits_file(name, root, ids) or [hash_split(i) for i in ids]
    paths = [os.fspath(p) for p in images]
    ids = [p.stem for p in images]

    def mask_reader(index: int) -> np.ndarray:
        mask = np.zeros(SIIM_RLE_SHAPE, dtype=bool)
        for rle in table[ids[index]]:
            mask |= rle_decode(rle, *SIIM_RLE_SHAPE)
        return _resize_mask(mask, _image_size(paths[index]))[None]

    return SegmentationSet(name, ["Pneumothorax"], paths, splits, ids, mask_reader)


def _rasterise_polygons(polygons: Sequence[object], size: tuple[int, int]) -> np.ndarray:
    """Polygons (lists of {'x','y'} dicts or [x, y] pairs) -> bool [H, W] at `size` = (width, height)."""
    canvas = PIL.Image.new("L", size, 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = []
        for point in polygon if isinstance(polygon, list) else []:
            if isinstance(point, dict):
                points.append((float(point["x"]), float(point["y"])))
            else:
                points.append((float(point[0]), float(point[1])))
        if len(points) >= 3:
            draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas) > 0


def _ribcxr(root: Path) -> SegmentationSet:
    name = "vindr_ribcxr"
    base = root / "data" if (root / "data").is_dir() and not (root / "train").is_dir() else root
    paths: list[str] = []
    splits: list[str] = []
    ids: list[str] = []
    polygons: list[list[list[object]]] = []
    found_any = False
    for split in _SPLITS:
        folder = base / split
        if not folder.is_dir():
            continue
        found_any = True
        image_dir = _need_dir(name, folder / "img", "image folder")
        filename = f"Vindr_RibCXR_{split}_mask.json"
        annotation = _first_existing(name, [folder / filename, root / "Annotations" / split / filename], filename)
        data = json.loads(annotation.read_text())
        if "img" not in data:
            raise DatasetLayoutError(f"{name}: missing key 'img' in {os.fspath(annotation)}")
        for rib in RIBCXR_CLASSES:
            if rib not in data:
                raise DatasetLayoutError(f"{name}: missing key {rib!r} in {os.fspath(annotation)}")
        for key in sorted(data["img"], key=lambda k: int(k) if str(k).isdigit() else str(k)):
            image = image_dir / PurePosixPath(str(data["img"][key]).replace("\\", "/")).name
            if not image.is_file():
                raise _missing(name, "image", image)
            paths.append(os.fspath(image))
            splits.append(split)
            ids.append(image.stem)
            # A missing or null rib is an empty mask; a rib is one polygon (list of points).
            polygons.append([[data[rib].get(key)] if data[rib].get(key) else [] for rib in RIBCXR_CLASSES])
    if not found_any:
        raise _missing(name, "split folders train/val/test", base / "train")

    def mask_reader(index: int) -> np.ndarray:
        size = _image_size(paths[index])
        return np.stack([_rasterise_polygons(rib, size) for rib in polygons[index]])

    return SegmentationSet(name, list(RIBCXR_CLASSES), paths, splits, ids, mask_reader)


def _phantom_segmentation(root: Path) -> SegmentationSet:
    name = "phantom_segmentation"
    meta_path = _need_file(name, root / "segmentation.json")
    meta = json.loads(meta_path.read_text())
    if "classes" not in meta:
        raise DatasetLayoutError(f"{name}: missing key 'classes' in {os.fspath(meta_path)}")
    classes = [str(c) for c in meta["classes"]]
    csv = root / "segmentation.csv"
    frame = _read_csv(name, csv, ("id", "split"), str_columns=("id", "split"))
    image_dir = _need_dir(name, root / "images", "image folder")
    for cls in classes:
        _need_dir(name, root / "masks" / cls, f"mask folder for class {cls!r}")
    ids = list(frame["id"])
    paths = [os.fspath(image_dir / f"{i}.png") for i in ids]

    def mask_reader(index: int) -> np.ndarray:
        size = _image_size(paths[index])
        masks = [
            _read_binary_mask(_need_file(name, root / "masks" / c / f"{ids[index]}.png", "mask"), size)
            for c in classes
        ]
        return np.stack(masks) if masks else np.zeros((0, size[1], size[0]), dtype=bool)

    splits = [s.strip().lower() for s in frame["split"]]
    return SegmentationSet(name, classes, paths, splits, ids, mask_reader)


# ----- registries and loaders ----------------------------------------------------------------------------------------

CLASSIFICATION_DATASETS: dict[str, Callable[..., ClassificationSet]] = {
    "chexpert": _chexpert,
    "mimic": _mimic,
    "nih": _nih,
    "vindr_cxr": _vindr_cxr,
    "vindr_pcxr": _vindr_pcxr,
    "siim_ptx": _siim_ptx,
    "pneumonia2017": _pneumonia2017,
    "tbx11k": _tbx11k,
    "phantom": _phantom,
}
RETRIEVAL_DATASETS: dict[str, Callable[..., RetrievalSet]] = {
    "chexpert_5x200": _chexpert_5x200,
    "mimic": _mimic_retrieval,
    "phantom": _phantom_retrieval,
}
SEGMENTATION_DATASETS: dict[str, Callable[..., SegmentationSet]] = {
    "jsrt": _jsrt,
    "siim_ptx": _siim_segmentation,
    "vindr_ribcxr": _ribcxr,
    "phantom_segmentation": _phantom_segmentation,
}


def _lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"Unknown {kind} dataset {name!r}; known: {', '.join(sorted(registry))}.")
    return registry[name]


def _root(name: str, root: PathLike) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise _missing(name, "dataset root folder", path)
    return path


def load_classification(name: str, root: PathLike, split: str = "test") -> ClassificationSet:
    """Classification benchmark `name` read from `root` (see the module docstring for each layout)."""
    loader = _lookup(CLASSIFICATION_DATASETS, "classification", name)
    return loader(_root(name, root), split)


def load_retrieval(name: str, root: PathLike) -> RetrievalSet:
    """Image-report retrieval benchmark `name` read from `root`."""
    loader = _lookup(RETRIEVAL_DATASETS, "retrieval", name)
    return loader(_root(name, root))


def load_segmentation(name: str, root: PathLike) -> SegmentationSet:
    """Segmentation benchmark `name` read from `root`; every sample carries its split."""
    loader = _lookup(SEGMENTATION_DATASETS, "segmentation", name)
    return loader(_root(name, root))
