"""The servers a benchmark starts on loopback: DCMTK storescp/wlmscpfs, Orthanc, the gateway.

Every server is a child process the runner starts itself and stops by its PID (SIGTERM, a bounded
wait, then SIGKILL). Readiness is a signal or an answer, never a sleep: a C-ECHO for DCMTK, ``GET
/system`` for Orthanc, ``READY=1`` on a notify socket for the gateway. DCMTK and Orthanc run with
``TCP_NODELAY=1`` (Debian builds disable Nagle only then) and DCMTK servers with ``-dhl`` (no
reverse DNS look-up per association). DCMTK tools are called by absolute path: pynetdicom installs
Python scripts of the same names that shadow them on PATH.

CPU seconds and peak RSS of a server come from ``/proc/<pid>/stat`` (utime + stime, every thread)
and ``/proc/<pid>/status`` (VmHWM).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
TOOLS: Mapping[str, str] = {
    "storescp": "/usr/bin/storescp",
    "storescu": "/usr/bin/storescu",
    "echoscu": "/usr/bin/echoscu",
    "findscu": "/usr/bin/findscu",
    "wlmscpfs": "/usr/bin/wlmscpfs",
    "Orthanc": "/usr/sbin/Orthanc",
}
_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A server did not start, a client failed, or a wait ran out: the benchmark cannot go on."""


def tool(name: str) -> str:
    """The absolute path of a system tool; ``BenchError`` saying what to install if it is missing."""
    path = TOOLS[name]
    if not os.path.isabs(path) or not os.access(path, os.X_OK):
        raise BenchError(f"{path} not found: apt-get install {'orthanc' if name == 'Orthanc' else 'dcmtk'}")
    return path


_LOWEST_PORT = 20000
_PICK = random.SystemRandom()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    It is drawn below the kernel's ephemeral range: a port the kernel hands out for ``bind(0)`` is
    also what it hands out to outgoing connections, so between picking it and the server binding it
    a client socket (a forwarder, storescu) could take it ("address already in use").
    """
    highest = _ephemeral_low() - 1
    for _ in range(200):
        port = _PICK.randint(_LOWEST_PORT, highest)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {_LOWEST_PORT} and {highest} on {HOST}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1", "LC_ALL": "C"}


# ---------------------------------------------------------------------------------------------
# Process accounting


@dataclass(frozen=True, slots=True)
class ProcessStats:
    cpu_seconds: float  # user + system, all threads
    peak_rss_bytes: int  # VmHWM
    main_thread_cpu_seconds: float = 0.0  # the thread whose id is the PID (an event loop, typically)

    def since(self, earlier: ProcessStats) -> ProcessStats:
        """CPU spent after ``earlier`` was sampled; the peak RSS is the lifetime peak."""
        return ProcessStats(self.cpu_seconds - earlier.cpu_seconds, self.peak_rss_bytes,
                            self.main_thread_cpu_seconds - earlier.main_thread_cpu_seconds)


def read_stats(pid: int) -> ProcessStats:
    try:
        total = _cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
        main = _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat").read_text())
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"process {pid} is gone, cannot read its CPU and memory: {exc}") from None
    hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
    return ProcessStats(total, int(hwm) * 1024, main)


def _cpu_seconds(stat: str) -> float:
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS


# ---------------------------------------------------------------------------------------------
# Servers


def wait_until(probe: Callable[[], bool], *, what: str, timeout: float,
               server: Server | None = None) -> None:
    """Retry ``probe`` with a short bounded backoff; fail at once if ``server`` exited."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not probe():
        if server is not None and server.exited():
            raise BenchError(f"{what}: {server.name} exited\n{server.log_tail()}")
        if time.monotonic() >= deadline:
            tail = server.log_tail() if server is not None else ""
            raise BenchError(f"{what}: not reached within {timeout:.0f} s\n{tail}")
        time.sleep(delay)  # probing a foreign process: bounded backoff, bounded overall
        delay = min(delay * 2, 0.1)


