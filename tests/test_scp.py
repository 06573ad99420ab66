"""Ingest in process, on a real spool: the routing decision is made as soon as the header prefix is
complete, while the rest of the dataset is still arriving, and it is the one the object is stored
with; small and unreadable datasets are decided at the end, as before."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.dicom import dimse
from gateway.dicom.events import AssociationInfo, StoreRequest
from gateway.header import PrefixTooShort
from gateway.metrics import Metrics
from gateway.routing import Decision, RuleSet
from gateway.rules import RuleFile, compile_rules
from gateway.scp import Ingest, StoreSink
from gateway.spool import Spool, StoredInstance
from gateway.spool_writer import PREFIX_BYTES

US = "1.2.840.10008.5.1.4.1.1.6.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DESTINATIONS = ("PACS_A", "PACS_B")
INFO = AssociationInfo("US_ROOM1", "GATEWAY", "192.0.2.7", 40000, {}, 16384)


def rules(modality_to: str) -> RuleSet:
    text = f"rules:\n  - name: us\n    match: {{Modality: US}}\n    destinations: [{modality_to}]\n"
    return compile_rules([RuleFile(Path("10-us.yaml"), text.encode())], DESTINATIONS)


class Rules:
    def __init__(self, current: RuleSet) -> None:
        self.current = current


def dataset(uid: str, pixel_bytes: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = US
    ds.SOPInstanceUID = uid
    ds.Modality = "US"
    ds.add_new(0x7FE00010, "OB", b"\x01" * pixel_bytes)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[tuple[Ingest, Rules, list[StoredInstance]]]:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    source = Rules(rules("PACS_A"))
    notified: list[StoredInstance] = []
    metrics = Metrics(CollectorRegistry(), destinations=DESTINATIONS)
    yield Ingest(spool, source, metrics, lambda stored, _: notified.append(stored)), source, notified
    await spool.close()


def begin(ingest: Ingest, uid: str) -> StoreSink:
    sink = ingest.begin(INFO, StoreRequest(1, US, uid, EXPLICIT_LE))
    assert isinstance(sink, StoreSink)
    return sink


async def test_a_large_dataset_is_routed_while_it_still_arrives(
    ingest: tuple[Ingest, Rules, list[StoredInstance]],
) -> None:
    service, source, notified = ingest
    data = memoryview(dataset("1.2.3.1", 4 * PREFIX_BYTES))
    sink = begin(service, "1.2.3.1")
    chunk = 16384
    for start in range(0, PREFIX_BYTES, chunk):
        sink.write(data[start : start + chunk])
    assert sink.early is None  # the prefix is full, but nothing beyond it has arrived yet

    sink.write(data[PREFIX_BYTES : PREFIX_BYTES + chunk])
    assert isinstance(sink.early, Decision) and sink.early.destinations == ("PACS_A",)

    source.current = rules("PACS_B")  # a reload now does not change where this one goes
    for start in range(PREFIX_BYTES + chunk, len(data), chunk):
        sink.write(data[start : start + chunk])
    assert await sink.finish() == (dimse.SUCCESS, "")
    (stored,) = notified
    assert stored.path.read_bytes()[stored.dataset_offset :] == data
    assert [d.destination for d in await service.spool.pending("PACS_A", 0, 10, 2e9)] == ["PACS_A"]


async def test_a_small_dataset_is_routed_when_its_last_fragment_is_in(
    ingest: tuple[Ingest, Rules, list[StoredInstance]],
) -> None:
    service, source, notified = ingest
    sink = begin(service, "1.2.3.2")
    sink.write(memoryview(dataset("1.2.3.2", 1000)))
    assert sink.early is None
    source.current = rules("PACS_B")  # the rules current at the end decide

    assert await sink.finish() == (dimse.SUCCESS, "")
    assert len(notified) == 1
    assert [d.destination for d in await service.spool.pending("PACS_B", 0, 10, 2e9)] == ["PACS_B"]


async def test_a_header_longer_than_the_prefix_is_read_from_the_file_and_the_prefix_once(
    ingest: tuple[Ingest, Rules, list[StoredInstance]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, source, notified = ingest
    text = "rules:\n  - name: jane\n    match: {PatientName: {glob: 'DOE^*'}}\n    destinations: [PACS_B]\n"
    source.current = compile_rules([RuleFile(Path("20-pn.yaml"), text.encode())], DESTINATIONS)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = US, "1.2.3.4", "US"
    ds.add_new(0x00091010, "OB", b"\0" * (2 * PREFIX_BYTES))  # a private blob before PatientName
    ds.PatientName = "DOE^JANE"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    parses: list[int] = []
    real = service.decide_from_prefix

    def counting(*args: Any) -> Decision:
        parses.append(1)
        return real(*args)

    monkeypatch.setattr(service, "decide_from_prefix", counting)
    sink = begin(service, "1.2.3.4")
    data = memoryview(fp.getvalue())
    for start in range(0, len(data), 16384):
        sink.write(data[start : start + 16384])
    assert isinstance(sink.early, PrefixTooShort)

    assert await sink.finish() == (dimse.SUCCESS, "")
    assert parses == [1]  # the prefix was not parsed a second time at the end
    assert [d.destination for d in await service.spool.pending("PACS_B", 0, 10, 2e9)] == ["PACS_B"]
    assert len(notified) == 1


async def test_a_large_unreadable_dataset_still_gets_c000_and_is_not_kept(
    ingest: tuple[Ingest, Rules, list[StoredInstance]], tmp_path: Path,
) -> None:
    service, _, notified = ingest
    sink = begin(service, "1.2.3.3")
    junk = os.urandom(3 * PREFIX_BYTES)
    for start in range(0, len(junk), 16384):
        sink.write(memoryview(junk)[start : start + 16384])

    status, _ = await sink.finish()
    assert status == dimse.STORE_CANNOT_UNDERSTAND
    assert notified == []
    assert [p for p in (tmp_path / "spool" / "objects").rglob("*") if p.is_file()] == []
