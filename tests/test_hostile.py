"""Hostile and heavy input against a gateway process: a seeded PDU fuzzer replaying mutated captures
of real DCMTK exchanges, 16 concurrent storing associations, and a scan of the logs for patient data.

The fuzzer's corpus is recorded live: a small TCP relay sits between DCMTK (`storescu`, `findscu`,
`echoscu`) and the gateway and keeps what the client sent. Mutations (bit flips, byte
substitutions, truncations, length-field rewrites, splices) use a fixed seed, so a failure replays.
``GWTEST_FUZZ_CASES`` raises the case count for a longer soak (see docs/security.md).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from gateway_harness import GatewayProcess, write_config
from peers import (
    free_port,
    make_us_image,
    run_echoscu,
    run_findscu_worklist,
    run_storescu,
)
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

pytestmark = pytest.mark.peer

CASES = int(os.environ.get("GWTEST_FUZZ_CASES", "2000"))
LOAD_SECONDS = float(os.environ.get("GWTEST_LOAD_SECONDS", "0"))  # 0: one round
BATCH = 250
RSS_LIMIT_KIB = 200 * 1024
PATIENT_NAME, PATIENT_ID = "TEST^PATIENT", "TEST0001"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Recorder:
    """A one-connection-at-a-time TCP relay that records what clients send."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captures: list[bytes] = []
        self._recorded = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with client, socket.create_connection(("127.0.0.1", self.target_port), 10) as server:
                self._relay(client, server)

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        sent = bytearray()

        def back() -> None:
            try:
                while data := server.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        pump = threading.Thread(target=back, daemon=True)
        pump.start()
        try:
            while data := client.recv(65536):
                sent += data
                server.sendall(data)
        except OSError:
            pass
        server.shutdown(socket.SHUT_WR)
        pump.join(10)
        with self._recorded:
            self.captures.append(bytes(sent))
            self._recorded.notify_all()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[bytes]:
        """The captures, once ``count`` connections have been relayed to their end."""
        with self._recorded:
            if not self._recorded.wait_for(lambda: len(self.captures) >= count, timeout):
                raise TimeoutError(f"only {len(self.captures)} of {count} exchanges recorded")
            return list(self.captures)

    def close(self) -> None:
        self.listener.close()


def _pdus(capture: bytes) -> list[bytes]:
    pdus, offset = [], 0
    while offset + 6 <= len(capture):
        length = struct.unpack_from(">L", capture, offset + 2)[0]
        pdus.append(capture[offset : offset + 6 + length])
        offset += 6 + length
    return pdus


def _mutate(capture: bytes, rng: random.Random) -> bytes:
    pdus = _pdus(capture)
    data = bytearray(b"".join(pdus[: rng.randint(1, len(pdus))]))
    kind = rng.randrange(6)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # byte substitutions with interesting values
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01))
    elif kind == 2:  # truncation
        del data[rng.randrange(1, len(data)) :]
    elif kind == 3:  # rewrite a PDU, item or PDV length field
        i = rng.randrange(max(len(data) - 4, 1))
        data[i : i + 4] = struct.pack(">L", rng.choice((0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                                                        rng.randrange(1 << 32))))
    elif kind == 4:  # splice two places together
        a, b = sorted(rng.randrange(len(data)) for _ in range(2))
        data[a:b] = data[b : b + (b - a)]
    else:  # random garbage after a valid prefix
        data += rng.randbytes(rng.randint(1, 512))
    return bytes(data)


def _replay(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # the gateway may abort and close first: that is a fine answer


@dataclass
class Running:
    process: GatewayProcess
    port: int

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Running]:
    rules = tmp_path / "rules"
    rules.mkdir()
    # a rule that reads an IS attribute: pydicom's validation of an invalid one would quote it
    (rules / "10-held.yaml").write_text(
        "rules:\n  - name: numbered\n    match: {InstanceNumber: '999999'}\n    destinations: []\n")
    port = free_port()
    config = write_config(tmp_path / "gateway.yaml", {
        "host": "127.0.0.1", "port": port, "http_port": free_port(),
        "spool_dir": str(tmp_path / "spool"), "rules_dir": str(rules), "max_associations": 64,
        "artim_timeout": 2.0, "network_timeout": 5.0, "log_format": "json", "log_level": "DEBUG",
        "worklist": {"ae_title": "RIS", "host": "127.0.0.1", "port": free_port(),
                     "connect_timeout": 1.0, "deadline": 3.0},
    })
    process = GatewayProcess(config, tmp_path / "gateway.log").start()
    try:
        yield Running(process, port)
    finally:
        process.kill()


