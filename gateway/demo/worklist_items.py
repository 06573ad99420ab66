"""Realistic, obviously fake ultrasound worklist items for the demo RIS and for tests."""

from __future__ import annotations

import random
from datetime import date

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

FIRST_NAMES = ("ALICE", "BOB", "CAROL", "DAVID", "ERIN", "FRANK", "GRACE", "HEIDI", "IVAN", "JUDY")
PHYSICIANS = ("DEMO^DOCTOR^A", "DEMO^DOCTOR^B", "DEMO^DOCTOR^C")
CODING_SCHEME = "99DEMO"
# (code, meaning): requested procedure, and the protocol of its single scheduled step
PROCEDURES = (
    ("US-ABD", "US abdomen complete"),
    ("US-RENAL", "US kidneys and bladder"),
    ("US-THY", "US thyroid"),
    ("US-OB2", "US obstetric second trimester"),
    ("US-PELV", "US pelvis transabdominal"),
    ("US-DVT", "US venous duplex lower limb"),
)


def demo_worklist(today: date, station_ae: str = "US_DEMO", n: int = 6, seed: int = 0) -> list[Dataset]:
    """``n`` scheduled US procedures for ``today`` on ``station_ae``; the same for the same seed."""
    rng = random.Random(seed)
    return [_item(today, station_ae, index, seed, rng) for index in range(n)]


def _item(today: date, station_ae: str, index: int, seed: int, rng: random.Random) -> Dataset:
    code, meaning = PROCEDURES[rng.randrange(len(PROCEDURES))]
    accession = f"DEMO{seed:02d}{index:05d}"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = _patient_name(index)
    ds.PatientID = f"DEMO-{seed:02d}-{index:05d}"
    ds.PatientBirthDate = f"{rng.randint(1940, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    ds.PatientSex = rng.choice(("F", "M", "O"))
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = rng.choice(PHYSICIANS)
    ds.RequestedProcedureID = f"RP{seed:02d}{index:05d}"
    ds.RequestedProcedureDescription = meaning
    ds.RequestedProcedurePriority = "ROUTINE"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["dicom-gateway demo", str(seed), str(today), str(index)])
    ds.ReferencedStudySequence = Sequence()
    ds.RequestedProcedureCodeSequence = Sequence([_code(code, meaning)])
    step = _step(today, station_ae, index=index, seed=seed, procedure=(code, meaning), rng=rng)
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def _patient_name(index: int) -> str:
    first = FIRST_NAMES[index % len(FIRST_NAMES)]
    cycle = index // len(FIRST_NAMES)
    return f"DEMO^{first}" if cycle == 0 else f"DEMO{cycle + 1}^{first}"


def _step(
    today: date, station_ae: str, *, index: int, seed: int, procedure: tuple[str, str], rng: random.Random
) -> Dataset:
    code, meaning = procedure
    minutes = 8 * 60 + (index * 20) % (10 * 60) + rng.choice((0, 5, 10))
    step = Dataset()
    step.Modality = "US"
    step.ScheduledStationAETitle = station_ae
    step.ScheduledStationName = station_ae
    step.ScheduledProcedureStepStartDate = today.strftime("%Y%m%d")
    step.ScheduledProcedureStepStartTime = f"{minutes // 60:02d}{minutes % 60:02d}00"
    step.ScheduledPerformingPhysicianName = rng.choice(PHYSICIANS)
    step.ScheduledProcedureStepDescription = meaning
    step.ScheduledProcedureStepID = f"SPS{seed:02d}{index:05d}"
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    step.ScheduledProtocolCodeSequence = Sequence([_code(code, meaning)])
    return step


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodeMeaning = meaning
    return item
