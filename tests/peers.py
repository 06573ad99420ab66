"""Real DICOM peers for tests: DCMTK and Orthanc as subprocesses on 127.0.0.1.

Every peer is started with ``TCP_NODELAY=1`` in its environment (Debian's DCMTK and Orthanc disable
Nagle only then) and is ready when it answers, not after a sleep: the TCP port accepts a connection
and a C-ECHO succeeds (DCMTK), or ``GET /system`` answers (Orthanc). Every wait is bounded. A peer is
stopped through its own process group (it is started in a new session): SIGTERM, a bounded wait,
then SIGKILL.

External binaries are found with :func:`require_tool`, which skips a test when a tool is missing,
or fails it under ``CI=true``. Only the system directories are searched, because pynetdicom installs
Python scripts called ``storescp``, ``storescu``, ``echoscu`` and ``findscu`` into every virtual
environment, and those are not DCMTK.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UltrasoundImageStorage,
    generate_uid,
)

from bench import servers

HOST = "127.0.0.1"
free_port = servers.free_port  # one implementation, shared with the benchmark runner
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
ORTHANC_WORKLIST_PLUGIN = ORTHANC_PLUGIN_DIR / "libModalityWorklists.so"

DEBIAN_PACKAGES: Mapping[str, str] = {
    "echoscu": "dcmtk",
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "findscu": "dcmtk",
    "wlmscpfs": "dcmtk",
    "dump2dcm": "dcmtk",
    "dcmsend": "dcmtk",
    "dcmdump": "dcmtk",
    "Orthanc": "orthanc",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "haproxy": "haproxy",
    "systemd-analyze": "systemd",
    "docker-compose": "docker-compose",
}


class PeerError(RuntimeError):
    """A test peer did not start, did not become ready, or answered an HTTP call with an error."""


# ---------------------------------------------------------------------------------------------
# Tools, ports, environment


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_tool(name: str) -> str:
    """Return the absolute path of the system binary ``name``; skip (or fail under CI) if absent."""
    path = shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))
    if path is not None:
        return path
    _missing(name, DEBIAN_PACKAGES.get(name, name))


def require_file(path: Path, package: str) -> Path:
    """Return ``path`` if it exists (a plugin, a data file); skip (or fail under CI) if not."""
    if path.exists():
        return path
    _missing(str(path), package)


def _missing(what: str, package: str) -> NoReturn:
    missing(what, f"install Debian package {package} (apt-get install {package})")


def missing(what: str, remedy: str) -> NoReturn:
    """A peer or tool the test needs is absent: skip, or fail under CI=true."""
    message = f"{what} missing: {remedy}"
    if running_in_ci():
        pytest.fail(message)
    pytest.skip(message)


def fail_skipped_peer_test(report: pytest.TestReport, *, marked_peer: bool) -> None:
    """Under CI=true a test marked ``peer`` may not skip: turn its skip into a failure."""
    if running_in_ci() and marked_peer and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"peer test skipped under CI=true (install what it needs): {report.longrepr}"


def peer_env() -> dict[str, str]:
    """The environment for DCMTK and Orthanc: Nagle disabled, C locale for stable messages."""
    return {**os.environ, "TCP_NODELAY": "1", "LC_ALL": "C"}


def port_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class PeerProcess:
    """One peer subprocess, its own process group leader, with its output in ``log_path``."""

    name: str
    argv: Sequence[str]
    log_path: Path
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        on_main_thread = threading.current_thread() is threading.main_thread()
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()) if on_main_thread else None,  # noqa: PLW1509
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise PeerError(f"{self.name} was never started")
        return self.popen.pid

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, limit: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-limit:]

    def stop(self, timeout: float = STOP_TIMEOUT, *, graceful: bool = True) -> None:
        """SIGTERM the process group, wait at most ``timeout`` s, then SIGKILL it.

        ``graceful=False`` sends SIGKILL at once (Orthanc takes seconds to shut down cleanly).
        """
        if self.popen is None:
            return
        if not graceful:
            _signal_group(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        # forked children (storescp --fork, wlmscpfs) may outlive their parent
        _signal_group(self.popen.pid, signal.SIGKILL)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """In the child: ask Linux for SIGKILL when the test process dies (even by SIGKILL), so that
    no peer outlives a killed test run. Tied to the forking thread, hence main thread only."""

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)

    return arm


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_until(
    probe: Callable[[], bool],
    *,
    what: str,
    timeout: float = READY_TIMEOUT,
    process: PeerProcess | None = None,
) -> None:
    """Retry ``probe`` with a short bounded backoff until it is true; raise after ``timeout`` s.

    Fails at once when ``process`` has exited, with the tail of its log.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if process is not None and process.exit_code() is not None:
            raise PeerError(f"{what}: process exited with code {process.exit_code()}\n{process.log_tail()}")
        if probe():
            return
        if time.monotonic() >= deadline:
            tail = process.log_tail() if process is not None else ""
            raise PeerError(f"{what}: not ready after {timeout:.0f} s\n{tail}")
        time.sleep(delay)  # backoff between two probes of a foreign process, bounded above
        delay = min(delay * 2, 0.2)


