"""MIMIC-CXR: the 14-observation classification sets and the image-report retrieval set (frontal AP/PA only).

Layouts (root = the folder passed to the loader):
- classification: `test.csv` (Path, ViewPosition, 14 labels) in root or root/2.0.0/yulequan, or the MIMIC-CXR-JPG
  files `mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]` + `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`; AP/PA only.
- retrieval: `master.csv` (Path, split, ViewPosition, findings, impression) in root or root/2.0.0/yulequan, or the
  MIMIC-CXR-JPG split/metadata files + `mimic_cxr_sectioned.csv` (study, impression, findings); text = findings +
  " " + impression.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from chexficient.data.labels import LABELS

from .containers import ClassificationSet, DatasetLayoutError, RetrievalSet
from .layout import (
    _check_split,
    _join_text,
    _label_columns,
    _missing,
    _need_dir,
    _path_resolver,
    _read_csv,
    _targets,
)


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