def test_fuzzed_pdus_from_real_exchanges(gateway: Running, tmp_path: Path) -> None:
    port = gateway.port
    image = tmp_path / "us.dcm"
    make_us_image(image, 1, rows=16, cols=16)
    recorder = Recorder(port)
    try:
        assert run_echoscu(recorder.port, called_ae="DICOMGW").returncode == 0
        assert run_storescu(recorder.port, [image], called_ae="DICOMGW").returncode == 0
        run_findscu_worklist(recorder.port, called_ae="DICOMGW")  # the RIS is down: a failure status
        captures = [c for c in recorder.wait_for(3) if c]
    finally:
        recorder.close()
    assert len(captures) == 3
    pid = gateway.pid
    rng = random.Random(20261130)
    for start in range(0, CASES, BATCH):
        with ThreadPoolExecutor(8) as pool:
            payloads = [_mutate(rng.choice(captures), rng) for _ in range(min(BATCH, CASES - start))]
            list(pool.map(lambda p: _replay(port, p), payloads))
        assert gateway.process.process is not None
        assert gateway.process.process.poll() is None, gateway.process.log_tail()
        assert _rss_kib(pid) < RSS_LIMIT_KIB
        assert run_echoscu(port, called_ae="DICOMGW").returncode == 0, f"after {start + BATCH} cases"
    assert run_storescu(port, [image], called_ae="DICOMGW").returncode == 0


def test_sixteen_concurrent_associations_lose_nothing(gateway: Running, tmp_path: Path) -> None:
    port = gateway.port
    folders = []
    for sender in range(16):
        folder = tmp_path / f"sender{sender}"
        folder.mkdir()
        for i in range(10):
            make_us_image(folder / f"{i}.dcm", sender * 100 + i, rows=64, cols=64)
        folders.append(folder)
    deadline = time.monotonic() + LOAD_SECONDS
    rounds = 0
    while True:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda f: run_storescu(
                port, sorted(f.glob("*.dcm")), called_ae="DICOMGW", timeout=120), folders))
        rounds += 1
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
        assert _rss_kib(gateway.pid) < RSS_LIMIT_KIB
        if time.monotonic() >= deadline:
            break
    assert gateway.process.terminate() == 0
    objects = list((tmp_path / "spool" / "objects").rglob("*.dcm"))
    assert len(objects) == 160 * rounds  # no destinations: everything is held, nothing lost


def test_logs_carry_no_patient_data(gateway: Running, tmp_path: Path) -> None:
    port = gateway.port
    image = tmp_path / "us.dcm"
    dataset = make_us_image(image, 7, rows=16, cols=16)  # patient TEST^PATIENT / TEST0001
    with warnings.catch_warnings():  # pydicom warns about the invalid value it is asked to write
        warnings.simplefilter("ignore")
        dataset[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 14, b"42 PATIENTXYZ ", 0,
                                             False, True)  # InstanceNumber: not an integer string
        dataset.save_as(image)
    assert run_storescu(port, [image], called_ae="DICOMGW").returncode == 0
    run_findscu_worklist(port, called_ae="DICOMGW", keys=[f"PatientName={PATIENT_NAME}",
                                                          f"PatientID={PATIENT_ID}"])
    assert run_echoscu(port, called_ae="NOT_US").returncode != 0
    assert gateway.process.terminate() == 0
    log = gateway.process.log_path.read_text()
    assert "association" in log  # the log did capture the traffic (DEBUG, JSON lines)
    assert dataset.SOPInstanceUID in log  # ... down to the C-STORE of that very image
    for secret in (PATIENT_NAME, PATIENT_ID, "TEST^", "PATIENT", "42 "):
        assert secret not in log, f"{secret!r} found in the gateway log"