class Server:
    """A child process, started in its own session, with its output in ``log_path``."""

    name = "server"

    def __init__(self, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else peer_env()
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.baseline: ProcessStats | None = None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} was never started")
        return self.popen.pid

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                          start_new_session=True)

    def start(self) -> Self:
        self.spawn()
        self.wait_ready()
        self.baseline = read_stats(self.pid)
        return self

    def wait_ready(self) -> None:
        raise NotImplementedError

    def exited(self) -> bool:
        return self.popen is None or self.popen.poll() is not None

    def stats(self) -> ProcessStats:
        """CPU since it became ready, and its peak RSS (read while it still runs)."""
        now = read_stats(self.pid)
        return now.since(self.baseline) if self.baseline is not None else now

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout)

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def echo_ok(port: int, called_ae: str) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            pass
    except OSError:
        return False
    result = subprocess.run([tool("echoscu"), "-to", "5", "-ta", "5", "-aec", called_ae, HOST, str(port)],
                            capture_output=True, env=peer_env(), timeout=15, check=False)
    return result.returncode == 0


class StoreSCP(Server):
    """DCMTK storescp writing every object it receives into ``directory``."""

    name = "storescp"

    def __init__(self, directory: Path, *, ae_title: str = "STORESCP", extra: Sequence[str] = ()) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        argv = [tool("storescp"), "-dhl", "-aet", ae_title, "-pdu", "131072", "-od", str(directory),
                *extra, str(self.port)]
        super().__init__(argv, directory.parent / f"storescp-{ae_title}.log")

    def wait_ready(self) -> None:
        wait_until(lambda: echo_ok(self.port, self.ae_title), what="storescp C-ECHO",
                   timeout=READY_TIMEOUT, server=self)


class WorklistSCP(Server):
    """DCMTK wlmscpfs serving the ``*.wl`` files of ``database/<ae_title>``."""

    name = "wlmscpfs"

    def __init__(self, database: Path, *, ae_title: str = "WLMSCP") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        (database / ae_title).mkdir(parents=True, exist_ok=True)
        (database / ae_title / "lockfile").touch()
        argv = [tool("wlmscpfs"), "-dhl", "-dfp", str(database), str(self.port)]
        super().__init__(argv, database.parent / "wlmscpfs.log")

    def wait_ready(self) -> None:
        wait_until(lambda: echo_ok(self.port, self.ae_title), what="wlmscpfs C-ECHO",
                   timeout=READY_TIMEOUT, server=self)


ORTHANC_ROUTER = """function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] ~= 'Lua' then
    Delete(SendToModality(instanceId, 'DEST'))
  end
end
"""


class Orthanc(Server):
    """Orthanc whose Lua ``OnStoredInstance`` sends every instance to ``destination`` and deletes it;
    without a destination, a plain store. Either way it fsyncs every file it stores
    (``SyncStorageArea``, Orthanc's default since 1.7.4) and indexes it in SQLite."""

    name = "orthanc"

    def __init__(self, directory: Path, destination: tuple[str, str, int] | None = None) -> None:
        self.dicom_port = free_port()
        self.http_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "router.lua").write_text(ORTHANC_ROUTER)
        config: dict[str, Any] = {
            "Name": "bench-orthanc",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "storage"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"DEST": list(destination)} if destination else {},
            "LuaScripts": [str(directory / "router.lua")] if destination else [],
            "SyncStorageArea": True,
            "SaveJobs": False,
            "Plugins": [],
        }
        (directory / "orthanc.json").write_text(json.dumps(config, indent=2))
        super().__init__([tool("Orthanc"), str(directory / "orthanc.json")], directory / "orthanc.log",
                         cwd=directory)

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.http_port, timeout=2)
        try:
            connection.request("GET", "/system")
            return connection.getresponse().status == http.client.OK
        except OSError:
            return False
        finally:
            connection.close()

    def wait_ready(self) -> None:
        wait_until(self._answers, what="Orthanc GET /system", timeout=READY_TIMEOUT, server=self)


