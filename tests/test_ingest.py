"""Ingest end to end with real peers: what a sender put on the wire is what the spool holds.

DCMTK (storescu, dcmsend, echoscu), pynetdicom and Orthanc talk to a real gateway running in a thread.
DCMTK re-encodes a file's dataset before sending it (it drops trailing padding, rewrites odd lengths,
...), so for DCMTK the reference is what DCMTK sends, recorded by a pynetdicom SCP that keeps the raw
received bytes; the byte-for-byte comparison with the original file is made with a sender that
transmits the file's bytes unchanged (our requestor's ``store_file``, the gateway's forwarding path)
and with DCMTK for generated images, which it does not re-encode.

The spool's fault seam (``gateway.spool.FileSystem``) makes the disk full, read-only or failing on
fsync; every refusal must be the exact status 0xA700, never a Success.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import GatewayThread
from peers import (
    SAMPLE_FILES,
    Orthanc,
    Peers,
    StoreSCP,
    dataset_bytes,
    free_port,
    make_us_image,
    run_dcmsend,
    run_echoscu,
    run_storescu,
    split_part10,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from gateway.dicom import dimse, pdu
from gateway.dicom.requestor import RequestorAssociation, RequestorConfig
from gateway.journal import HeldItem
from gateway.settings import Destination, RetryPolicy, Settings
from gateway.spool import FileSystem, Spool

HOST = "127.0.0.1"
GATEWAY_AE = "DICOMGW"
OUT_OF_RESOURCES = 0xA700
VERIFICATION = "1.2.840.10008.1.1"
US = "1.2.840.10008.5.1.4.1.1.6.1"
WAIT = 30.0

# storescu proposes one presentation context per transfer syntax: with these options it sends each
# file in the file's own syntax
STORESCU_OPTIONS: dict[str, list[str]] = {
    "implicit_le": ["-xi"], "explicit_le": ["-xe"], "big_endian": ["-xb"], "deflate": ["-xd"],
    "jpeg_baseline": ["-xy"], "jpeg_lossless": ["-xs"], "jpeg_ls": ["-xt"],
    "jpeg2000_lossless": ["-xv"], "jpeg2000": ["-xw"], "rle": ["-xr"],
}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)  # no rule files: everything is held in the spool
    values: dict[str, Any] = {
        "ae_title": GATEWAY_AE, "host": HOST, "port": 0, "http_port": 0,
        "spool_dir": tmp_path / "spool", "rules_dir": rules, "shutdown_timeout": 2.0,
        **overrides,
    }
    return Settings(**values)


def held(gw: GatewayThread) -> list[HeldItem]:
    assert gw.gateway is not None
    spool = gw.gateway.spool
    return gw.call(lambda: spool.held_items(10_000))


def spooled_dataset(item: HeldItem) -> bytes:
    return item.path.read_bytes()[item.dataset_offset:]


def successes(output: str) -> int:
    return len(re.findall(r"Received (?:C-)?Store Response \(Success\)", output, re.IGNORECASE))


def readiness_reasons(gw: GatewayThread) -> tuple[str, ...]:
    assert gw.gateway is not None
    gateway = gw.gateway

    async def ask() -> tuple[str, ...]:
        return gateway.readiness().reasons

    return gw.call(ask)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayThread]:
    with GatewayThread(make_settings(tmp_path)) as gateway:
        yield gateway


# ---------------------------------------------------------------------- a raw-bytes recorder


class Recorder:
    """A pynetdicom storage SCP that keeps each received dataset's raw bytes (as sent)."""

    def __init__(self) -> None:
        self.received: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self.ae = AE(ae_title="RECORDER")
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        server = self.ae.start_server((HOST, 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server
        self.port: int = server.server_address[1]

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE) and isinstance(request.DataSet, io.BytesIO)
        key = (str(request.AffectedSOPInstanceUID), str(event.context.transfer_syntax))
        with self._lock:
            self.received[key] = request.DataSet.getvalue()
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    try:
        yield rec
    finally:
        rec.close()


# ------------------------------------------------------------------------------ pynetdicom SCU


def pynetdicom_store(port: int, datasets: Sequence[Dataset]) -> list[int]:
    """Send ``datasets`` on one association; the exact status of each C-STORE."""
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(US, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(HOST, port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert "Status" in status, "no C-STORE response"
            statuses.append(int(status.Status))
        return statuses
    finally:
        assoc.release()


def small_us(tmp_path: Path, seed: int) -> Dataset:
    return make_us_image(tmp_path / "images" / f"us-{seed}.dcm", seed=seed, rows=64, cols=64)


# ======================================================================== 1. bytes identical


@pytest.mark.peer
def test_dcmtk_sends_every_sample_in_its_own_syntax_and_the_spool_holds_what_it_sent(
    gw: GatewayThread, recorder: Recorder, sample_files: dict[str, Path]
) -> None:
    for category, path in sample_files.items():
        options = [*STORESCU_OPTIONS[category], "-v"]
        reference = run_storescu(recorder.port, [path], called_ae="RECORDER", extra_args=options)
        assert reference.returncode == 0, reference.stderr
        result = run_storescu(gw.port, [path], called_ae=GATEWAY_AE, extra_args=options)
        assert result.returncode == 0, result.stderr
        assert successes(result.stdout + result.stderr) == 1, (category, result.stderr)

    items = held(gw)
    assert len(items) == len(sample_files)
    stored = {(item.sop_instance_uid, item.transfer_syntax): spooled_dataset(item) for item in items}
    expected_syntaxes = {(dcmread(p, stop_before_pixels=True).SOPInstanceUID,
                          str(SAMPLE_FILES[c].transfer_syntax)) for c, p in sample_files.items()}
    assert set(stored) == expected_syntaxes  # every file arrived in its own transfer syntax
    assert set(recorder.received) == set(stored)
    for key, data in stored.items():
        assert data == recorder.received[key], key


@pytest.mark.peer
async def test_an_unchanged_sender_gets_every_sample_spooled_byte_for_byte(
    gw: GatewayThread, sample_files: dict[str, Path]
) -> None:
    """Our requestor streams a file's dataset bytes as they are: the spool must hold exactly the
    bytes after the original file's meta group, in every transfer syntax."""
    syntaxes = {c: str(SAMPLE_FILES[c].transfer_syntax) for c in sample_files}
    metas = {c: dcmread(p, stop_before_pixels=True) for c, p in sample_files.items()}
    proposals = tuple(pdu.ContextProposal(2 * i + 1, str(metas[c].SOPClassUID), (syntaxes[c],))
                      for i, c in enumerate(sample_files))
    assoc = await RequestorAssociation.open(HOST, gw.port, GATEWAY_AE, proposals,
                                            RequestorConfig("REQUESTOR", dimse_timeout=WAIT))
    try:
        for category, path in sample_files.items():
            context = assoc.context_for(str(metas[category].SOPClassUID), (syntaxes[category],))
            assert context is not None, category
            data = path.read_bytes()
            response = await assoc.store_file(context, str(metas[category].SOPClassUID),
                                              str(metas[category].SOPInstanceUID), path,
                                              split_part10(data)[1])
            assert response.status == dimse.SUCCESS, category
    finally:
        await assoc.release()

    items = await asyncio.to_thread(held, gw)
    assert len(items) == len(sample_files)
    for item, (category, path) in zip(items, sample_files.items(), strict=True):
        assert item.transfer_syntax == syntaxes[category]
        assert spooled_dataset(item) == dataset_bytes(path), category


@pytest.mark.peer
def test_dcmtk_sends_generated_ultrasound_images_and_the_spool_holds_their_bytes(
    gw: GatewayThread, tmp_path: Path
) -> None:
    paths = [tmp_path / "us" / f"us-{i}.dcm" for i in range(5)]
    for seed, path in enumerate(paths):
        make_us_image(path, seed=seed)  # 640 x 480 RGB, explicit VR little endian

    result = run_storescu(gw.port, paths, called_ae=GATEWAY_AE, extra_args=["-v"])

    assert result.returncode == 0, result.stderr
    assert successes(result.stderr) == len(paths)
    by_uid = {item.sop_instance_uid: item for item in held(gw)}
    for path in paths:
        item = by_uid[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        assert item.transfer_syntax == "1.2.840.10008.1.2.1"
        assert spooled_dataset(item) == dataset_bytes(path)
        assert item.path.read_bytes()[:132] == bytes(128) + b"DICM"
        assert dcmread(item.path).file_meta.SourceApplicationEntityTitle == "STORESCU"


# ============================================================================ 6. conformance


@pytest.mark.peer
def test_dcmtk_echoscu_is_answered(gw: GatewayThread) -> None:
    result = run_echoscu(gw.port, called_ae=GATEWAY_AE)
    assert result.returncode == 0, result.stderr


@pytest.mark.peer
def test_dcmsend_stores_every_sample(gw: GatewayThread, sample_files: dict[str, Path]) -> None:
    result = run_dcmsend(gw.port, sample_files.values(), called_ae=GATEWAY_AE, extra_args=["-v"])

    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert successes(output) == len(sample_files)
    assert re.search(rf"with status SUCCESS\s*:\s*{len(sample_files)}", output), output
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sample_files.values()}
    assert {item.sop_instance_uid for item in held(gw)} == uids


@pytest.mark.peer
def test_pynetdicom_scu_echoes_and_stores(gw: GatewayThread, tmp_path: Path) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, gw.port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0x0000
    assoc.release()

    datasets = [small_us(tmp_path, seed) for seed in range(3)]
    assert pynetdicom_store(gw.port, datasets) == [0x0000] * 3
    assert {item.sop_instance_uid for item in held(gw)} == {ds.SOPInstanceUID for ds in datasets}


@pytest.mark.peer
def test_orthanc_stores_to_the_gateway_as_a_dicom_modality(
    gw: GatewayThread, orthanc: Callable[..., Orthanc], sample_files: dict[str, Path]
) -> None:
    peer = orthanc(modalities={"GATEWAY": (GATEWAY_AE, HOST, gw.port)})
    instance = peer.upload(sample_files["explicit_le"])
    assert peer.echo("GATEWAY")

    peer.send_to_modality("GATEWAY", [instance])  # raises unless Orthanc reports success

    uid = peer.instance_tags(instance)["SOPInstanceUID"]
    (item,) = held(gw)
    assert item.sop_instance_uid == uid
    assert item.calling_ae == "ORTHANC"
    assert dcmread(item.path).SOPInstanceUID == uid


# =================================================================== 3. refusals with 0xA700


@dataclass
class FaultyDisk(FileSystem):
    """The spool's file-system seam with switchable faults; statvfs reports ``free_fraction``."""

    free_fraction: float = 0.5
    open_error: int = 0
    write_error: int = 0
    fsync_error: int = 0
    recheck_seconds: float = 0.0  # always ask again: a cleared fault is seen at once

    def open(self, path: str, flags: int, mode: int) -> int:
        if self.open_error:
            raise OSError(self.open_error, os.strerror(self.open_error), path)
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.write_error:
            raise OSError(self.write_error, os.strerror(self.write_error))
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fsync_error:
            raise OSError(self.fsync_error, os.strerror(self.fsync_error))
        super().fsync(fd)

    def statvfs(self, path: str) -> os.statvfs_result:
        real = os.statvfs(path)
        blocks = 1_000_000
        free = int(blocks * self.free_fraction)
        return os.statvfs_result((real.f_bsize, real.f_frsize, blocks, free, free, real.f_files,
                                  real.f_ffree, real.f_favail, real.f_flag, real.f_namemax))


def gateway_with_disk(tmp_path: Path, disk: FaultyDisk) -> GatewayThread:
    settings = make_settings(tmp_path)
    spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes,
                  min_free_fraction=settings.spool_min_free_fraction, fs=disk)
    return GatewayThread(settings, spool=spool)


def leftovers(tmp_path: Path) -> list[Path]:
    spool = tmp_path / "spool"
    return [p for p in (spool / "tmp").iterdir()] + [
        p for p in (spool / "objects").rglob("*") if p.is_file()]


@pytest.mark.peer
def test_over_the_byte_high_water_mark_c_store_gets_a700_until_the_queue_drains(
    tmp_path: Path, peers: Peers
) -> None:
    pacs_port = free_port()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10-all.yaml").write_text("rules:\n  - name: all\n    destinations: [PACS]\n")
    pacs = Destination(ae_title="PACS", host=HOST, port=pacs_port, connect_timeout=2.0,
                       retry=RetryPolicy(base_delay=0.05, max_delay=0.2))
    settings = make_settings(tmp_path, spool_max_bytes=1, destinations={"PACS": pacs})
    with GatewayThread(settings) as gw:
        first, *refused = [small_us(tmp_path, seed) for seed in range(4)]
        assert pynetdicom_store(gw.port, [first]) == [0x0000]  # the spool was empty: taken
        assert pynetdicom_store(gw.port, refused) == [OUT_OF_RESOURCES] * 3  # never a Success
        assert "spool over its high-water mark" in readiness_reasons(gw)
        assert len(leftovers(tmp_path)) == 1  # only the first object; refused ones left nothing

        # the PACS comes up (forking: its readiness probe must not queue behind our forwarder)
        scp: StoreSCP = peers.store_scp(ae_title="PACS", port=pacs_port, fork=True)
        gw.wait_for(lambda g: g.delivered("PACS") >= 1, timeout=WAIT)

        assert pynetdicom_store(gw.port, [refused[0]]) == [0x0000]  # room again
        gw.wait_for(lambda g: g.delivered("PACS") >= 2, timeout=WAIT)
        received = {dcmread(f).SOPInstanceUID for f in scp.received_files()}
        assert received == {first.SOPInstanceUID, refused[0].SOPInstanceUID}


def test_a_nearly_full_disk_refuses_with_a700_and_recovers_when_space_returns(
    tmp_path: Path,
) -> None:
    disk = FaultyDisk(free_fraction=0.01)  # below spool_min_free_fraction (0.05)
    with gateway_with_disk(tmp_path, disk) as gw:
        assert pynetdicom_store(gw.port, [small_us(tmp_path, 1), small_us(tmp_path, 2)]) == [
            OUT_OF_RESOURCES] * 2
        assert "spool over its high-water mark" in readiness_reasons(gw)
        assert leftovers(tmp_path) == []

        disk.free_fraction = 0.5
        assert pynetdicom_store(gw.port, [small_us(tmp_path, 3)]) == [0x0000]
        assert readiness_reasons(gw) == ()
        assert len(held(gw)) == 1


@pytest.mark.parametrize("fault", ["open_error", "write_error", "fsync_error"])
@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EIO])
def test_disk_faults_refuse_with_a700_and_the_next_store_succeeds_once_cleared(
    tmp_path: Path, fault: str, code: int
) -> None:
    disk = FaultyDisk()
    with gateway_with_disk(tmp_path, disk) as gw:
        setattr(disk, fault, code)
        assert pynetdicom_store(gw.port, [small_us(tmp_path, 1)]) == [OUT_OF_RESOURCES]
        assert leftovers(tmp_path) == []
        assert held(gw) == []
        assert "spool not writable" in readiness_reasons(gw)

        setattr(disk, fault, 0)
        assert pynetdicom_store(gw.port, [small_us(tmp_path, 2)]) == [0x0000]
        assert len(held(gw)) == 1
        assert len(leftovers(tmp_path)) == 1
