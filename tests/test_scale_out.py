"""Scale-out behind HAProxy: two gateway replicas, each with its own spool, one killed mid-run.

HAProxy (TCP mode, ``leastconn``, health checks on ``/readyz``, the shape of
``deploy/haproxy/haproxy.cfg``) listens on a free loopback port in front of two ``dicom-gateway
serve`` processes. Eight DCMTK ``storescu`` senders push small generated ultrasound images through
it; every replica routes everything to one DCMTK ``storescp`` (forking, so both replicas deliver at
once). While associations are open on replica 0 it is killed with SIGKILL and restarted on the same
spool. Senders whose association died fail some stores; every store that ``storescu`` saw
acknowledged must reach the destination, by SOP Instance UID.

Readiness is always a signal: the gateways and HAProxy both say ``READY=1`` on a notify socket.
The only polls are of external processes (the destination folder, a replica's ``/metrics``),
bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from gateway_harness import GatewayProcess, write_config
from peers import (
    HOST,
    StoreSCP,
    free_port,
    http_get,
    make_us_image,
    peer_env,
    require_tool,
    scraped_value,
    wait_until,
)

GATEWAY_AE = "DICOMGW"
SENDERS = 8
IMAGES_PER_SENDER = 25
IMAGE_SIDE = 192  # 192 x 192 RGB: ~110 KB per image, long enough a run to kill a replica in it
KILL_AFTER_FRACTION = 0.2  # of all images delivered, and replica 0 busy, before the kill
READY_TIMEOUT = 20.0
RUN_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------------
# HAProxy


def haproxy_config(frontend_port: int, backends: Sequence[tuple[str, int, int]],
                   *, check_interval_ms: int = 250) -> str:
    """A loopback HAProxy in TCP mode: ``backends`` are ``(name, dicom_port, http_port)``.

    Same model as deploy/haproxy/haproxy.cfg: one association stays on one replica, new ones go
    to the replica with the fewest, a replica is taken out of rotation when ``/readyz`` fails,
    and a connection refused by a dead replica is retried on another one (``redispatch``).
    """
    servers = "\n".join(
        f"    server {name} {HOST}:{dicom} check port {http}" for name, dicom, http in backends
    )
    return f"""global
    log stdout format raw local0
    maxconn 1024

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s
    retries 3
    option redispatch

frontend dicom
    bind {HOST}:{frontend_port}
    default_backend gateways

backend gateways
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host dicom-gateway
    http-check expect status 200
    default-server inter {check_interval_ms}ms fall 1 rise 1
{servers}
"""


@dataclass
class HAProxy:
    """``haproxy -Ws`` (master-worker, systemd notify) on a generated configuration."""

    directory: Path
    backends: Sequence[tuple[str, int, int]]
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        binary = require_tool("haproxy")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, self.backends))
        check = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True,
                               text=True, timeout=30, check=False)
        assert check.returncode == 0, check.stderr
        address = str(self.directory / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
                open(self.directory / "haproxy.log", "wb") as log:
            sock.bind(address)
            sock.settimeout(READY_TIMEOUT)
            self.popen = subprocess.Popen(
                [binary, "-Ws", "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": address})
            try:
                while b"READY=1" not in sock.recv(4096):
                    pass
            except TimeoutError:
                self.stop()
                raise TimeoutError(f"haproxy not ready in {READY_TIMEOUT} s") from None
        return self

    def stop(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Gateway replicas


@dataclass
class Replica:
    """One gateway process with its own spool, routing everything to ``destination``."""

    name: str
    directory: Path
    destination: StoreSCP
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: GatewayProcess | None = None

    @property
    def backend(self) -> tuple[str, int, int]:
        return self.name, self.dicom_port, self.http_port

    def write_config(self) -> Path:
        rules = self.directory / "rules"
        rules.mkdir(parents=True, exist_ok=True)
        rule = {"name": "everything", "destinations": ["PACS"]}
        (rules / "10-all.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
        return write_config(self.directory / "gateway.yaml", {
            "ae_title": GATEWAY_AE,
            "host": HOST,
            "port": self.dicom_port,
            "http_host": HOST,
            "http_port": self.http_port,
            "spool_dir": "spool",
            "rules_dir": "rules",
            "shutdown_timeout": 5.0,
            "destinations": {"PACS": {
                "ae_title": self.destination.ae_title,
                "host": HOST,
                "port": self.destination.port,
                "associations": 2,
                "retry": {"base_delay": 0.2, "max_delay": 1.0},
            }},
        })

    def start(self) -> Replica:
        config = self.directory / "gateway.yaml"
        if not config.exists():
            self.write_config()
        self.process = GatewayProcess(config, self.directory / "gateway.log").start()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()

    def active_inbound_associations(self) -> float:
        """``dicomgw_associations_active{direction="in"}`` from the replica's ``/metrics``."""
        status, text = http_get(self.http_port, "/metrics", timeout=5)
        assert status == 200, f"/metrics answered {status}"
        value = scraped_value(text, "dicomgw_associations_active", direction="in")
        return 0.0 if value is None else value