class Gateway(Server):
    """``dicom-gateway serve --config`` as a child process; ready when it sends READY=1."""

    name = "gateway"

    def __init__(self, directory: Path, *, destinations: Mapping[str, tuple[str, int]] | None = None,
                 rules: str = "", worklist: tuple[str, int] | None = None,
                 settings: Mapping[str, Any] | None = None, tree: Path | None = None) -> None:
        """``tree``: run the gateway of another checkout of this repository (an A/B, bench.ab)."""
        self.directory = directory
        self.port = free_port()
        self.http_port = free_port()
        self.ae_title = "BENCHGW"
        self.ready_seconds = 0.0
        directory.mkdir(parents=True, exist_ok=True)
        rules_dir = directory / "rules"
        rules_dir.mkdir(exist_ok=True)
        if rules:
            (rules_dir / "10-bench.yaml").write_text(rules)
        config: dict[str, Any] = {
            "ae_title": self.ae_title, "host": HOST, "port": self.port, "http_host": HOST,
            "http_port": self.http_port, "spool_dir": str(directory / "spool"),
            "rules_dir": str(rules_dir), "shutdown_timeout": 5,
            "destinations": {name: {"ae_title": ae, "host": HOST, "port": port}
                             for name, (ae, port) in (destinations or {}).items()},
            **(settings or {}),
        }
        if worklist is not None:
            config["worklist"] = {"ae_title": worklist[0], "host": HOST, "port": worklist[1]}
        self.config_path = directory / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._notify = directory / "notify.sock"
        root = tree or REPO_ROOT
        env = {**os.environ, "NOTIFY_SOCKET": str(self._notify),
               "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))}
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)]
        super().__init__(argv, directory / "gateway.log", env=env, cwd=root)

    def start(self) -> Self:
        with contextlib.suppress(FileNotFoundError):
            self._notify.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(self._notify))
            sock.settimeout(0.2)
            started = time.perf_counter()
            self.spawn()
            deadline = time.monotonic() + READY_TIMEOUT
            while not self._ready(sock):
                if self.exited() or time.monotonic() > deadline:
                    raise BenchError(f"the gateway did not say READY=1:\n{self.log_tail()}")
            self.ready_seconds = time.perf_counter() - started
        self._notify.unlink()
        self.baseline = read_stats(self.pid)
        return self

    @staticmethod
    def _ready(sock: socket.socket) -> bool:
        try:
            return b"READY=1" in sock.recv(4096)
        except TimeoutError:
            return False

    def metrics(self) -> str:
        connection = http.client.HTTPConnection(HOST, self.http_port, timeout=30)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()


# ---------------------------------------------------------------------------------------------
# Clients


def storescu(port: int, files: Sequence[Path], *, called_ae: str,
             calling_ae: str = "BENCHSCU") -> subprocess.Popen[bytes]:
    """Start DCMTK storescu sending ``files`` over one association (the caller waits)."""
    argv = [tool("storescu"), "-to", "30", "-ta", "30", "-td", "120", "-aet", calling_ae,
            "-aec", called_ae, HOST, str(port), *map(str, files)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=peer_env())


def finish(process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Wait for a client; ``BenchError`` with its output unless it exited 0."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise BenchError(f"{what}: still running after {timeout:.0f} s\n"
                         f"{output.decode(errors='replace')[-2000:]}") from None
    if process.returncode != 0:
        raise BenchError(f"{what} exited with {process.returncode}:\n"
                         f"{output.decode(errors='replace')[-2000:]}")


MWL_KEYS = (
    "PatientName=", "PatientID=", "PatientBirthDate=", "PatientSex=", "AccessionNumber=",
    "RequestedProcedureID=", "RequestedProcedureDescription=", "StudyInstanceUID=",
    "ScheduledProcedureStepSequence[0].Modality=US",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime=",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription=",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID=",
)


def findscu_worklist(port: int, *, called_ae: str, out_dir: Path | None = None,
                     timeout: float = 60.0) -> None:
    """One ``findscu -W`` query for every US step; with ``out_dir`` the answers are written there."""
    argv = [tool("findscu"), "-W", "-to", "10", "-ta", "10", "-aet", "BENCHUS", "-aec", called_ae]
    for key in MWL_KEYS:
        argv += ["-k", key]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        argv += ["-X", "-od", str(out_dir)]
    process = subprocess.Popen([*argv, HOST, str(port)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=peer_env())
    finish(process, "findscu -W", timeout)
