"""Synthetic sample images for the demo (fake patient, generated UIDs; no real data)."""

from __future__ import annotations

import datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")


def ultrasound_image(
    rows: int = 120,
    columns: int = 160,
    *,
    seed: int = 0,
    patient: tuple[str, str] = ("DEMO^ALICE", "DEMO0001"),
) -> Dataset:
    """A small valid RGB ultrasound image in Explicit VR Little Endian."""
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = patient
    ds.Modality = "US"
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"DEMO{seed:04d}"
    ds.StudyDescription = "DEMO ABDOMEN"
    ds.SeriesNumber, ds.InstanceNumber = 1, seed + 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(
        (x * 7 + y * 3 + seed) & 0xFF for y in range(rows) for x in range(columns) for _ in range(3)
    )
    return ds


def write_sample_images(folder: Path, count: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"us-sample-{index + 1}.dcm"
        if not path.exists():
            ultrasound_image(seed=index).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
