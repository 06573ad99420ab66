"""systemd's notify protocol as the service manager sees it.

A real ``dicom-gateway serve`` process talks to a datagram socket the test binds (what systemd
does for ``Type=notify``): ``READY=1`` must come only once the spool has been recovered and the
gateway answers DICOM, ``WATCHDOG=1`` must keep coming at half of ``WATCHDOG_USEC``, and SIGTERM
must be announced with ``STOPPING=1`` before the process exits cleanly. Every wait is a bounded
``recv`` on the socket or a bounded process wait.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
import yaml
from gateway_harness import write_config
from peers import HOST, free_port, http_get, make_us_image, scraped_value
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.sdnotify import Notifier
from gateway.spool import InstanceMeta, Spool

GATEWAY_AE = "DICOMGW"
DESTINATION = "PACS"
WATCHDOG_USEC = 200_000
TIMEOUT = 20.0


# ---------------------------------------------------------------------------------------------
# Helpers


class NotifySocket:
    """The service manager's end: a bound datagram socket that records what it receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def next(self, timeout: float = TIMEOUT) -> str:
        """The next datagram, or TimeoutError after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.received.append(message)
        return message

    def until(self, field: str, timeout: float = TIMEOUT) -> list[str]:
        """Datagrams up to and including the first one carrying ``field`` (e.g. ``READY=1``)."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {field} within {timeout} s; got {seen}")
            message = self.next(remaining)
            seen.append(message)
            if field in message.splitlines():
                return seen

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def dataset_bytes(path: Path) -> tuple[str, str, bytes]:
    """(SOP Class UID, SOP Instance UID, dataset encoded in explicit VR little endian)."""
    dataset = dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    del dataset.file_meta
    write_dataset(buffer, dataset)
    return str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), buffer.getvalue()


async def seed_pending_delivery(spool_dir: Path, image: Path) -> str:
    """Leave one acknowledged object in the spool with a delivery pending to DESTINATION."""
    sop_class, sop_instance, data = dataset_bytes(image)
    spool = Spool(spool_dir)
    await spool.open()
    try:
        writer = spool.begin(InstanceMeta(sop_class, sop_instance, "1.2.840.10008.1.2.1",
                                          "US_SEED", GATEWAY_AE, HOST))
        writer.write(data)
        await writer.commit([DESTINATION], ["seed"])
    finally:
        await spool.close()
    return sop_instance


def gateway_config(directory: Path, *, dicom_port: int, http_port: int) -> Path:
    rules = directory / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "10-all.yaml").write_text(
        f"rules:\n  - name: everything\n    destinations: [{DESTINATION}]\n")
    return write_config(directory / "gateway.yaml", {
        "ae_title": GATEWAY_AE,
        "host": HOST,
        "port": dicom_port,
        "http_host": HOST,
        "http_port": http_port,
        "spool_dir": "spool",
        "rules_dir": "rules",
        "shutdown_timeout": 2.0,
        # nothing listens there: the recovered delivery stays pending
        "destinations": {DESTINATION: {"ae_title": "NOBODY", "host": HOST, "port": free_port(),
                                       "retry": {"base_delay": 30.0}}},
    })