@contextlib.contextmanager
def running(replicas: Iterable[Replica]) -> Iterator[None]:
    started: list[Replica] = []
    try:
        for replica in replicas:
            started.append(replica.start())
        yield
    finally:
        for replica in started:
            replica.stop()


# ---------------------------------------------------------------------------------------------
# Senders


def acknowledged_files(storescu_log: str) -> list[str]:
    """The files ``storescu -v`` saw answered with Success, in order, from its log."""
    acknowledged = []
    current: str | None = None
    for line in storescu_log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif line.startswith("I: Received Store Response (Success)") and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


@dataclass
class Sender:
    """One ``storescu`` association sending ``files`` (path -> SOP Instance UID) through ``port``."""

    name: str
    files: dict[Path, str]
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Sender:
        argv = [require_tool("storescu"), "-v", "-to", "5", "-ta", "10", "-td", "20",
                "-aet", self.name, "-aec", GATEWAY_AE, HOST, str(self.port),
                *(str(path) for path in self.files)]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=peer_env())
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise

    def kill(self) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(10)

    def acknowledged(self) -> set[str]:
        log = self.log_path.read_text(errors="replace")
        return {self.files[Path(name)] for name in acknowledged_files(log)}


@contextlib.contextmanager
def sending(senders: Sequence[Sender]) -> Iterator[Sequence[Sender]]:
    """Start every sender; on the way out, kill any still running (a test that failed early)."""
    try:
        yield [sender.start() for sender in senders]
    finally:
        for sender in senders:
            sender.kill()


def make_batches(directory: Path, senders: int, per_sender: int, side: int) -> list[dict[Path, str]]:
    batches = []
    for s in range(senders):
        batch = {}
        for i in range(per_sender):
            path = directory / f"s{s}" / f"{i:03d}.dcm"
            batch[path] = str(make_us_image(path, seed=s * 1000 + i, rows=side, cols=side).SOPInstanceUID)
        batches.append(batch)
    return batches


def delivered_uids(destination: StoreSCP) -> set[str]:
    """SOP Instance UIDs at the destination: DCMTK names each file ``<modality>.<SOP UID>``."""
    return {path.name.split(".", 1)[1] for path in destination.received_files() if "." in path.name}


# ---------------------------------------------------------------------------------------------
# Tests


def test_acknowledged_files_are_parsed_from_storescu_output() -> None:
    log = "\n".join([
        "I: Requesting Association",
        "I: Sending file: /a/1.dcm",
        "I: Sending Store Request (MsgID 1, US)",
        "I: Received Store Response (Success)",
        "I: Sending file: /a/2.dcm",
        "I: Sending Store Request (MsgID 2, US)",
        "E: Store Failed, file: /a/2.dcm:",
        "I: Sending file: /a/3.dcm",
        "I: Received Store Response (Success)",
    ])
    assert acknowledged_files(log) == ["/a/1.dcm", "/a/3.dcm"]


@pytest.mark.peer
def test_haproxy_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    binary = require_tool("haproxy")
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(free_port(), [("gw0", 11112, 8080), ("gw1", 11113, 8081)]))
    result = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.peer
def test_kill_one_replica_mid_run(tmp_path: Path, store_scp: Callable[..., StoreSCP]) -> None:
    require_tool("storescu")
    destination = store_scp(ae_title="PACS", fork=True)
    batches = make_batches(tmp_path / "img", SENDERS, IMAGES_PER_SENDER, IMAGE_SIDE)
    total = SENDERS * IMAGES_PER_SENDER
    victim, survivor = (Replica(f"gw{i}", tmp_path / f"gw{i}", destination) for i in range(2))
    logs = tmp_path / "senders"
    logs.mkdir()

    with running([victim, survivor]), \
            HAProxy(tmp_path / "lb", [victim.backend, survivor.backend]) as lb, \
            sending([Sender(f"SENDER{i}", batch, lb.port, logs / f"sender{i}.log")
                     for i, batch in enumerate(batches)]) as senders:
        wait_until(
            lambda: len(delivered_uids(destination)) >= total * KILL_AFTER_FRACTION
            and victim.active_inbound_associations() >= 1,
            what="a fifth of the images delivered while replica 0 has associations open",
            timeout=RUN_TIMEOUT,
        )
        mid_run = [s.name for s in senders if s.running()]
        victim.kill()
        victim.start()  # same port, same spool: READY=1 only after the spool is recovered
        codes = {s.name: s.wait(RUN_TIMEOUT) for s in senders}
        acknowledged = set().union(*(s.acknowledged() for s in senders))
        wait_until(lambda: acknowledged <= delivered_uids(destination),
                   what="every acknowledged image at the destination", timeout=RUN_TIMEOUT)

    assert mid_run, "the kill came after every sender had finished: not a mid-run kill"
    failed = [name for name, code in codes.items() if code != 0]
    assert failed, "no sender lost its association, yet replica 0 was killed with associations open"
    assert len(failed) < SENDERS, f"every sender failed: {codes}"
    assert len(acknowledged) >= total // 2, f"only {len(acknowledged)} of {total} acknowledged"
    missing = acknowledged - delivered_uids(destination)
    assert not missing, f"{len(missing)} acknowledged images never reached the destination"
