"""Benchmark adapters on tiny fake folders in each dataset's official layout."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from eval import datasets as D
from eval.datasets import DatasetLayoutError


CHEXPERT = D.LABELS["chexpert"]


def _png(path: Path, size: tuple[int, int] = (8, 8), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)
    return path


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _csv(path: Path, frame: pd.DataFrame | list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(frame).to_csv(path, index=False)
    return path


def _chexpert_row(**values: float) -> dict[str, float]:
    return {label: values.get(label, 0.0) for label in CHEXPERT}


def _assert_layout_error(call, *needles: str) -> None:
    with pytest.raises(DatasetLayoutError) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


# ----- classification ------------------------------------------------------------------------------------------------


@pytest.fixture
def chexpert_test(tmp_path: Path) -> Path:
    test = tmp_path / "CheXpert" / "test"
    for patient in ("patient00001", "patient00002"):
        _png(test / patient / "study1" / "view1_frontal.jpg")
        _png(test / patient / "study1" / "view2_lateral.jpg")
    # Rows out of glob order, with the test set's 'Airspace Opacity' spelling.
    rows = [
        {"Study": "test/patient00002/study1", **_chexpert_row(Cardiomegaly=1)},
        {"Study": "test/patient00001/study1", **_chexpert_row(**{"Pleural Effusion": 1, "Lung Opacity": 1})},
    ]
    frame = pd.DataFrame(rows).rename(columns={"Lung Opacity": "Airspace Opacity"})
    _csv(tmp_path / "groundtruth.csv", frame)
    return tmp_path


def test_chexpert_test_aligns_rows_by_study(chexpert_test: Path) -> None:
    data = D.load_classification("chexpert", chexpert_test)
    assert data.labels == CHEXPERT and len(data) == 2
    assert data.ids == ["test/patient00002/study1", "test/patient00001/study1"]
    assert data.image_paths[0].endswith(os.path.join("patient00002", "study1", "view1_frontal.jpg"))
    assert os.path.isabs(data.image_paths[0])
    assert data.targets.dtype == np.float32 and data.targets.shape == (2, 14)
    assert data.targets[0, CHEXPERT.index("Cardiomegaly")] == 1 and data.targets[0].sum() == 1
    assert data.targets[1, CHEXPERT.index("Lung Opacity")] == 1
    assert data.targets[1, CHEXPERT.index("Pleural Effusion")] == 1


def test_chexpert_test_missing_file_and_column(chexpert_test: Path) -> None:
    csv = chexpert_test / "groundtruth.csv"
    pd.read_csv(csv).drop(columns=["Cardiomegaly"]).to_csv(csv, index=False)
    _assert_layout_error(lambda: D.load_classification("chexpert", chexpert_test), "Cardiomegaly", str(csv))
    csv.unlink()
    _assert_layout_error(lambda: D.load_classification("chexpert", chexpert_test), str(csv))


def test_chexpert_valid_keeps_uncertain_and_fills_blanks(tmp_path: Path) -> None:
    small = tmp_path / "CheXpert-v1.0-small"
    rows = []
    for i, view in enumerate(("view1_frontal", "view2_lateral", "view1_frontal")):
        path = f"CheXpert-v1.0-small/valid/patient{i:05d}/study1/{view}.jpg"
        _png(tmp_path / path)
        row = {"Path": path, "Frontal/Lateral": "Lateral" if "lateral" in view else "Frontal"}
        row.update({label: np.nan for label in CHEXPERT})
        rows.append(row)
    rows[0]["Edema"], rows[0]["Atelectasis"], rows[2]["No Finding"] = -1.0, 1.0, 1.0
    _csv(small / "valid.csv", rows)
    data = D.load_classification("chexpert", tmp_path, split="valid")
    assert D.load_classification("chexpert", tmp_path, split="val").ids == data.ids
    assert len(data) == 2 and all("lateral" not in p for p in data.image_paths)
    assert Path(data.image_paths[1]).is_file()
    assert data.targets[0, CHEXPERT.index("Edema")] == -1 and data.targets[0, CHEXPERT.index("Atelectasis")] == 1
    assert data.targets[1, CHEXPERT.index("No Finding")] == 1
    assert np.isfinite(data.targets).all() and (data.targets[1].sum() == 1)


def test_mimic_prepared_csv(tmp_path: Path) -> None:
    rows = []
    for i, view in enumerate(("PA", "LATERAL", "AP")):
        path = f"files/p10/p1000000{i}/s5000000{i}/dicom{i}.jpg"
        _png(tmp_path / "2.0.0" / path)
        rows.append({"Path": path, "ViewPosition": view, **{label: np.nan for label in CHEXPERT}})
    rows[0]["Pneumonia"], rows[2]["Pneumonia"], rows[2]["Edema"] = -1.0, 1.0, 0.0
    _csv(tmp_path / "2.0.0" / "yulequan" / "test.csv", rows)
    data = D.load_classification("mimic", tmp_path)
    assert data.ids == ["dicom0", "dicom2"] and data.labels == CHEXPERT
    assert Path(data.image_paths[1]).is_file() and data.image_paths[1].endswith("dicom2.jpg")
    assert data.targets[0, CHEXPERT.index("Pneumonia")] == -1 and data.targets[1, CHEXPERT.index("Pneumonia")] == 1
    assert not np.isnan(data.targets).any() and data.targets[0].sum() == -1


def _mimic_official(root: Path) -> None:
    dicoms = [("d1", 10000001, 50000001, "test", "PA"), ("d2", 10000001, 50000001, "test", "LATERAL")]
    dicoms += [("d3", 10000002, 50000002, "test", "AP"), ("d4", 10000003, 50000003, "train", "PA")]
    split = [{"dicom_id": d, "study_id": t, "subject_id": s, "split": sp} for d, s, t, sp, _ in dicoms]
    meta = [{"dicom_id": d, "subject_id": s, "study_id": t, "ViewPosition": v} for d, s, t, _, v in dicoms]
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as handle:
        pd.DataFrame(split).to_csv(handle, index=False)
    _csv(root / "mimic-cxr-2.0.0-metadata.csv", meta)
    labels = [
        {"subject_id": 10000001, "study_id": 50000001, **{c: np.nan for c in CHEXPERT}, "Cardiomegaly": 1.0},
        {"subject_id": 10000002, "study_id": 50000002, **{c: np.nan for c in CHEXPERT}, "Edema": -1.0},
    ]
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv", labels)
    for d, s, t, _, _ in dicoms:
        _png(root / "files" / f"p{str(s)[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
    sections = [
        {"study": "s50000001", "impression": "Cardiomegaly.", "findings": "Big heart."},
        {"study": "s50000002", "impression": np.nan, "findings": np.nan},
    ]
    _csv(root / "mimic_cxr_sectioned.csv", sections)


def test_mimic_official_layout(tmp_path: Path) -> None:
    _mimic_official(tmp_path)
    data = D.load_classification("mimic", tmp_path)
    assert data.ids == ["d1", "d3"]
    assert all(Path(p).is_file() for p in data.image_paths)
    assert data.targets[0, CHEXPERT.index("Cardiomegaly")] == 1 and data.targets[1, CHEXPERT.index("Edema")] == -1
    retrieval = D.load_retrieval("mimic", tmp_path)
    assert retrieval.ids == ["d1"] and retrieval.texts == ["Big heart. Cardiomegaly."]
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    _assert_layout_error(lambda: D.load_classification("mimic", tmp_path), "mimic-cxr-2.0.0-chexpert.csv")


def test_nih(tmp_path: Path) -> None:
    entries = [
        ("00000001_000.png", "Cardiomegaly|Pleural_Thickening"),
        ("00000002_000.png", "No Finding"),
        ("00000003_000.png", "Effusion"),
    ]
    _csv(
        tmp_path / "Data_Entry_2017.csv",
        [{"Image Index": i, "Finding Labels": f, "Patient ID": 1} for i, f in entries],
    )
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n00000001_000.png\n")
    (tmp_path / "train_val_list.txt").write_text("00000002_000.png\n")
    _png(tmp_path / "images_001" / "images" / "00000001_000.png")
    _png(tmp_path / "images_002" / "images" / "00000002_000.png")
    _png(tmp_path / "images_002" / "images" / "00000003_000.png")
    labels = D.LABELS["nih"]
    data = D.load_classification("nih", tmp_path)
    assert data.ids == ["00000003_000.png", "00000001_000.png"] and len(labels) == 15
    assert data.image_paths[1] == str(tmp_path.resolve() / "images_001" / "images" / "00000001_000.png")
    assert data.targets[0].tolist() == [float(label == "Effusion") for label in labels]
    assert data.targets[1, labels.index("Pleural Thickening")] == 1 and data.targets[1, labels.index("Cardiomegaly")]
    train = D.load_classification("nih", tmp_path, split="train")
    assert train.targets[0, 14] == 1 and train.targets[0].sum() == 1
    (tmp_path / "test_list.txt").unlink()
    _assert_layout_error(lambda: D.load_classification("nih", tmp_path), str(tmp_path.resolve() / "test_list.txt"))


VINDR_CXR_COLUMNS = [  # the official image_labels_*.csv order ('Other lesion' before 'COPD')
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]  # fmt: skip


def test_vindr_cxr_merges_readers_and_maps_short_names(tmp_path: Path) -> None:
    def row(image_id: str, rad: str, *positives: str) -> dict:
        return {"image_id": image_id, "rad_id": rad, **{c: int(c in positives) for c in VINDR_CXR_COLUMNS}}

    train = [row("aaa", "R1", "ILD"), row("aaa", "R2", "COPD"), row("aaa", "R3"), row("bbb", "R1", "No finding")]
    train += [row("bbb", "R2", "No finding")]
    _csv(tmp_path / "annotations" / "image_labels_train.csv", train)
    test = pd.DataFrame([row("1e5", "", "Other lesion")]).drop(columns=["rad_id"])
    _csv(tmp_path / "annotations" / "image_labels_test.csv", test.rename(columns={"Other diseases": "Other disease"}))
    for image_id in ("aaa", "bbb"):
        _touch(tmp_path / "train" / f"{image_id}.dicom")
    _png(tmp_path / "test_png" / "1e5.png")
    labels = D.LABELS["vindr_cxr"]
    data = D.load_classification("vindr_cxr", tmp_path, split="train")
    assert data.ids == ["aaa", "bbb"] and len(labels) == 28
    assert data.image_paths[0].endswith(os.path.join("train", "aaa.dicom"))
    positives = {labels[c] for c in np.flatnonzero(data.targets[0])}
    assert positives == {"ILD (Interstitial Lung Disease)", "COPD (Chronic Obstructive Pulmonary Disease)"}
    assert np.flatnonzero(data.targets[1]).tolist() == [labels.index("No finding")]
    test_set = D.load_classification("vindr_cxr", tmp_path)
    assert test_set.ids == ["1e5"] and test_set.image_paths[0].endswith(os.path.join("test_png", "1e5.png"))
    assert np.flatnonzero(test_set.targets[0]).tolist() == [labels.index("Other lesion")]
    csv = tmp_path / "annotations" / "image_labels_test.csv"
    pd.read_csv(csv).drop(columns=["ILD"]).to_csv(csv, index=False)
    _assert_layout_error(lambda: D.load_classification("vindr_cxr", tmp_path), "'ILD'", str(csv.resolve()))


def test_vindr_pcxr_misspelled_columns(tmp_path: Path) -> None:
    columns = ["No finding", "Bronchitis", "Brocho-pneumonia", "Other disease", "Bronchiolitis", "Situs inversus"]
    columns += ["Pneumonia", "Pleuro-pneumonia", "Diagphramatic hernia", "Tuberculosis", "Congenital emphysema"]
    columns += ["CPAM", "Hyaline membrane disease", "Mediastinal tumor", "Lung tumor"]
    rows = [
        {
            "image_id": "p1",
            "rad_ID": "R9",
            **{c: int(c in ("Brocho-pneumonia", "Diagphramatic hernia")) for c in columns},
        }
    ]
    rows.append({"image_id": "p2", "rad_ID": "R9", **{c: int(c == "Pleuro-pneumonia") for c in columns}})
    _csv(tmp_path / "image_labels_test.csv", rows)
    _png(tmp_path / "test_png" / "p1.png")
    _png(tmp_path / "test_png" / "p2.png")
    data = D.load_classification("vindr_pcxr", tmp_path)
    labels = D.LABELS["vindr_pcxr"]
    assert {labels[c] for c in np.flatnonzero(data.targets[0])} == {"Bronchopneumonia", "Diaphragmatic hernia"}
    assert np.flatnonzero(data.targets[1]).tolist() == [labels.index("Pleuropneumonia")]
    (tmp_path / "test_png" / "p1.png").unlink()
    _assert_layout_error(lambda: D.load_classification("vindr_pcxr", tmp_path), "p1.png")


def _siim(root: Path, folder: str = "png-images-test-512", size: int = 64) -> str:
    canvas = np.zeros(D.SIIM_RLE_SHAPE, dtype=bool)
    canvas[256:512, 0:128] = True  # rows 256-511, columns 0-127 of the 1024 grid
    second = np.zeros(D.SIIM_RLE_SHAPE, dtype=bool)
    second[0:16, 1008:1024] = True
    rows = [("pos", D.rle_encode(canvas)), ("pos", D.rle_encode(second)), ("neg", "-1"), ("other", "-1")]
    path = root / "train-rle.csv"
    path.write_text("ImageId, EncodedPixels\n" + "".join(f"{i}, {r}\n" for i, r in rows))
    for image_id in ("pos", "neg"):
        _png(root / folder / f"{image_id}.png", (size, size))
    return str(path)


def test_siim_classification(tmp_path: Path) -> None:
    _siim(tmp_path)
    data = D.load_classification("siim_ptx", tmp_path)
    assert data.labels == ["Pneumothorax"] and data.ids == ["neg", "pos"]
    assert data.targets.tolist() == [[0.0], [1.0]]
    _png(tmp_path / "png-images-test-512" / "stray.png")
    _assert_layout_error(lambda: D.load_classification("siim_ptx", tmp_path), "stray.png", "train-rle.csv")


def test_pneumonia2017(tmp_path: Path) -> None:
    base = tmp_path / "chest_xray" / "test"
    _png(base / "NORMAL" / "IM-0001-0001.jpeg")
    _png(base / "PNEUMONIA" / "person1_virus_6.jpeg")
    _png(base / "PNEUMONIA" / "person3_bacteria_10.jpeg")
    _touch(base / "NORMAL" / ".DS_Store")
    data = D.load_classification("pneumonia2017", tmp_path)
    assert data.ids == ["NORMAL/IM-0001-0001", "PNEUMONIA/person1_virus_6", "PNEUMONIA/person3_bacteria_10"]
    assert data.targets[:, 0].tolist() == [0, 1, 1] and data.targets.shape == (3, 1)
    assert len(D.load_classification("pneumonia2017", base)) == 3  # root may be the split folder itself
    _assert_layout_error(lambda: D.load_classification("pneumonia2017", tmp_path, "val"), "val")


def test_tbx11k(tmp_path: Path) -> None:
    lines = ["tb/tb0003.png", "health/h0001.png", "sick/s0002.png"]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "TBX11K_val.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        _png(tmp_path / "imgs" / line)
    data = D.load_classification("tbx11k", tmp_path)
    assert data.targets[:, 0].tolist() == [1, 0, 0] and data.ids == ["tb/tb0003", "health/h0001", "sick/s0002"]
    assert data.image_paths[2] == str(tmp_path.resolve() / "imgs" / "sick" / "s0002.png")
    _assert_layout_error(lambda: D.load_classification("tbx11k", tmp_path, "train"), "TBX11K_train.txt")


def test_phantom_classification_and_retrieval(tmp_path: Path) -> None:
    from chexficient.phantoms import PHANTOM_LABELS, write_phantom_dataset

    write_phantom_dataset(tmp_path, num_train=4, num_test=5, image_size=32)
    expected = pd.read_csv(tmp_path / "test.csv")
    data = D.load_classification("phantom", tmp_path)
    assert data.labels == list(PHANTOM_LABELS) and data.ids == list(expected["id"])
    assert np.array_equal(data.targets, expected[list(PHANTOM_LABELS)].to_numpy(np.float32))
    assert all(Path(p).is_file() for p in data.image_paths)
    assert len(D.load_classification("phantom", tmp_path, "train")) == 4
    retrieval = D.load_retrieval("phantom", tmp_path)
    assert retrieval.texts[0] == f"{expected['findings'][0]} {expected['impression'][0]}"
    assert retrieval.image_paths == data.image_paths
    frame = expected.drop(columns=["impression"])
    frame.to_csv(tmp_path / "test.csv", index=False)
    _assert_layout_error(lambda: D.load_retrieval("phantom", tmp_path), "impression", str(tmp_path / "test.csv"))


# ----- retrieval -----------------------------------------------------------------------------------------------------


def test_chexpert_5x200(tmp_path: Path) -> None:
    paths = [f"CheXpert-v1.0/train/patient0000{i}/study1/view1_frontal.jpg" for i in range(3)]
    for path in paths:
        _png(tmp_path / path)
    _csv(tmp_path / "chexpert_5x200.csv", [{"Path": p, "Atelectasis": 1} for p in paths])
    reports = [
        {"path_to_image": "train/patient00000/study1/view1_frontal.jpg", "section_findings": "F0.", "section_impression": "I0."},
        {"path_to_image": "train/patient00001/study1/view1_frontal.jpg", "section_findings": np.nan, "section_impression": np.nan},
        {"path_to_image": "train/patient00002/study1/view1_frontal.jpg", "section_findings": "F2.", "section_impression": np.nan},
    ]  # fmt: skip
    _csv(tmp_path / "df_chexpert_plus_240401.csv", reports)
    data = D.load_retrieval("chexpert_5x200", tmp_path)
    assert data.texts == ["I0. F0.", "F2."] and len(data) == 2
    assert data.ids == ["train/patient00000/study1/view1_frontal", "train/patient00002/study1/view1_frontal"]
    assert data.image_paths[1] == str(tmp_path.resolve() / paths[2])
    (tmp_path / "df_chexpert_plus_240401.csv").unlink()
    _assert_layout_error(lambda: D.load_retrieval("chexpert_5x200", tmp_path), "df_chexpert_plus_240401.csv")


def test_mimic_master_csv(tmp_path: Path) -> None:
    rows = [
        {"Path": "files/p10/p1/s1/a.jpg", "split": "test", "ViewPosition": "PA", "findings": "F.", "impression": "I."},
        {"Path": "files/p10/p1/s1/b.jpg", "split": "test", "ViewPosition": "LL", "findings": "F.", "impression": "I."},
        {"Path": "files/p10/p2/s2/c.jpg", "split": "train", "ViewPosition": "AP", "findings": "X", "impression": ""},
        {
            "Path": "files/p10/p3/s3/d.jpg",
            "split": "test",
            "ViewPosition": "AP",
            "findings": np.nan,
            "impression": "I3.",
        },
    ]
    for row in rows:
        _png(tmp_path / row["Path"])
    _csv(tmp_path / "master.csv", rows)
    data = D.load_retrieval("mimic", tmp_path)
    assert data.ids == ["a", "d"] and data.texts == ["F. I.", "I3."]
    assert data.image_paths[0] == str(tmp_path.resolve() / rows[0]["Path"])


# ----- segmentation --------------------------------------------------------------------------------------------------


def _gif(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _jsrt(root: Path, side: int = 64, mask_side: int = 32) -> dict[str, np.ndarray]:
    raws = {}
    for i, (image_id, fold) in enumerate((("JPCLN001", "fold1"), ("JPCNN002", "fold2"), ("JPCLN003", "fold1"))):
        raw = np.full((side, side), 4095 if i == 0 else 1000, dtype=">u2")
        raw[0, 0] = 0
        _touch(root / "All247images" / f"{image_id}.IMG", raw.tobytes())
        raws[image_id] = raw
        for c, cls in enumerate(D.JSRT_CLASSES):
            mask = np.zeros((mask_side, mask_side), bool)
            mask[c : c + 2, :4] = True  # class c covers rows c, c+1 of the mask grid, columns 0-3
            _gif(root / "scratch" / fold / "masks" / cls / f"{image_id}.gif", mask)
    return raws


def test_jsrt_raw_images_and_scr_masks(tmp_path: Path) -> None:
    _jsrt(tmp_path)
    data = D.load_segmentation("jsrt", tmp_path)
    assert data.classes == ["left lung", "right lung", "heart", "left clavicle", "right clavicle"]
    assert data.ids == ["JPCLN001", "JPCLN003", "JPCNN002"]
    assert data.splits[2] == "test" and set(data.splits[:2]) <= {"train", "val"}
    mask = data.read_mask(0)
    assert mask.shape == (5, 64, 64) and mask.dtype == bool
    for c in range(5):  # 32 -> 64 nearest: mask row r covers image rows 2r, 2r+1
        assert mask[c, 2 * c : 2 * c + 4, :8].all() and mask[c].sum() == 4 * 8
    image = data.read_image(0)
    assert image.shape == (64, 64) and image.dtype == np.float32
    assert image[0, 0] == 1.0 and image[1, 1] == 0.0  # raw 0 (white film) -> 1, raw 4095 -> 0
    test = data.subset("test")
    assert test.ids == ["JPCNN002"] and test.read_mask(0).shape == (5, 64, 64)
    assert np.isclose(test.read_image(0)[1, 1], 1 - 1000 / 4095)


def test_jsrt_full_size_and_errors(tmp_path: Path) -> None:
    _jsrt(tmp_path, side=D.JSRT_SIDE, mask_side=1024)
    (tmp_path / "splits.csv").write_text("id,split\nJPCLN001,val\nJPCNN002,train\nJPCLN003,test\n")
    data = D.load_segmentation("jsrt", tmp_path)
    assert data.splits == ["val", "test", "train"]
    mask = data.read_mask(1)
    assert mask.shape == (5, 2048, 2048) and mask[2, 4:8, :8].all() and mask[2].sum() == 4 * 8
    gif = tmp_path / "scratch" / "fold1" / "masks" / "heart" / "JPCLN003.gif"
    gif.unlink()
    _assert_layout_error(lambda: data.read_mask(1), str(gif.resolve()))
    (tmp_path / "scratch" / "fold2" / "masks" / "left lung" / "JPCNN002.gif").unlink()
    _assert_layout_error(lambda: D.load_segmentation("jsrt", tmp_path), "JPCNN002.gif")


def test_rle_decode_is_column_major_and_relative() -> None:
    mask = D.rle_decode("1 2 2 1", height=3, width=2)
    # pixels numbered down columns: 1, 2 (column 0, rows 1-2), then skip 2 -> pixel 5 (column 1, row 2)
    assert mask.tolist() == [[False, False], [True, False], [True, True]]
    assert D.rle_encode(mask) == "1 2 2 1" and not D.rle_decode(" -1", 4, 4).any()


def test_siim_segmentation(tmp_path: Path) -> None:
    _siim(tmp_path, folder="png-images-test-512", size=64)
    _png(tmp_path / "png-images-train-512" / "other.png", (64, 64))
    data = D.load_segmentation("siim_ptx", tmp_path)
    assert data.classes == ["Pneumothorax"] and data.ids == ["other", "neg", "pos"]
    assert data.splits == ["train", "test", "test"]
    pos = data.subset("test").read_mask(1)
    assert pos.shape == (1, 64, 64)
    expected = np.zeros((64, 64), bool)
    expected[16:32, 0:8] = True  # 1024 -> 64: factor 16
    expected[0, 63] = True
    assert np.array_equal(pos[0], expected)
    assert not data.read_mask(1).any()


def test_siim_segmentation_generic_folder_hash_split(tmp_path: Path) -> None:
    _siim(tmp_path, folder="png_images", size=1024)
    data = D.load_segmentation("siim_ptx", tmp_path)
    assert data.splits == [D.hash_split("neg"), D.hash_split("pos")]
    assert data.read_mask(1)[0, 256:512, :128].all() and data.read_mask(1)[0].sum() == 256 * 128 + 16 * 16


def _ribcxr(root: Path) -> None:
    for split in ("train", "val"):
        names = [f"VinDr_RibCXR_{split}_{i:03d}.png" for i in range(2)]
        for name in names:
            _png(root / "data" / split / "img" / name, (40, 30))
        data: dict[str, dict] = {"img": {str(i): f"data/{split}/img/{n}" for i, n in enumerate(names)}}
        for r, rib in enumerate(D.RIBCXR_CLASSES):
            square = [{"x": r, "y": 2}, {"x": r + 5, "y": 2}, {"x": r + 5, "y": 7}, {"x": r, "y": 7}]
            data[rib] = {"0": square, "1": None if rib == "L10" else square}
        (root / "data" / split / f"Vindr_RibCXR_{split}_mask.json").write_text(json.dumps(data))


def test_vindr_ribcxr(tmp_path: Path) -> None:
    _ribcxr(tmp_path)
    data = D.load_segmentation("vindr_ribcxr", tmp_path)
    assert len(data.classes) == 20 and data.classes[0] == "R1" and data.classes[10] == "L1"
    assert data.splits == ["train", "train", "val", "val"] and data.ids[2] == "VinDr_RibCXR_val_000"
    mask = data.read_mask(1)
    assert mask.shape == (20, 30, 40)
    assert mask[0, 2:8, 0:6].all() and mask[0].sum() == 36 and not mask[0, 1, 0]
    assert mask[3, 2, 3] and not mask[3, 2, 2]
    assert not mask[19].any() and data.read_mask(0)[19].sum() == 36
    json_path = tmp_path / "data" / "val" / "Vindr_RibCXR_val_mask.json"
    json_path.unlink()
    _assert_layout_error(lambda: D.load_segmentation("vindr_ribcxr", tmp_path), str(json_path.resolve()))


def test_phantom_segmentation(tmp_path: Path) -> None:
    classes = ["lungs", "heart"]
    (tmp_path / "segmentation.json").write_text(json.dumps({"classes": classes}))
    _csv(tmp_path / "segmentation.csv", [{"id": "a", "split": "train"}, {"id": "b", "split": "test"}])
    for image_id in ("a", "b"):
        _png(tmp_path / "images" / f"{image_id}.png", (12, 10))
        for c, cls in enumerate(classes):
            mask = np.zeros((10, 12), np.uint8)
            mask[c, : 3 + c] = 255
            PIL.Image.fromarray(mask).save(_png(tmp_path / "masks" / cls / f"{image_id}.png"))
    data = D.load_segmentation("phantom_segmentation", tmp_path)
    assert data.classes == classes and data.splits == ["train", "test"] and data.read_image(1) == data.image_paths[1]
    mask = data.subset("test").read_mask(0)
    assert mask.shape == (2, 10, 12) and mask[0, 0, :3].all() and mask[0].sum() == 3 and mask[1].sum() == 4
    frame = pd.read_csv(tmp_path / "segmentation.csv").drop(columns=["split"])
    frame.to_csv(tmp_path / "segmentation.csv", index=False)
    _assert_layout_error(
        lambda: D.load_segmentation("phantom_segmentation", tmp_path), "split", str(tmp_path / "segmentation.csv")
    )
    (tmp_path / "segmentation.json").unlink()
    _assert_layout_error(lambda: D.load_segmentation("phantom_segmentation", tmp_path), "segmentation.json")


# ----- registries ----------------------------------------------------------------------------------------------------


def test_registries_and_unknown_names(tmp_path: Path) -> None:
    assert set(D.CLASSIFICATION_DATASETS) >= {"chexpert", "mimic", "nih", "vindr_cxr", "vindr_pcxr", "siim_ptx"}
    assert set(D.RETRIEVAL_DATASETS) == {"chexpert_5x200", "mimic", "phantom"}
    assert set(D.SEGMENTATION_DATASETS) == {"jsrt", "siim_ptx", "vindr_ribcxr", "phantom_segmentation"}
    with pytest.raises(ValueError, match="chexpert.*nih"):
        D.load_classification("nope", tmp_path)
    with pytest.raises(ValueError, match="chexpert_5x200"):
        D.load_retrieval("nope", tmp_path)
    with pytest.raises(ValueError, match="jsrt"):
        D.load_segmentation("nope", tmp_path)
    _assert_layout_error(lambda: D.load_classification("nih", tmp_path / "absent"), str(tmp_path / "absent"))
    assert issubclass(DatasetLayoutError, FileNotFoundError)
    assert [len(D.LABELS[k]) for k in ("chexpert", "mimic", "nih", "vindr_cxr", "vindr_pcxr")] == [14, 14, 15, 28, 15]
