"""Builders and harnesses the test files share: tiny configs, a tiny tokenizer, saved tiny models, and a Python
process standing for a user's machine, where nothing of this project can be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from transformers import BertTokenizerFast

from configuration_chexficient import CheXficientConfig


TINY_WORDS = (
    "no there is finding pneumothorax effusion pleural cardiomegaly heart lungs clear normal size the are of and "
    "right left small large opacity consolidation nodule tube fracture rib acute process"
).split()
PROJECT_MODULES = (
    "configuration_chexficient",
    "modeling_chexficient",
    "image_decoding_chexficient",
    "image_processing_chexficient",
    "processing_chexficient",
    "chexficient",
    "train",
    "eval",
    "llava_rad",
    "scripts",
    "space",
)
# Prepended to a script run by `run_without_project`: any import of the project fails, as on a user's machine.
_HIDE_PROJECT = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    PROJECT = {set(PROJECT_MODULES)!r}


    class HideProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in PROJECT:
                raise ImportError(f"{{name}} is not installed here")
            return None


    sys.meta_path.insert(0, HideProject())
    try:
        import modeling_chexficient
    except ImportError:
        pass
    else:
        sys.exit("the project is importable: the test would prove nothing")
    """
)


def tiny_config(**overrides) -> CheXficientConfig:
    """A CheXficient config small enough for CPU tests (hidden 32, 2 layers, 28 px images, patch 14)."""
    values = dict(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=14
        ),
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
        ),
        projection_dim=16,
        num_prototypes=3,
    )
    values.update(overrides)
    return CheXficientConfig(**values)


def tiny_tokenizer() -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over a few report words (ids < 64, the tiny vocab size)."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def save_tiny_model(folder, **config_overrides):
    """Save a tiny random CheXficient with its processor and tokenizer (28 px images) to `folder`; returns it."""
    from image_processing_chexficient import CheXficientImageProcessor
    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    model = CheXficientModel(tiny_config(**config_overrides)).eval()
    model.save_pretrained(folder)
    CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tiny_tokenizer()).save_pretrained(
        folder
    )
    return model


def run_without_project(script: str, *args: str, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh, isolated interpreter (`-I`) in `workdir`, where the project cannot be imported, as
    a user with only torch, transformers and a downloaded folder; the run must succeed."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "without_project.py"
    path.write_text(_HIDE_PROJECT + "\n" + textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    result = subprocess.run(
        [sys.executable, "-I", str(path), *map(str, args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def dicom_header(
    rows: int,
    columns: int,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    frames: int = 1,
    syntax: str | None = None,
    **elements,
):
    """A single- or multi-frame grayscale DICOM dataset without pixel data: `rows` x `columns` (x `frames`) samples
    stored in `bits` bits, transfer syntax `syntax` (explicit VR little endian by default); `elements` set any other
    attribute (windows, LUTs, rescale)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated = 8 if bits <= 8 else 16
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits - 1, 0
    if frames > 1:
        dataset.NumberOfFrames = frames
    for key, value in elements.items():
        setattr(dataset, key, value)
    return dataset


def dicom_dataset(pixels, photometric: str = "MONOCHROME2", bits: int = 12, frames: int = 1, **elements):
    """`dicom_header` for integer `pixels` [(frames,) H, W], uncompressed, with the pixels stored."""
    import numpy as np

    dataset = dicom_header(*pixels.shape[-2:], photometric=photometric, bits=bits, frames=frames, **elements)
    if pixels.size:
        dataset.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    return dataset


def llava_train_args(parts: dict[str, Path], output: Path, stage: str, **options) -> list[str]:
    """Command-line arguments of `llava_rad/train.py` for one stage on the tiny `parts` (the fixture's dict of
    chexficient / llama / train / root paths), with `options` as further `--key value` pairs."""
    values = {
        "chexficient": parts["chexficient"],
        "language_model": parts["llama"],
        "train_data": parts["train"],
        "image_root": parts["root"],
        "output_dir": output,
        "stage": stage,
        **options,
    }
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]