def _dicom_ready(port: int, called_ae: str, *, echo: bool) -> Callable[[], bool]:
    def probe() -> bool:
        if not port_accepts(port):
            return False
        return not echo or run_echoscu(port, called_ae=called_ae, timeout=5.0).returncode == 0

    return probe


class _Peer:
    """Context-manager plumbing shared by the peers: start on enter, stop on exit."""

    process: PeerProcess | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self) -> str:
        return self.process.log_tail() if self.process is not None else ""

    def _launch(self, tool: str, ae_title: str, port: int, log_dir: Path, *, echo: bool) -> None:
        """Start ``argv()`` and wait until the DICOM port answers (a C-ECHO when ``echo``: a
        refusing or TLS-only peer answers none, and then an open port is all there is to see)."""
        self.process = PeerProcess(f"{tool} {ae_title}:{port}", self.argv(),
                                   log_dir / f"{tool}-{port}.log")
        self.process.start()
        wait_until(_dicom_ready(port, ae_title, echo=echo), what=self.process.name,
                   process=self.process)

    def argv(self) -> list[str]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# DCMTK storescp


@dataclass
class StoreSCP(_Peer):
    """DCMTK ``storescp`` into ``directory``, accepting every transfer syntax it knows (``+xa``)
    unless ``syntaxes`` says otherwise.

    Failure modes for forwarder tests: ``refuse`` (A-ASSOCIATE-RJ to everyone), ``reject``
    (reject callers that send no Implementation Class UID), ``abort_during`` / ``abort_after``
    (A-ABORT while or after receiving a C-STORE-RQ), ``sleep_during`` / ``sleep_after`` seconds.
    Files are named from the SOP Instance UID (DCMTK's default, so a repeated UID overwrites)
    unless ``unique_filenames``.
    """

    directory: Path
    ae_title: str = "STORESCP"
    port: int = field(default_factory=free_port)
    refuse: bool = False
    reject: bool = False
    abort_during: bool = False
    abort_after: bool = False
    sleep_during: int = 0
    sleep_after: int = 0
    unique_filenames: bool = False
    fork: bool = False
    syntaxes: str = "+xa"  # storescp's syntax policy: +xa all, +x= uncompressed, +xi implicit only
    max_pdu: int = 131072
    extra_args: Sequence[str] = ()
    log_dir: Path | None = None
    host: str = field(default=HOST, init=False)

    def argv(self) -> list[str]:
        args = [require_tool("storescp"), "-v", "-dhl", self.syntaxes, "-aet", self.ae_title]
        args += ["-od", str(self.directory), "-pdu", str(self.max_pdu)]
        args += ["+uf"] if self.unique_filenames else ["-uf"]
        flags = {
            "--refuse": self.refuse,
            "--reject": self.reject,
            "--abort-during": self.abort_during,
            "--abort-after": self.abort_after,
            "--fork": self.fork,
        }
        args += [flag for flag, on in flags.items() if on]
        if self.sleep_during:
            args += ["--sleep-during", str(self.sleep_during)]
        if self.sleep_after:
            args += ["--sleep-after", str(self.sleep_after)]
        return [*args, *self.extra_args, str(self.port)]

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._launch("storescp", self.ae_title, self.port, self.log_dir or self.directory.parent,
                     echo=not (self.refuse or "+tls" in self.extra_args))
        return self

    def received_files(self) -> list[Path]:
        """Every file storescp wrote, sorted by name (partial files have no final name yet)."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------------
# DCMTK wlmscpfs


def write_worklist_files(directory: Path, items: Iterable[Dataset]) -> list[Path]:
    """Write each item as ``item-NNNN.wl`` (a bare implicit VR little endian dataset)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(items):
        path = directory / f"item-{index:04d}.wl"
        copy = Dataset()
        copy.update(item)
        copy.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        paths.append(path)
    return paths


