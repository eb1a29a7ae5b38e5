"""Benchmark dataset adapters: official on-disk layouts -> classification, retrieval and segmentation sets.

Every adapter reads only index files (CSV, TXT, JSON) and directory listings at load time; images are never decoded
and segmentation masks are decoded lazily by `SegmentationSet.read_mask`. A missing file, folder or column raises
`DatasetLayoutError` naming the dataset, what is missing and the full path.

Modules: `containers` (the sets and the error), `layout` (shared file, column, path and split helpers), `masks`
(mask images, SIIM RLE codec, polygons), one module per dataset family (`chexpert`, `mimic`, `nih`, `vindr`,
`siim`, `pneumonia_tb`, `jsrt`, `phantom`), and `registry` (name -> adapter, the `load_*` functions).

Layouts (root = the folder passed to the loader; the family module in brackets):

Classification
- chexpert (test) [chexpert]: `groundtruth.csv` (column `Study`, one row per study; image = the study's
  `view1_frontal.jpg`) or `test_labels.csv` (column `Path`), in root or root/CheXpert; images under root or
  root/CheXpert. split "valid" (alias "val") / "train": `{split}.csv` of CheXpert-v1.0(-small) (column `Path`,
  frontal rows only, blank -> 0, -1 kept).
- mimic [mimic]: `test.csv` (Path, ViewPosition, 14 labels) in root or root/2.0.0/yulequan, or the MIMIC-CXR-JPG
  files `mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]` + `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`; AP/PA only.
- nih [nih]: `Data_Entry_2017*.csv` + `test_list.txt` ("test") / `train_val_list.txt` ("train" = "trainval");
  images in root/images, root/data or root/images_0xx/images.
- vindr_cxr / vindr_pcxr [vindr]: `image_labels_{split}.csv` in root or root/annotations; images
  `{split}_png/<id>.png` or `{split}/<id>.dicom`. Several reader rows per image are merged by any-positive.
- siim_ptx [siim]: RLE CSV (`train-rle*.csv` or `stage_2_train.csv`; ImageId, EncodedPixels) +
  `png-images-{split}[-512]/`.
- pneumonia2017 [pneumonia_tb]: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*` (root may also be chest_xray or
  one split).
- tbx11k [pneumonia_tb]: `lists/TBX11K_{train,val}.txt` + `imgs/<line>`; "test" reads the val list (test labels are
  not public).
- phantom [phantom]: `{train,test}.csv` written by `chexficient.phantoms.write_phantom_dataset`.

Retrieval
- chexpert_5x200 [chexpert]: `chexpert_5x200.csv` (Path) + `df_chexpert_plus_240401.csv` (path_to_image,
  section_findings, section_impression); text = impression + " " + findings.
- mimic [mimic]: `master.csv` (Path, split, ViewPosition, findings, impression) in root or root/2.0.0/yulequan, or
  the MIMIC-CXR-JPG split/metadata files + `mimic_cxr_sectioned.csv` (study, impression, findings); text =
  findings + " " + impression.
- phantom [phantom]: `test.csv`; text = findings + " " + impression.

Segmentation
- jsrt [jsrt]: `All247images/*.IMG` (or `images/*.IMG|png`) + SCR `fold{1,2}/masks/<class>/<id>.gif` (also under
  `scratch/` or `SCR/`). Split: `splits.csv` (id, split) if present, else SCR fold2 -> test and fold1 -> train,
  with the fold1 ids whose SHA-1 bucket is below 20% -> val.
- siim_ptx [siim]: RLE CSV + `png-images-{train,val,test}[-512]/` (split from the folder) or `png_images/` (split
  from `splits.csv`, else by SHA-1 bucket 70/10/20). The RLE canvas is 1024x1024; masks are resized to the image.
- vindr_ribcxr [vindr]: `{train,val,test}/img/*.png` + `{split}/Vindr_RibCXR_{split}_mask.json` (also under
  root/data).
- phantom_segmentation [phantom]: `images/<id>.png`, `masks/<class>/<id>.png`, `segmentation.csv` (id, split),
  `segmentation.json` ({"classes": [...]}).
"""

from chexficient.data.labels import CHEXPERT_LABELS, LABELS

from .containers import ClassificationSet, DatasetLayoutError, PathLike, RetrievalSet, SegmentationSet
from .jsrt import JSRT_CLASSES, JSRT_SIDE
from .layout import hash_split
from .masks import rle_decode, rle_encode
from .registry import (
    CLASSIFICATION_DATASETS,
    RETRIEVAL_DATASETS,
    SEGMENTATION_DATASETS,
    load_classification,
    load_retrieval,
    load_segmentation,
)
from .siim import SIIM_RLE_SHAPE
from .vindr import RIBCXR_CLASSES


__all__ = [
    "CHEXPERT_LABELS",
    "CLASSIFICATION_DATASETS",
    "JSRT_CLASSES",
    "JSRT_SIDE",
    "LABELS",
    "RETRIEVAL_DATASETS",
    "RIBCXR_CLASSES",
    "SEGMENTATION_DATASETS",
    "SIIM_RLE_SHAPE",
    "ClassificationSet",
    "DatasetLayoutError",
    "PathLike",
    "RetrievalSet",
    "SegmentationSet",
    "hash_split",
    "load_classification",
    "load_retrieval",
    "load_segmentation",
    "rle_decode",
    "rle_encode",
]
