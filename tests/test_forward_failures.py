"""A PACS that misbehaves: refuses, aborts, sleeps, answers failure statuses, rejects our AE title, or
accepts no syntax an image can be sent in. Transient faults are retried until the PACS behaves;
permanent ones become dead letters after exactly one attempt and come back with ``queue retry``.

Every wait goes through the forwarders' attempt observer (``GatewayThread.wait_for``), bounded.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from gateway_harness import GATEWAY_AE, GatewayThread, destination_config, gateway_config
from peers import (
    HOST,
    Peers,
    StoreSCP,
    make_us_image,
    make_us_images,
    run_dcmsend,
    run_storescu,
    sop_instance_uids,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from gateway import cli, forwarder
from gateway.demo.simulators import ALL_TRANSFER_SYNTAXES, VERIFICATION, StorageSimulator
from gateway.dicom.pdu import ContextProposal
from gateway.dicom.requestor import RequestorAssociation, RequestorConfig
from gateway.errors import SpoolFull
from gateway.journal import Delivery, ItemInfo
from gateway.settings import load_settings
from gateway.spool import Spool

pytestmark = pytest.mark.peer  # every test sends with DCMTK storescu or dcmsend

WAIT = 60.0

ALL_TO_PACS = """
rules:
  - name: everything
    destinations: [PACS]
"""


@pytest.fixture(autouse=True)
def fast_rescan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forwarders pick up ``queue retry`` from another process at their next rescan: make it soon."""
    monkeypatch.setattr(forwarder, "RESCAN", 0.2)


def write_gateway_config(tmp_path: Path, port: int, ae_title: str, **options: Any) -> Path:
    return gateway_config(tmp_path, {"PACS": destination_config(port, ae_title, **options)},
                          ALL_TO_PACS)


def gateway(config: Path) -> GatewayThread:
    return GatewayThread(load_settings(config))






def send(gw: GatewayThread, files: list[Path], calling_ae: str = "US_ROOM1") -> None:
    result = run_storescu(gw.port, files, calling_ae=calling_ae, called_ae=GATEWAY_AE)
    assert result.returncode == 0, result.stderr


def items(gw: GatewayThread, *, dead: bool) -> list[ItemInfo]:
    assert gw.gateway is not None
    spool = gw.gateway.spool
    return gw.call(lambda: spool.list_items(destination="PACS", dead=dead, held=False, limit=100))


# ------------------------------------------------------------------------------------------ peers


