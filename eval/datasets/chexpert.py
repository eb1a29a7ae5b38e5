"""CheXpert: the 14-observation classification sets and the CheXpert 5x200 image-report retrieval set.

Layouts (root = the folder passed to the loader):
- classification, split "test": `groundtruth.csv` (column `Study`, one row per study; image = the study's
  `view1_frontal.jpg`) or `test_labels.csv` (column `Path`), in root or root/CheXpert; images under root or
  root/CheXpert. Split "valid" (alias "val") / "train": `{split}.csv` of CheXpert-v1.0(-small) (column `Path`,
  frontal rows only, blank -> 0, -1 kept).
- retrieval, chexpert_5x200: `chexpert_5x200.csv` (Path) + `df_chexpert_plus_240401.csv` (path_to_image,
  section_findings, section_impression); text = impression + " " + findings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import numpy as np

from chexficient.data.labels import LABELS

from .containers import ClassificationSet, RetrievalSet
from .layout import (
    _check_split,
    _first_existing,
    _join_text,
    _label_columns,
    _list_images,
    _missing,
    _need_column,
    _path_resolver,
    _read_csv,
    _targets,
)


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