@dataclass
class WorklistSCP(_Peer):
    """DCMTK ``wlmscpfs`` serving ``items`` to callers of ``ae_title``.

    The database is ``<database>/<ae_title>/*.wl`` plus the ``lockfile`` wlmscpfs insists on.
    The character set written in each item is returned as is (``-csk``).
    """

    database: Path
    items: Sequence[Dataset] = ()
    ae_title: str = "WLMSCP"
    port: int = field(default_factory=free_port)
    refuse: bool = False
    sleep_during: int = 0
    extra_args: Sequence[str] = ()
    log_dir: Path | None = None
    host: str = field(default=HOST, init=False)

    def argv(self) -> list[str]:
        args = [require_tool("wlmscpfs"), "-v", "-dhl", "-csk", "-dfp", str(self.database)]
        if self.refuse:
            args.append("--refuse")
        if self.sleep_during:
            args += ["--sleep-during", str(self.sleep_during)]
        return [*args, *self.extra_args, str(self.port)]

    def start(self) -> Self:
        ae_dir = self.database / self.ae_title
        write_worklist_files(ae_dir, self.items)
        (ae_dir / "lockfile").touch()
        self._launch("wlmscpfs", self.ae_title, self.port, self.log_dir or self.database.parent,
                     echo=not (self.refuse or "+tls" in self.extra_args))
        return self