class PickyPACS:
    """A pynetdicom storage SCP that accepts only the calling AE titles in ``allowed``: anyone else
    gets A-ASSOCIATE-RJ 1,1,3 (rejected-permanent, calling AE title not recognized)."""

    def __init__(self, ae_title: str, allowed: list[str]) -> None:
        self.ae = AE(ae_title=ae_title)
        self.ae.require_calling_aet = allowed
        self.ae.add_supported_context(VERIFICATION)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> int:
        server = self.ae.start_server(
            (HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None
        self.server = server
        return int(server.server_address[1])

    def _on_store(self, event: Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        with self._lock:
            self.received.append(str(request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def picky_pacs() -> Iterator[PickyPACS]:
    pacs = PickyPACS("PICKY", allowed=["SOMEONE_ELSE"])
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[StorageSimulator]:
    pacs = StorageSimulator("SIMPACS", 0, tmp_path / "simulator")
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


# ------------------------------------------------------------------------------- transient faults

FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "refuse": ({"refuse": True}, "A-ASSOCIATE-RJ 1,1,1"),
    "abort-during": ({"abort_during": True}, "aborted"),
    "abort-after": ({"abort_after": True}, "aborted"),
    "sleep-during": ({"sleep_during": 3}, "did not answer in time"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_pacs_is_retried_until_it_behaves(tmp_path: Path, peers: Peers, fault: str) -> None:
    options, symptom = FAULTS[fault]
    broken = peers.store_scp(ae_title="PACS", **options)
    # a dimse_timeout shorter than the PACS sleeps (the sleep also holds back the next association)
    config = write_gateway_config(tmp_path, broken.port, "PACS", dimse_timeout=0.5, connect_timeout=1.0)
    images = make_us_images(tmp_path / "us", 2)

    with gateway(config) as gw:
        send(gw, images)
        gw.wait_for(lambda g: g.attempts[("PACS", "transient")] >= 2 or bool(g.dead), WAIT)
        assert not gw.dead, f"a transient fault was dead-lettered: {dict(gw.attempts)}"
        assert gw.delivered("PACS") == 0
        waiting = items(gw, dead=False)
        assert len(waiting) == len(images), "nothing is dead-lettered for a transient fault"
        tried = [item for item in waiting if item.attempts]
        assert tried
        for item in tried:
            assert item.last_error is not None and item.last_error.startswith("PACS: ")
            assert symptom in item.last_error
            assert item.next_attempt_at is not None, "a retry is scheduled"

        broken.stop()
        # --fork: the gateway connects as soon as the port opens; the readiness C-ECHO must not
        # wait behind its association
        healthy = peers.store_scp(ae_title="PACS", port=broken.port, fork=True)
        gw.wait_for(lambda g: g.delivered("PACS") >= len(images), WAIT)

    assert not gw.dead
    assert gw.attempts[("PACS", "permanent")] == 0
    assert sop_instance_uids(healthy.received_files()) == sop_instance_uids(images)


def test_out_of_resources_is_retried_until_the_pacs_recovers(
    tmp_path: Path, simulator: StorageSimulator
) -> None:
    simulator.status = 0xA700
    config = write_gateway_config(tmp_path, simulator.port, simulator.ae_title)
    images = make_us_images(tmp_path / "us", 2)

    with gateway(config) as gw:
        send(gw, images)
        gw.wait_for(lambda g: g.attempts[("PACS", "transient")] >= 3, WAIT)
        errors = {item.last_error for item in items(gw, dead=False) if item.attempts}
        assert errors == {"0xA700 Refused: Out of Resources (transient: will retry)"}
        simulator.status = 0x0000
        gw.wait_for(lambda g: g.delivered("PACS") >= len(images), WAIT)

    assert not gw.dead
    assert simulator.count == len(images)


def test_a_warning_status_counts_as_delivered_and_is_not_retried(
    tmp_path: Path, simulator: StorageSimulator
) -> None:
    simulator.status = 0xB000
    config = write_gateway_config(tmp_path, simulator.port, simulator.ae_title)
    images = make_us_images(tmp_path / "us", 3)

    with gateway(config) as gw:
        send(gw, images)
        gw.wait_for(lambda g: g.delivered("PACS") >= len(images), WAIT)
        assert items(gw, dead=False) == []

    assert dict(gw.attempts) == {("PACS", "warning"): len(images)}
    assert simulator.count == len(images)


def test_a_failure_status_is_a_dead_letter_after_one_attempt(
    tmp_path: Path, simulator: StorageSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.status = 0xC000
    simulator.comment = "Patient ID PAT-4711 does not match"  # PACS free text may name the patient
    caplog.set_level(logging.WARNING, logger="gateway")
    config = write_gateway_config(tmp_path, simulator.port, simulator.ae_title)
    images = make_us_images(tmp_path / "us", 2)

    with gateway(config) as gw:
        send(gw, images)
        gw.wait_for(lambda g: g.dead["PACS"] >= len(images), WAIT)
        dead = items(gw, dead=True)

    assert dict(gw.attempts) == {("PACS", "permanent"): len(images)}
    assert [item.attempts for item in dead] == [1] * len(images)
    for item in dead:
        assert item.last_status == 0xC000
        assert item.last_error is not None and "0xC000" in item.last_error
        assert "permanent failure, not retried" in item.last_error
        assert "PAT-4711" in item.last_error  # for the operator, in the queue
    assert simulator.count == 0
    dead_lettered = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(dead_lettered) == len(images)
    assert not any("PAT-4711" in message for message in dead_lettered)  # never in the log


# ------------------------------------------------------------------------------- permanent rejection


def test_a_pacs_that_rejects_our_ae_title_gets_one_attempt_then_queue_retry_delivers(
    tmp_path: Path, picky_pacs: PickyPACS, capsys: pytest.CaptureFixture[str]
) -> None:
    port = picky_pacs.start()
    config = write_gateway_config(tmp_path, port, "PICKY")
    images = make_us_images(tmp_path / "us", 2)

    with gateway(config) as gw:
        send(gw, images)
        gw.wait_for(lambda g: g.dead["PACS"] >= len(images), WAIT)
        dead = items(gw, dead=True)
        assert [item.attempts for item in dead] == [1, 1]
        for item in dead:
            assert item.last_error is not None
            assert "does not know our calling AE title DICOMGW" in item.last_error
            assert "[A-ASSOCIATE-RJ 1,1,3 rejected-permanent]" in item.last_error
        assert cli.main(["queue", "list", "--dead", "--config", str(config)]) == 0
        listing = capsys.readouterr().out
        assert listing.count(" PACS dead attempts=1 ") == len(images)
        assert dict(gw.attempts) == {("PACS", "permanent"): len(images)}, "no retry loop"
        assert gw.gateway is not None
        refused = gw.gateway.registry.get_sample_value(
            "dicomgw_associations_total", {"direction": "out", "peer": "PACS", "result": "rejected"})
        assert refused == len(images)  # every attempt's association was refused, and counted

        picky_pacs.ae.require_calling_aet = []  # the PACS administrator registers DICOMGW
        assert cli.main(["queue", "retry", "PACS", "--config", str(config)]) == 0
        assert capsys.readouterr().out.strip() == f"re-queued {len(images)} dead-lettered deliveries"
        gw.wait_for(lambda g: g.delivered("PACS") >= len(images), WAIT)
        assert items(gw, dead=True) == []

    assert dict(gw.attempts) == {("PACS", "permanent"): len(images), ("PACS", "delivered"): len(images)}
    assert collections.Counter(picky_pacs.received) == sop_instance_uids(images)


# ------------------------------------------------------------------------------- transfer syntaxes


def test_a_jpeg_image_no_context_accepts_is_a_dead_letter_that_names_class_syntax_and_destination(
    tmp_path: Path, sample_files: dict[str, Path]
) -> None:
    with StoreSCP(tmp_path / "pacs", ae_title="PACS", syntaxes="+x=") as pacs:
        config = write_gateway_config(tmp_path, pacs.port, "PACS")
        later = make_us_images(tmp_path / "us", 1)
        with gateway(config) as gw:
            result = run_dcmsend(
                gw.port, [sample_files["jpeg_baseline"]], calling_ae="US_ROOM1", called_ae=GATEWAY_AE
            )
            assert result.returncode == 0, result.stderr
            gw.wait_for(lambda g: g.dead["PACS"] >= 1, WAIT)
            send(gw, later)  # the dead letter blocks nothing behind it
            gw.wait_for(lambda g: g.delivered("PACS") >= 1, WAIT)
            dead = items(gw, dead=True)
        received = pacs.received_files()

    assert dict(gw.attempts) == {("PACS", "permanent"): 1, ("PACS", "delivered"): 1}
    assert len(dead) == 1 and dead[0].attempts == 1
    reason = dead[0].last_error or ""
    assert reason.startswith("PACS: the peer accepts no transfer syntax")
    for words in (
        "'Ultrasound Multi-frame Image Storage' (1.2.840.10008.5.1.4.1.1.3.1)",
        "'JPEG Baseline (Process 1)' (1.2.840.10008.1.2.4.50)",
        "permanent failure, not retried",
    ):
        assert words in reason
    assert sop_instance_uids(received) == sop_instance_uids(later)


def test_queue_retry_of_a_no_context_dead_letter_negotiates_again_once_the_pacs_is_fixed(
    tmp_path: Path, peers: Peers, sample_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    plain = StoreSCP(tmp_path / "plain", ae_title="PACS", syntaxes="+x=").start()
    try:
        # the default idle_timeout (30 s) keeps the association that refused JPEG open meanwhile
        config = write_gateway_config(tmp_path, plain.port, "PACS")
        with gateway(config) as gw:
            result = run_dcmsend(
                gw.port, [sample_files["jpeg_baseline"]], calling_ae="US_ROOM1", called_ae=GATEWAY_AE
            )
            assert result.returncode == 0, result.stderr
            gw.wait_for(lambda g: g.dead["PACS"] >= 1, WAIT)
            plain.stop()
            fixed = peers.store_scp(ae_title="PACS", port=plain.port, fork=True)  # accepts JPEG
            assert cli.main(["queue", "retry", "PACS", "--config", str(config)]) == 0
            assert capsys.readouterr().out.strip() == "re-queued 1 dead-lettered deliveries"
            gw.wait_for(lambda g: g.delivered("PACS") >= 1 or g.dead["PACS"] >= 2, WAIT)
    finally:
        plain.stop()

    assert dict(gw.attempts) == {("PACS", "permanent"): 1, ("PACS", "delivered"): 1}
    assert sop_instance_uids(fixed.received_files()) == sop_instance_uids([sample_files["jpeg_baseline"]])


def test_an_explicit_vr_image_is_converted_for_a_pacs_that_takes_implicit_vr_only(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs", ae_title="PACS", syntaxes="+xi") as pacs:
        config = write_gateway_config(tmp_path, pacs.port, "PACS")
        images = make_us_images(tmp_path / "us", 2)
        with gateway(config) as gw:
            send(gw, images)
            gw.wait_for(lambda g: g.delivered("PACS") >= len(images), WAIT)
        received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, pacs.received_files())}

    assert dict(gw.attempts) == {("PACS", "delivered"): len(images)}
    for path in images:
        original = dcmread(path)
        assert original.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        copy = received[str(original.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert copy.PixelData == original.PixelData
        assert {e.keyword: e.value for e in copy} == {e.keyword: e.value for e in original}


def malformed(path: Path) -> tuple[str, str, bytes]:
    """(SOP class, SOP Instance UID, dataset bytes) of a US image whose Patient ID has the unknown
    VR 'XX': the routing header parses, a full decode (a syntax conversion) cannot."""
    ds = make_us_image(path, seed=99, rows=16, cols=16)
    data = path.read_bytes()
    (meta_length,) = struct.unpack_from("<I", data, 140)  # (0002,0000) UL follows preamble + DICM
    dataset = data[144 + meta_length :]
    patient_id = b"\x10\x00\x20\x00LO"
    assert dataset.count(patient_id) == 1
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), dataset.replace(patient_id, b"\x10\x00\x20\x00XX")


async def store_raw(port: int, sop_class: str, sop_instance: str, dataset: bytes) -> int:
    """C-STORE dataset bytes as they are (Explicit VR Little Endian) with the gateway's own requestor."""
    proposal = ContextProposal(1, sop_class, (str(ExplicitVRLittleEndian),))
    association = await RequestorAssociation.open(
        HOST, port, GATEWAY_AE, [proposal], RequestorConfig("US_ROOM1", connect_timeout=5, dimse_timeout=15)
    )
    try:
        context = association.context_for(sop_class, [str(ExplicitVRLittleEndian)])
        assert context is not None
        response = await association.store_bytes(context, sop_class, sop_instance, dataset)
    finally:
        await association.release()
    return response.status or 0


def test_an_object_that_cannot_be_converted_is_a_dead_letter_and_the_gateway_keeps_running(
    tmp_path: Path,
) -> None:
    sop_class, sop_instance, dataset = malformed(tmp_path / "source.dcm")
    with StoreSCP(tmp_path / "pacs", ae_title="PACS", syntaxes="+xi") as pacs:
        config = write_gateway_config(tmp_path, pacs.port, "PACS")
        later = make_us_images(tmp_path / "us", 1)
        with gateway(config) as gw:
            assert anyio.run(store_raw, gw.port, sop_class, sop_instance, dataset) == 0x0000
            gw.wait_for(lambda g: g.dead["PACS"] >= 1, WAIT)
            send(gw, later)
            gw.wait_for(lambda g: g.delivered("PACS") >= 1, WAIT)
            dead = items(gw, dead=True)
        received = pacs.received_files()

    assert dict(gw.attempts) == {("PACS", "permanent"): 1, ("PACS", "delivered"): 1}
    assert len(dead) == 1 and dead[0].sop_instance_uid == sop_instance
    reason = dead[0].last_error or ""
    assert reason.startswith("PACS: ")
    for words in ("'Implicit VR Little Endian'", "'Explicit VR Little Endian'", "'Ultrasound Image Storage'"):
        assert words in reason
    assert sop_instance_uids(received) == sop_instance_uids(later)


class FlakyJournalSpool(Spool):
    """A spool whose journal fails the first ``failures`` reads of the queue and records of attempts
    (as SQLite does when the queue CLI holds the write lock past the busy timeout, or the disk is full)."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.read_failures = failures
        self.record_failures = failures

    async def pending(self, destination: str, after_id: int, limit: int, now: float) -> list[Delivery]:
        if self.read_failures > 0:
            self.read_failures -= 1
            raise SpoolFull("spool: journal error while reading the queue (database is locked)")
        return await super().pending(destination, after_id, limit, now)

    async def record_attempt(
        self,
        instance_id: int,
        destination: str,
        outcome: str,
        status: int | None,
        detail: str,
        *,
        next_attempt_at: float | None,
        dead: bool,
    ) -> None:
        if self.record_failures > 0:
            self.record_failures -= 1
            raise SpoolFull("spool: journal error while recording a forward attempt (database is locked)")
        await super().record_attempt(
            instance_id, destination, outcome, status, detail, next_attempt_at=next_attempt_at, dead=dead
        )


def test_a_journal_error_while_forwarding_is_survived_and_the_delivery_is_sent_again(
    tmp_path: Path, simulator: StorageSimulator
) -> None:
    config = write_gateway_config(tmp_path, simulator.port, simulator.ae_title)
    settings = load_settings(config)
    spool = FlakyJournalSpool(settings.spool_dir, failures=2)
    images = make_us_images(tmp_path / "us", 2)

    with GatewayThread(settings, spool=spool) as gw:
        send(gw, images)
        gw.wait_for(lambda g: g.delivered("PACS") >= len(images), WAIT)

    assert gw.error is None
    assert (spool.read_failures, spool.record_failures) == (0, 0)
    assert dict(gw.attempts) == {("PACS", "delivered"): len(images)}
    # an attempt whose record was lost is sent again: at least once, never lost
    assert simulator.count == len(images) + 2
