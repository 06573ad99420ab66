"""A seeded, reproducible benchmark corpus: ultrasound images and cine loops, CT slices, one very
large multi-frame object, and modality worklist items.

The same seed gives byte-identical files (UIDs come from ``generate_uid(entropy_srcs=...)``, pixel
data from ``random.Random``). Every object is an Explicit VR Little Endian Part-10 file: pydicom
encodes the header, then the Pixel Data element is appended by hand, frame by frame, so even the
~1 GB object is written streaming without ever holding it in memory. Patients are obviously fake.

A corpus directory carries a ``manifest.json`` of what it was built from; a directory whose
manifest matches is reused as is, anything else is rebuilt from scratch.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_PIXEL_TAG = struct.Struct("<HH2s2xI")  # (7FE0,0010), VR, reserved, 32-bit length


@dataclass(frozen=True, slots=True)
class ImageKind:
    """The geometry of one kind of object (one frame is ``rows * columns * samples * bytes``)."""

    name: str
    sop_class_uid: str
    modality: str
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    photometric: str

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * (self.bits_allocated // 8)


US = ImageKind("us", UltrasoundImageStorage, "US", 480, 640, 3, 8, "RGB")
CINE = ImageKind("cine", UltrasoundMultiFrameImageStorage, "US", 480, 640, 3, 8, "RGB")
CT = ImageKind("ct", CTImageStorage, "CT", 512, 512, 1, 16, "MONOCHROME2")
BIG = ImageKind("big", UltrasoundMultiFrameImageStorage, "US", 480, 640, 3, 8, "RGB")


@dataclass(frozen=True, slots=True)
class CorpusPlan:
    """How many objects of each kind; ``seed`` makes the corpus reproducible."""

    seed: int = 20240601
    us_images: int = 500
    cine_loops: int = 4
    cine_frames: int = 60
    ct_slices: int = 200
    images_per_study: int = 50


@dataclass(frozen=True, slots=True)
class Corpus:
    root: Path
    us: tuple[Path, ...]
    cine: tuple[Path, ...]
    ct: tuple[Path, ...]
    sizes: dict[Path, int] = field(default_factory=dict, compare=False)

    def total_bytes(self, paths: Sequence[Path]) -> int:
        return sum(self.sizes.get(p) or p.stat().st_size for p in paths)


# ---------------------------------------------------------------------------------------------
# Building


def build_corpus(root: Path, plan: CorpusPlan) -> Corpus:
    """Write (or reuse) the corpus for ``plan`` under ``root``."""
    wanted = {"version": FORMAT_VERSION, **asdict(plan)}
    if not _manifest_matches(root, wanted):
        _fresh_directory(root)
        _write_all(root, plan)
        (root / MANIFEST).write_text(json.dumps(wanted, indent=2))
    return _listing(root, plan)


def build_big_object(root: Path, seed: int, target_bytes: int) -> Path:
    """Write (or reuse) one multi-frame ultrasound object of about ``target_bytes`` of pixel data."""
    frames = max(1, target_bytes // BIG.frame_bytes)
    wanted = {"version": FORMAT_VERSION, "seed": seed, "frames": frames}
    path = root / "big.dcm"
    if not (_manifest_matches(root, wanted) and path.is_file()):
        _fresh_directory(root)
        write_object(path, BIG, seed=seed, index=0, frames=frames, study=0)
        (root / MANIFEST).write_text(json.dumps(wanted, indent=2))
    return path


def _manifest_matches(root: Path, wanted: dict[str, Any]) -> bool:
    try:
        found = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return bool(found == wanted)


def _fresh_directory(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


def _write_all(root: Path, plan: CorpusPlan) -> None:
    per_study = max(1, plan.images_per_study)
    for i in range(plan.us_images):
        write_object(root / "us" / f"us-{i:05d}.dcm", US, seed=plan.seed, index=i, study=i // per_study)
    for i in range(plan.cine_loops):
        write_object(root / "cine" / f"cine-{i:03d}.dcm", CINE, seed=plan.seed, index=i,
                     frames=plan.cine_frames, study=i)
    for i in range(plan.ct_slices):
        write_object(root / "ct" / f"ct-{i:05d}.dcm", CT, seed=plan.seed, index=i,
                     study=i // per_study)


def _listing(root: Path, plan: CorpusPlan) -> Corpus:
    def files(kind: str, count: int) -> tuple[Path, ...]:
        return tuple(sorted((root / kind).glob("*.dcm")))[:count] if count else ()

    corpus = Corpus(root, files("us", plan.us_images), files("cine", plan.cine_loops),
                    files("ct", plan.ct_slices))
    corpus.sizes.update({p: p.stat().st_size for p in (*corpus.us, *corpus.cine, *corpus.ct)})
    return corpus


# ---------------------------------------------------------------------------------------------
# One object


def write_object(path: Path, kind: ImageKind, *, seed: int, index: int, frames: int = 1,
                 study: int = 0) -> int:
    """Write one Part-10 object, streaming its pixel data frame by frame; returns its size."""
    header = _part10_header(_dataset(kind, seed=seed, index=index, frames=frames, study=study))
    length = kind.frame_bytes * frames
    path.parent.mkdir(parents=True, exist_ok=True)
    vr = b"OW" if kind.bits_allocated > 8 else b"OB"
    with path.open("wb") as out:
        out.write(header)
        out.write(_PIXEL_TAG.pack(0x7FE0, 0x0010, vr, length))
        for chunk in pixel_frames(kind, seed=seed, index=index, frames=frames):
            out.write(chunk)
    return len(header) + _PIXEL_TAG.size + length


def pixel_frames(kind: ImageKind, *, seed: int, index: int, frames: int) -> Iterator[bytes]:
    """Pseudo-random frames, the same for the same (kind, seed, index)."""
    rng = random.Random(f"{kind.name}/{seed}/{index}")
    for _ in range(frames):
        yield rng.randbytes(kind.frame_bytes)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["dicom-gateway bench", *map(str, parts)]))


def _dataset(kind: ImageKind, *, seed: int, index: int, frames: int, study: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(kind.sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(seed, kind.name, "instance", index))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = kind.sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240601"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"BENCH{seed % 1000:03d}{study:05d}"
    ds.Modality = kind.modality
    ds.Manufacturer = "dicom-gateway bench"
    ds.InstitutionName = "Benchmark Hospital"
    ds.StationName = f"{kind.modality}ROOM{study % 4 + 1}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"BENCH {kind.name.upper()} STUDY"
    ds.PatientName = f"BENCH^PATIENT{study:05d}"
    ds.PatientID = f"BENCH{seed % 1000:03d}-{study:05d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(seed, kind.name, "study", study)
    ds.SeriesInstanceUID = _uid(seed, kind.name, "series", study)
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SamplesPerPixel = kind.samples_per_pixel
    ds.PhotometricInterpretation = kind.photometric
    if kind.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063
    ds.Rows = kind.rows
    ds.Columns = kind.columns
    ds.BitsAllocated = kind.bits_allocated
    ds.BitsStored = 12 if kind.bits_allocated == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if kind.bits_allocated == 16 else 0
    if kind is CT:
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.SliceThickness = 1.0
        ds.ImagePositionPatient = [0, 0, float(index)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
    return ds


def _part10_header(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Worklist


def worklist_items(count: int, *, seed: int, station_ae: str) -> list[Dataset]:
    """``count`` scheduled ultrasound procedure steps for ``station_ae``, reproducible by ``seed``."""
    rng = random.Random(f"worklist/{seed}")
    return [_worklist_item(i, seed, station_ae, rng) for i in range(count)]


def _worklist_item(index: int, seed: int, station_ae: str, rng: random.Random) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = f"BENCH^WORKLIST{index:05d}"
    ds.PatientID = f"WL{seed % 1000:03d}-{index:05d}"
    ds.PatientBirthDate = f"{rng.randint(1940, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    ds.PatientSex = rng.choice(("F", "M", "O"))
    ds.AccessionNumber = f"WLACC{index:07d}"
    ds.ReferringPhysicianName = "BENCH^REFERRER"
    ds.RequestedProcedureID = f"RP{index:06d}"
    ds.RequestedProcedureDescription = "US abdomen complete"
    ds.StudyInstanceUID = _uid(seed, "worklist", index)
    step = Dataset()
    step.Modality = "US"
    step.ScheduledStationAETitle = station_ae
    step.ScheduledProcedureStepStartDate = "20240601"
    step.ScheduledProcedureStepStartTime = f"{8 + index // 60 % 10:02d}{index % 60:02d}00"
    step.ScheduledPerformingPhysicianName = "BENCH^SONOGRAPHER"
    step.ScheduledProcedureStepDescription = "US abdomen complete"
    step.ScheduledProcedureStepID = f"SPS{index:06d}"
    ds.ScheduledProcedureStepSequence = DicomSequence([step])
    return ds


def write_worklist_files(directory: Path, items: Sequence[Dataset]) -> None:
    """Each item as a bare implicit VR little endian dataset ``item-NNNNN.wl`` (what wlmscpfs reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        item.save_as(directory / f"item-{index:05d}.wl", implicit_vr=True, little_endian=True,
                     enforce_file_format=False)
