"""Running a real gateway in tests.

``GatewayThread`` runs the composition root in a background thread with its own event loop, so a
synchronous test can drive DCMTK tools with ``subprocess`` while the gateway serves. Readiness is
the gateway's own ``task_status`` signal; deliveries are waited for through the forwarders'
attempt observer (a condition variable), never by sleeping.

``GatewayProcess`` runs ``dicom-gateway serve`` as a subprocess (for kill -9 tests); readiness is
the systemd notify protocol (READY=1 on a datagram socket), again a signal rather than a poll.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import yaml

from gateway.forwarder import Attempt
from gateway.journal import Delivery
from gateway.service import Bound, Gateway
from gateway.settings import Settings
from gateway.spool import Spool

T = TypeVar("T")
START_TIMEOUT = 30.0
GATEWAY_AE = "DICOMGW"  # the AE title of the test gateways gateway_config() writes


class GatewayThread:
    def __init__(self, settings: Settings, *, spool: Spool | None = None) -> None:
        self.settings = settings
        self._spool = spool
        self._started = threading.Event()
        self._changed = threading.Condition()
        self.attempts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.dead: collections.Counter[str] = collections.Counter()
        self.bound: Bound | None = None
        self.error: BaseException | None = None
        self.gateway: Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)

    @property
    def port(self) -> int:
        assert self.bound is not None and self.bound.dicom_port is not None
        return self.bound.dicom_port

    @property
    def tls_port(self) -> int:
        assert self.bound is not None and self.bound.tls_port is not None
        return self.bound.tls_port

    @property
    def http_port(self) -> int:
        assert self.bound is not None
        return self.bound.http_port

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise TimeoutError("the gateway did not start listening in time")
        if self.error is not None:
            raise RuntimeError("the gateway failed to start") from self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self.gateway is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.gateway.stop)
        self._thread.join(START_TIMEOUT)
        if self._thread.is_alive():
            raise TimeoutError("the gateway did not stop in time")

    def _main(self) -> None:
        try:
            anyio.run(self._run)
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self._started.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.gateway = Gateway(self.settings, spool=self._spool, attempt_observer=self._observe)
        async with anyio.create_task_group() as tg:
            self.bound = await tg.start(self.gateway.run)
            self._started.set()

    def _observe(self, destination: str, item: Delivery, attempt: Attempt, dead: bool) -> None:
        with self._changed:
            self.attempts[(destination, attempt.outcome)] += 1
            if dead:
                self.dead[destination] += 1
            self._changed.notify_all()

    def delivered(self, destination: str) -> int:
        return self.attempts[(destination, "delivered")] + self.attempts[(destination, "warning")]

    def wait_for(self, predicate: Callable[[GatewayThread], bool], timeout: float = 60.0) -> None:
        """Block until ``predicate(self)`` holds after some forwarding attempt (or fail)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"condition not reached within {timeout} s; attempts so far: "
                                   f"{dict(self.attempts)}")

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run a coroutine on the gateway's event loop (e.g. a journal query) and return its result."""
        assert self._loop is not None

        async def run() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)


FAST_RETRY = {"base_delay": 0.05, "max_delay": 0.5}


def destination_config(port: int, ae_title: str, *, host: str = "127.0.0.1",
                       **options: Any) -> dict[str, Any]:
    """A destination entry for test configs: short timeouts and fast retries."""
    return {"ae_title": ae_title, "host": host, "port": port, "connect_timeout": 5.0,
            "dimse_timeout": 15.0, "retry": dict(FAST_RETRY), **options}


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def gateway_config(tmp_path: Path, destinations: dict[str, dict[str, Any]], rules: str, *,
                   port: int = 0, **extra: Any) -> Path:
    """``tmp_path/gateway.yaml`` for a test gateway on 127.0.0.1 (any free port unless ``port``):
    one rule file ``rules/10-test.yaml`` holding ``rules``, the spool in ``tmp_path/spool``, a
    short shutdown timeout, and ``extra`` settings on top."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "10-test.yaml").write_text(rules, encoding="utf-8")
    return write_config(tmp_path / "gateway.yaml", {
        "ae_title": GATEWAY_AE, "host": "127.0.0.1", "port": port, "http_port": 0,
        "spool_dir": str(tmp_path / "spool"), "rules_dir": str(rules_dir),
        "shutdown_timeout": 2.0, "destinations": destinations, **extra,
    })


class GatewayProcess:
    """``dicom-gateway serve --config PATH`` as a child process, ready when it says READY=1."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT) -> GatewayProcess:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # a short path: Unix socket names are limited to 108 bytes
            address = os.path.join(tempfile.mkdtemp(prefix="gw-"), "notify.sock")
            sock.bind(address)
            sock.settimeout(1.0)
            env = {**os.environ, "NOTIFY_SOCKET": address}
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
                    stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                self._await_ready(sock, timeout)
            except TimeoutError:
                self.kill()
                raise TimeoutError(f"gateway not ready in {timeout} s:\n{self.log_tail()}") from None
            finally:
                os.unlink(address)
        return self

    def _await_ready(self, sock: socket.socket, timeout: float) -> None:
        """Wait for READY=1; give up at once if the process exits (e.g. a configuration error)."""
        assert self.process is not None
        for _ in range(int(timeout)):
            try:
                if b"READY=1" in sock.recv(4096):
                    return
            except TimeoutError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the gateway exited with {self.process.returncode}:\n"
                                       f"{self.log_tail()}") from None
        raise TimeoutError

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@contextmanager
def gateway_process(config: Path, log_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(config, log_path).start()
    try:
        yield process
    finally:
        process.kill()
