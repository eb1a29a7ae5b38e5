"""Synthetic radiograph files for tests and benchmarks: phantom PNGs (8/16-bit), DICOMs, and broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image


def write_dicom(path: str | os.PathLike, pixels: np.ndarray, monochrome1: bool = False) -> Path:
    """A single-frame uint16 (or uint8) grayscale image as a DICOM file (CR, explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: write_dicom expects a 2-D uint8/uint16 array, got {pixels.dtype} {pixels.shape}.")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(os.fspath(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientID = "PHANTOM"
    bits = pixels.dtype.itemsize * 8
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.BitsAllocated = bits
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = (pixels.max() - pixels if monochrome1 else pixels).tobytes()
    dataset.save_as(os.fspath(path), enforce_file_format=True)
    return Path(path)


def phantom_images(count: int, image_size: int = 256, bit_depth: int = 8, seed: int = 0) -> list[np.ndarray]:
    """`count` phantom radiographs [H, W] (uint8 or uint16) from `chexficient.phantoms`."""
    from ..phantoms import generate_phantoms

    samples = generate_phantoms(count, seed=seed, split="test", image_size=image_size, bit_depth=bit_depth)
    return [sample.image for sample in samples]


def write_corrupt_files(folder: str | os.PathLike, reference_png: bytes) -> list[Path]:
    """An empty .png, a text file named .png and a truncated PNG (the first third of `reference_png`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty.png": b"",
        "report.png": b"FINDINGS: this is a report, not an image.\n",
        "truncated.png": reference_png[: len(reference_png) // 3],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> Path:
    """An 8-bit or 16-bit grayscale PNG."""
    PIL.Image.fromarray(pixels).save(path)
    return Path(path)


__all__ = ["phantom_images", "write_corrupt_files", "write_dicom", "write_png"]