@contextmanager
def serve(config: Path, notify: NotifySocket, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``dicom-gateway serve`` as systemd would start it: NOTIFY_SOCKET (+ WATCHDOG_USEC) set."""
    log = config.parent / "gateway.log"
    environ = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **env}
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT, env=environ)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)


def c_echo(port: int) -> int:
    """C-ECHO with pynetdicom (an independent implementation); returns the DIMSE status."""
    ae = AE(ae_title="SDNOTIFY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    association = ae.associate(HOST, port, ae_title=GATEWAY_AE)
    assert association.is_established, "the gateway said READY=1 but refused the association"
    try:
        status = association.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        association.release()


# ---------------------------------------------------------------------------------------------
# The process, as systemd sees it


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


async def test_ready_comes_after_spool_recovery_then_watchdog_then_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    dicom_port, http_port = free_port(), free_port()
    config = gateway_config(tmp_path / "gw", dicom_port=dicom_port, http_port=http_port)
    image = tmp_path / "seed.dcm"
    make_us_image(image, seed=7, rows=32, cols=32)
    with anyio.fail_after(TIMEOUT):
        await seed_pending_delivery(tmp_path / "gw" / "spool", image)

    with serve(config, notify, WATCHDOG_USEC=str(WATCHDOG_USEC)) as process:
        before_ready = notify.until("READY=1")
        # at the instant READY=1 arrives: recovered, listening, ready, the old delivery queued
        assert before_ready == [before_ready[-1]], f"messages before READY=1: {before_ready}"
        assert "spool recovered: 1 pending deliveries" in (tmp_path / "gw" / "gateway.log").read_text()
        assert c_echo(dicom_port) == 0x0000
        assert http_get(http_port, "/readyz")[0] == 200
        metrics = http_get(http_port, "/metrics")[1]
        assert scraped_value(metrics, "dicomgw_queue_items", destination=DESTINATION) == 1

        # WATCHDOG=1 every WATCHDOG_USEC / 2 (0.1 s): the next two messages are pings
        pings = [notify.next(timeout=TIMEOUT) for _ in range(2)]
        assert pings == ["WATCHDOG=1", "WATCHDOG=1"]

        process.send_signal(signal.SIGTERM)
        after_term = notify.until("STOPPING=1")
        assert all(m in ("WATCHDOG=1", "STOPPING=1") for m in after_term), after_term
        assert process.wait(TIMEOUT) == 0


async def test_no_watchdog_pings_without_watchdog_usec(tmp_path: Path, notify: NotifySocket) -> None:
    dicom_port, http_port = free_port(), free_port()
    config = gateway_config(tmp_path / "gw", dicom_port=dicom_port, http_port=http_port)
    with serve(config, notify) as process:
        notify.until("READY=1")
        process.send_signal(signal.SIGTERM)
        # the next datagram after READY=1 is STOPPING=1: no WATCHDOG=1 in between
        assert notify.next() == "STOPPING=1"
        assert process.wait(TIMEOUT) == 0


def test_sigterm_drains_an_association_in_flight_and_refuses_new_ones(
    tmp_path: Path, notify: NotifySocket
) -> None:
    dicom_port, http_port = free_port(), free_port()
    config = gateway_config(tmp_path / "gw", dicom_port=dicom_port, http_port=http_port)
    settings = yaml.safe_load(config.read_text())
    write_config(config, {**settings, "shutdown_timeout": TIMEOUT})  # the drain outlasts the test
    image = tmp_path / "us.dcm"
    dataset = make_us_image(image, seed=9, rows=32, cols=32)
    with serve(config, notify) as process:
        notify.until("READY=1")
        ae = AE(ae_title="DRAINED")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate(HOST, dicom_port, ae_title=GATEWAY_AE)
        assert association.is_established
        try:
            process.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in notify.until("STOPPING=1")[-1]
            with pytest.raises(ConnectionRefusedError):  # no longer accepting
                socket.create_connection((HOST, dicom_port), timeout=5).close()
            status = association.send_c_store(dataset)  # the association in flight still works
            assert status.Status == 0x0000
            assert process.poll() is None  # and the gateway waits for it
        finally:
            association.release()
        assert process.wait(TIMEOUT) == 0
    objects = list((tmp_path / "gw" / "spool" / "objects").rglob("*.dcm"))
    assert len(objects) == 1


# ---------------------------------------------------------------------------------------------
# Notifier, in process


async def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"dicom-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


async def test_notifier_without_socket_or_watchdog_does_nothing() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "0"})
    assert notifier.address == ""
    assert notifier.watchdog_seconds == 0.0
    notifier.notify("READY=1")  # no socket: a no-op, not an error
    with anyio.fail_after(1):
        await notifier.watchdog()  # returns at once when no watchdog is configured


@pytest.mark.parametrize(("usec", "seconds"), [("200000", 0.2), ("30000000", 30.0), ("junk", 0.0), ("", 0.0)])
def test_watchdog_interval_comes_from_watchdog_usec(usec: str, seconds: float) -> None:
    assert Notifier({"WATCHDOG_USEC": usec}).watchdog_seconds == pytest.approx(seconds)
