"""Can the spool take an object now? Used bytes against the high-water mark, free disk space, and the
last file-system failure (remembered, explained to the operator, cleared by a probe or a commit).

Invariants: ``usage()`` is cheap and synchronous (statvfs re-read at most every ``recheck_seconds``);
a failure refuses ingest (0xA700) for ``recheck_seconds`` before the disk is tried again; every
foreign error (OSError, sqlite3.Error) leaves here as a ``SpoolFull`` whose message says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import SpoolFull
from gateway.spool_files import JOURNAL_NAME, FileSystem

__all__ = ["SpoolHealth", "SpoolUsage"]

log = logging.getLogger("gateway.spool")  # one logger for every spool module


@dataclass(frozen=True, slots=True)
class SpoolUsage:
    used_bytes: int
    free_bytes: int
    capacity_bytes: int  # max_bytes, or 0 when there is no byte limit
    over_high_water: bool
    writable: bool


class SpoolHealth:
    """The high-water decision and the remembered failure of the spool under ``root``.

    ``track``: keeps a background job (the probe) until it is done, so that closing waits for it.
    """

    def __init__(
        self,
        root: Path,
        fs: FileSystem,
        *,
        max_bytes: int,
        min_free_fraction: float,
        track: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        self._root = root
        self._fs = fs
        self.max_bytes = max_bytes
        self.min_free_fraction = min_free_fraction
        self._track = track
        self._failure: str | None = None
        self._failure_until = 0.0
        self._probing: asyncio.Future[OSError | None] | None = None
        self._statvfs: tuple[float, int, float] | None = None  # (checked at, free bytes, fraction)

    # -- usage -------------------------------------------------------------------------------

    def usage(self, used: int, ingest: bool) -> SpoolUsage:
        """After a write failure it starts a background probe at most every ``recheck_seconds``,
        so readiness comes back when the disk does, even with no traffic."""
        free, fraction = self._disk_free()
        over = self._over_high_water(used, fraction)
        writable = ingest and self._failure is None
        if (
            ingest
            and self._failure is not None
            and self._probing is None
            and time.monotonic() >= self._failure_until
        ):
            with contextlib.suppress(RuntimeError):  # no running event loop: no background probe
                self._start_probe(asyncio.get_running_loop())
        return SpoolUsage(used, free, self.max_bytes, over, writable)

    def short_of_space(self, used: int) -> bool:
        return self._over_high_water(used, self._disk_free()[1])

    def _over_high_water(self, used: int, free_fraction: float) -> bool:
        return (self.max_bytes > 0 and used > self.max_bytes) or free_fraction < self.min_free_fraction

    def _disk_free(self) -> tuple[int, float]:
        now = time.monotonic()
        cached = self._statvfs
        if cached is not None and now - cached[0] < self._fs.recheck_seconds:
            return cached[1], cached[2]
        try:
            st = self._fs.statvfs(str(self._root))
        except OSError:
            free, fraction = 0, 0.0
        else:
            free = st.f_bavail * st.f_frsize
            fraction = st.f_bavail / st.f_blocks if st.f_blocks else 0.0
        self._statvfs = (now, free, fraction)
        return free, fraction

    # -- failures ----------------------------------------------------------------------------

    def check_failure(self) -> None:
        """Raise SpoolFull while a remembered failure is still trusted."""
        if self._failure is not None and time.monotonic() < self._failure_until:
            raise SpoolFull(self._failure)

    def clear_failure(self) -> None:
        self._failure = None

    def failed(self, exc: OSError, doing: str) -> SpoolFull:
        """Remember a file-system failure for ``recheck_seconds`` and explain it."""
        message = _explain(exc, doing, self._root)
        if message != self._failure:
            log.error("%s", message)
        self._failure = message
        self._failure_until = time.monotonic() + self._fs.recheck_seconds
        return SpoolFull(message)

    def journal_error(self, exc: BaseException | None, doing: str) -> SpoolFull:
        if isinstance(exc, sqlite3.Error):
            code = _sqlite_errno(getattr(exc, "sqlite_errorname", ""))
            if code is not None:
                exc = OSError(code, f"{os.strerror(code)} (journal: {exc})")
        if isinstance(exc, OSError):
            return self.failed(exc, doing)
        if isinstance(exc, SpoolFull):
            return SpoolFull(str(exc))
        detail = "the journal was closed" if exc is None else str(exc)
        message = (
            f"spool: journal error while {doing} ({detail}); check free space and the disk under "
            f"{self._root}, and that {JOURNAL_NAME} is intact"
        )
        log.error("%s", message)
        return SpoolFull(message)

    # -- probing -----------------------------------------------------------------------------

    async def probe(self) -> bool:
        """Does the disk take writes again? Creates, writes, fsyncs and deletes ``tmp/probe.part``
        (off the event loop); a success clears the remembered failure."""
        if self._probing is not None:
            await asyncio.wait([self._probing])
        job = self._start_probe(asyncio.get_running_loop())
        await asyncio.wait([job])
        return not job.cancelled() and job.result() is None

    def _start_probe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[OSError | None]:
        job = loop.run_in_executor(None, self._probe_disk)
        self._probing = job
        self._track(job)
        job.add_done_callback(self._probe_done)
        return job

    def _probe_disk(self) -> OSError | None:
        path = self._root / "tmp" / "probe.part"
        try:
            fd = self._fs.open(str(path), os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                self._fs.write(fd, b"\0")
                self._fs.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(path)
        except OSError as exc:
            return exc
        return None

    def _probe_done(self, job: asyncio.Future[OSError | None]) -> None:
        self._probing = None
        if job.cancelled():
            return
        error = job.result()
        if error is None:
            self._failure = None
        else:
            self.failed(error, "probing the spool after an error")


_SQLITE_ERRNO = {  # primary SQLite result code -> the errno whose advice fits
    "SQLITE_FULL": errno.ENOSPC,
    "SQLITE_IOERR": errno.EIO,
    "SQLITE_READONLY": errno.EROFS,
    "SQLITE_CANTOPEN": errno.EACCES,
}


def _sqlite_errno(name: str) -> int | None:
    """``SQLITE_IOERR_FSYNC`` -> EIO (extended codes share their primary code's advice)."""
    for primary, code in _SQLITE_ERRNO.items():
        if name == primary or name.startswith(primary + "_"):
            return code
    return None


_ADVICE = {
    errno.ENOSPC: "the spool filesystem is full: free space under {root} or let the queue drain",
    errno.EDQUOT: "the disk quota of the gateway user is exhausted: raise it or free space",
    errno.EROFS: "the spool filesystem is read-only: remount it read-write (see the kernel log "
    "for why it was remounted)",
    errno.EIO: "the disk reported an I/O error: check it (kernel log, SMART) before trusting it",
    errno.EACCES: "permission denied: give the gateway user write access to {root}",
    errno.EPERM: "operation not permitted: give the gateway user write access to {root}",
}


def _explain(exc: OSError, doing: str, root: Path) -> str:
    code = exc.errno or 0
    name = errno.errorcode.get(code, "error")
    advice = _ADVICE.get(code, "check the spool directory {root} and its disk").format(root=root)
    return (
        f"spool: {doing} failed ({name}: {exc.strerror or exc}); {advice}. Objects are refused "
        "(0xA700) until this clears; nothing acknowledged was lost"
    )