# ---------------------------------------------------------------------------------------------
# DCMTK clients


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        errors="replace",
        env=peer_env(),
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def run_echoscu(
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "ECHOSCU",
    host: str = HOST,
    timeout: float = 15.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    argv = [require_tool("echoscu"), "-to", "5", "-ta", "5", "-td", "5"]
    argv += ["-aet", calling_ae, "-aec", called_ae, *extra_args, host, str(port)]
    return _run(argv, timeout)


def run_storescu(
    port: int,
    files: Iterable[Path],
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "STORESCU",
    host: str = HOST,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``storescu`` proposes uncompressed syntaxes only unless ``extra_args`` says otherwise
    (``-xy`` JPEG baseline, ``-xv`` J2K lossless, ...); use :func:`run_dcmsend` for mixed files."""
    argv = [require_tool("storescu"), "-to", "5", "-ta", "10"]
    argv += ["-aet", calling_ae, "-aec", called_ae, *extra_args, host, str(port)]
    return _run([*argv, *(str(f) for f in files)], timeout)


def run_dcmsend(
    port: int,
    files: Iterable[Path],
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "DCMSEND",
    host: str = HOST,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``dcmsend`` proposes each file's own transfer syntax: the way to send compressed files as is."""
    argv = [require_tool("dcmsend"), "-to", "5", "-ta", "10"]
    argv += ["-aet", calling_ae, "-aec", called_ae, *extra_args, host, str(port)]
    return _run([*argv, *(str(f) for f in files)], timeout)


MWL_RETURN_KEYS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
)


def mwl_query_keys(
    *,
    station_ae: str = "",
    modality: str = "",
    start_date: str = "",
    patient_name: str = "",
) -> list[str]:
    """``findscu -k`` values for a typical modality worklist query (empty = universal match)."""
    values = {
        "PatientName": patient_name,
        "ScheduledProcedureStepSequence[0].Modality": modality,
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle": station_ae,
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate": start_date,
    }
    return [f"{key}={values.get(key, '')}" for key in MWL_RETURN_KEYS]


def run_findscu_worklist(
    port: int,
    *,
    called_ae: str,
    keys: Sequence[str] | None = None,
    out_dir: Path | None = None,
    calling_ae: str = "FINDSCU",
    host: str = HOST,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``findscu -W``; with ``out_dir`` every answer is written there (read them back with
    :func:`read_findscu_results`)."""
    argv = [require_tool("findscu"), "-W", "-to", "5", "-ta", "10"]
    argv += ["-aet", calling_ae, "-aec", called_ae]
    for key in mwl_query_keys() if keys is None else keys:
        argv += ["-k", key]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        argv += ["-X", "-od", str(out_dir)]
    return _run([*argv, *extra_args, host, str(port)], timeout)


def read_findscu_results(out_dir: Path) -> list[Dataset]:
    """The answers ``findscu -X`` wrote (``rsp0001.dcm``, ...), in order."""
    return [dcmread(path) for path in sorted(out_dir.glob("rsp*.dcm"))]


# ---------------------------------------------------------------------------------------------
# Orthanc


@dataclass
class Orthanc(_Peer):
    """Debian's Orthanc with a generated configuration; storage and index under ``directory``.

    ``modalities`` maps a name to ``(ae_title, host, port)`` (Orthanc's ``DicomModalities``).
    With ``worklist_items`` the worklist plugin serves them from ``directory/worklists``.
    Orthanc 1.10 cannot bind to loopback only: its DICOM port listens on every address, and only
    loopback traffic is ever sent to it; HTTP refuses remote clients (``RemoteAccessAllowed``).
    """

    directory: Path
    ae_title: str = "ORTHANC"
    modalities: Mapping[str, tuple[str, str, int]] = field(default_factory=dict)
    worklist_items: Sequence[Dataset] | None = None
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    host: str = field(default=HOST, init=False)

    @property
    def port(self) -> int:
        return self.dicom_port

    def config(self) -> dict[str, Any]:
        storage = self.directory / "storage"
        config: dict[str, Any] = {
            "Name": f"test-orthanc-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowFindWorklist": True,
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "DicomScuTimeout": 10,
            "StableAge": 1,
            "SaveJobs": False,
            "Plugins": [],
        }
        if self.worklist_items is not None:
            worklists = self.directory / "worklists"
            write_worklist_files(worklists, self.worklist_items)
            config["Plugins"] = [str(ORTHANC_WORKLIST_PLUGIN)]
            config["Worklists"] = {"Enable": True, "Database": str(worklists)}
        return {**config, **self.extra_config}

    def start(self) -> Self:
        binary = require_tool("Orthanc")
        if self.worklist_items is not None:
            require_file(ORTHANC_WORKLIST_PLUGIN, "orthanc")
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.process = PeerProcess(
            f"Orthanc {self.ae_title}:{self.dicom_port}",
            [binary, str(config_path)],
            self.directory / "orthanc.log",
            cwd=self.directory,
        )
        self.process.start()
        wait_until(self._answers, what=self.process.name, process=self.process)
        return self

    def stop(self) -> None:
        """SIGKILL: its storage is thrown away, and a clean shutdown takes seconds."""
        if self.process is not None:
            self.process.stop(graceful=False)

    def _answers(self) -> bool:
        try:
            return self.request("GET", "/system")[0] == http.client.OK
        except OSError:
            return False

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        """One HTTP call to the REST API; returns (status, body)."""
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        """A REST call with a JSON (or raw bytes) body; raises PeerError unless 200."""
        body = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload)
        status, data = self.request(method, path, body.encode() if isinstance(body, str) else body)
        if status != http.client.OK:
            raise PeerError(f"Orthanc {method} {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data) if data else None

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/system")
        return result

    def instances(self) -> list[str]:
        result: list[str] = self.call("GET", "/instances")
        return result

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags by keyword (``simplified-tags``)."""
        result: dict[str, Any] = self.call("GET", f"/instances/{instance_id}/simplified-tags")
        return result

    def instance_transfer_syntax(self, instance_id: str) -> str:
        status, data = self.request("GET", f"/instances/{instance_id}/metadata/TransferSyntax")
        if status != http.client.OK:
            raise PeerError(f"Orthanc: no transfer syntax for {instance_id}: HTTP {status}")
        return data.decode().strip()

    def upload(self, path: Path) -> str:
        """POST a Part-10 file; returns the Orthanc instance id."""
        result = self.call("POST", "/instances", path.read_bytes())
        return str(result["ID"])

    def send_to_modality(self, modality: str, resources: Sequence[str]) -> dict[str, Any]:
        """C-STORE ``resources`` (Orthanc ids) to ``modality``, synchronously."""
        payload = {"Resources": list(resources), "Synchronous": True}
        result: dict[str, Any] = self.call("POST", f"/modalities/{modality}/store", payload)
        return result

    def echo(self, modality: str) -> bool:
        """C-ECHO from Orthanc to ``modality``."""
        return self.request("POST", f"/modalities/{modality}/echo", b"{}")[0] == http.client.OK


# ---------------------------------------------------------------------------------------------
# Factories for fixtures


class Peers:
    """Starts peers under one directory and stops every one of them on ``close``."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._stack = contextlib.ExitStack()
        self._count = 0

    def _dir(self, kind: str) -> Path:
        self._count += 1
        return self._base / f"{kind}-{self._count}"

    def store_scp(self, **options: Any) -> StoreSCP:
        base = self._dir("storescp")
        options.setdefault("log_dir", base)
        return self._stack.enter_context(StoreSCP(base / "received", **options))

    def worklist_scp(self, items: Sequence[Dataset], **options: Any) -> WorklistSCP:
        base = self._dir("wlmscpfs")
        options.setdefault("log_dir", base)
        return self._stack.enter_context(WorklistSCP(base / "db", items, **options))

    def orthanc(self, **options: Any) -> Orthanc:
        return self._stack.enter_context(Orthanc(self._dir("orthanc"), **options))

    def close(self) -> None:
        self._stack.close()


# ---------------------------------------------------------------------------------------------
# Sample data


@dataclass(frozen=True)
class SampleFile:
    name: str
    transfer_syntax: UID


# Bundled with pydicom itself (no download). Beware: some bundled files share a SOP Instance UID
# (implicit_le with jpeg_ls, jpeg_lossless with rle).
SAMPLE_FILES: Mapping[str, SampleFile] = {
    "implicit_le": SampleFile("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    "explicit_le": SampleFile("examples_rgb_color.dcm", ExplicitVRLittleEndian),
    "big_endian": SampleFile("ExplVR_BigEnd.dcm", ExplicitVRBigEndian),
    "deflate": SampleFile("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    "jpeg_baseline": SampleFile("examples_ybr_color.dcm", JPEGBaseline8Bit),
    "jpeg_lossless": SampleFile("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),
    "jpeg_ls": SampleFile("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    "jpeg2000_lossless": SampleFile("examples_jpeg2k.dcm", JPEG2000Lossless),
    "jpeg2000": SampleFile("JPEG2000.dcm", JPEG2000),
    "rle": SampleFile("SC_rgb_rle.dcm", RLELossless),
}


def sample_files() -> dict[str, Path]:
    """Category -> path of a pydicom test file (see :data:`SAMPLE_FILES`)."""
    paths = {}
    for category, sample in SAMPLE_FILES.items():
        path = get_testdata_file(sample.name, download=False)
        if not isinstance(path, str):
            raise PeerError(f"pydicom test file {sample.name} not found: reinstall pydicom")
        paths[category] = Path(path)
    return paths


def make_us_image(path: Path, seed: int, rows: int = 480, cols: int = 640) -> Dataset:
    """Write a valid uncompressed RGB ultrasound image (explicit VR LE Part-10) with fresh UIDs.

    Pixel data is pseudo-random from ``seed``; the patient is the obviously fake TEST^PATIENT.
    Returns the dataset written.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.Modality = "US"
    ds.Manufacturer = "dicom-gateway tests"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TEST0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = random.Random(seed).randbytes(rows * cols * 3)
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def make_us_images(directory: Path, count: int, first_seed: int = 0, *, rows: int = 32,
                   cols: int = 48) -> list[Path]:
    """``count`` small ultrasound images ``us-NNNN.dcm`` (seeds ``first_seed`` on) in ``directory``."""
    paths = [directory / f"us-{first_seed + i:04d}.dcm" for i in range(count)]
    for i, path in enumerate(paths):
        make_us_image(path, seed=first_seed + i, rows=rows, cols=cols)
    return paths


def sop_instance_uids(paths: Iterable[Path]) -> collections.Counter[str]:
    """How often each SOP Instance UID occurs in ``paths`` (what was sent against what arrived)."""
    return collections.Counter(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                               for p in paths)


_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def split_part10(data: bytes) -> tuple[dict[int, bytes], int]:
    """A Part-10 file's meta elements (group 0002, explicit VR little endian) by element number,
    and the offset where its dataset starts."""
    assert data[128:132] == b"DICM", "not a Part-10 file"
    meta: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        meta[element] = data[start : start + length]
        pos = start + length
    return meta, pos


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its file meta group, exactly as stored."""
    data = path.read_bytes()
    return data[split_part10(data)[1]:]


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """(HTTP status, body) of ``GET http://127.0.0.1:<port><path>``; error statuses too."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scraped_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` in a Prometheus text
    exposition, or None when there is none."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None

