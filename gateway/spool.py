"""The durable spool: Part-10 object files plus the SQLite journal of instances and deliveries.

The invariant: an object the gateway acknowledged is never lost. ``SpoolWriter.commit()`` returns only
after the object file is fsync'd, renamed into ``objects/``, its directory fsync'd, and its journal row
committed (``synchronous=FULL``); the C-STORE Success goes out after that. See ``docs/spool.md`` for the
crash-safety argument and the on-disk layout.

Threads: ``begin()``/``write()`` run on the event loop (page-cache writes are cheap). Object fsyncs run in
the loop's default executor, so several associations' fsyncs overlap. Every journal operation runs on
one dedicated thread (a ``ThreadPoolExecutor(max_workers=1)``, awaited with ``loop.run_in_executor``);
commits that queue up while a journal transaction is running go into the next transaction together
(group commit). File deletions decided by the journal happen on that thread too, after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

from gateway.errors import ProtocolError, SpoolFull
from gateway.journal import (
    Delivery,
    DestinationCounts,
    ExpectedFile,
    FileRef,
    HeldItem,
    Inserted,
    ItemInfo,
    Journal,
    NewInstance,
)
from gateway.part10 import encode_file_meta

__all__ = [
    "Delivery",
    "DestinationCounts",
    "FileSystem",
    "HeldItem",
    "InstanceMeta",
    "ItemInfo",
    "RecoveryReport",
    "Spool",
    "SpoolUsage",
    "SpoolWriter",
    "StoredInstance",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX_BYTES = 64 * 1024
JOURNAL_NAME = "journal.sqlite3"
LOCK_NAME = "spool.lock"
HISTORY_SECONDS = 86400.0
_SWEEP_CHUNK = 500
_OBJECT_NAME = re.compile(r"^([0-9a-f]{16})\.dcm$")
_TMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class InstanceMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    source_ip: str


@dataclass(frozen=True, slots=True)
class StoredInstance:
    id: int
    path: Path
    size: int
    dataset_offset: int
    duplicate: bool
    held: bool


@dataclass(frozen=True, slots=True)
class SpoolUsage:
    used_bytes: int
    free_bytes: int
    capacity_bytes: int  # max_bytes, or 0 when there is no byte limit
    over_high_water: bool
    writable: bool


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    swept_temp_files: int  # partial receptions (never acknowledged), deleted
    orphan_files: int  # object files without a live journal row (never acknowledged), deleted
    lost_instances: int  # journal rows whose file was missing: should always be 0
    foreign_files: int  # files in objects/ the spool did not name; left alone
    pending_deliveries: int
    held_instances: int


class FileSystem:
    """The file-system calls the spool can fail in: a seam for tests (ENOSPC, EIO, EROFS, statvfs).

    ``recheck_seconds``: how long a statvfs result or a write failure is trusted before the disk is
    asked again (keeps ``begin()`` cheap under load and while the disk is broken).
    """

    recheck_seconds: float = 1.0

    def open(self, path: str, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def statvfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(path)


class SpoolWriter:
    """One object being received: a temp file with the Part-10 header already written."""

    def __init__(
        self, spool: Spool, ident: int, meta: InstanceMeta, *, fd: int, tmp_path: Path, offset: int
    ) -> None:
        self._spool = spool
        self._id = ident
        self.meta = meta
        self._fd = fd
        self.tmp_path = tmp_path
        self.dataset_offset = offset
        self.size = 0  # bytes in the file so far, header included
        self._prefix = bytearray()
        self._error: OSError | None = None
        self._finished = False

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def prefix(self) -> bytes:
        """The first 64 KiB of dataset bytes (for parsing the routing header)."""
        return bytes(self._prefix)

    def write(self, data: bytes | memoryview) -> None:
        """Append dataset bytes. Never raises: an OSError is recorded and ``commit()`` reports it."""
        if self._error is not None or self._finished:
            return
        view = memoryview(data)
        if len(self._prefix) < PREFIX_BYTES:
            self._prefix += view[: PREFIX_BYTES - len(self._prefix)]
        self._write_all(view)

    def _write_all(self, view: memoryview) -> None:
        fs = self._spool._fs
        done = 0
        try:
            while done < len(view):
                done += fs.write(self._fd, view[done:])
        except OSError as exc:
            self._error = exc
        finally:
            self.size += done
            self._spool._inflight_bytes += done

    async def commit(
        self, destinations: Sequence[str], matched_rules: Sequence[str]
    ) -> StoredInstance:
        """Make the object durable and journal it; raises ``SpoolFull`` (temp file removed) on failure."""
        if self._finished:
            raise SpoolFull("this object was aborted (the spool is closing) or already committed")
        self._finished = True
        return await self._spool._commit(self, tuple(destinations), tuple(matched_rules))

    def abort(self) -> None:
        """Close and delete the temp file (the association went away mid-dataset)."""
        if self._finished:
            return
        self._finished = True
        self._spool._discard(self)

    def _take_fd(self) -> int:
        fd, self._fd = self._fd, -1
        return fd


class Spool:
    """Object files under ``root/objects``, temp files under ``root/tmp``, the journal beside them."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 0,
        min_free_fraction: float = 0.05,
        duplicate_policy: Literal["forward", "ignore"] = "forward",
        retention_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
        fs: FileSystem | None = None,
        history_seconds: float = HISTORY_SECONDS,
    ) -> None:
        self._root = Path(root).absolute()
        self._objects = self._root / "objects"
        self._tmp = self._root / "tmp"
        self._max_bytes = max_bytes
        self._min_free = min_free_fraction
        self._policy: Literal["forward", "ignore"] = duplicate_policy
        self._retention = retention_seconds
        self._history = history_seconds
        self._clock = clock
        self._fs = fs or FileSystem()
        self._journal = Journal(
            self._root / JOURNAL_NAME, self._root, retention_seconds=retention_seconds
        )
        self._executor: ThreadPoolExecutor | None = None
        self._ingest = False
        self._lock_fd = -1
        self._next_id = 1
        self._stored_bytes = 0  # written only on the journal thread
        self._inflight_bytes = 0  # written only on the event loop
        self._writers: set[SpoolWriter] = set()
        self._queued: list[tuple[NewInstance, asyncio.Future[Inserted]]] = []
        self._flushing: asyncio.Future[list[Inserted]] | None = None
        self._flush_idle = asyncio.Event()  # no journal transaction of commits running
        self._flush_idle.set()
        self._commits_idle = asyncio.Event()  # no commit() between its first and last step
        self._commits_idle.set()
        self._committing = 0
        self._background: set[asyncio.Future[None] | asyncio.Future[OSError | None]] = set()
        self._failure: str | None = None
        self._failure_until = 0.0
        self._probing: asyncio.Future[OSError | None] | None = None
        self._statvfs: tuple[float, int, float] | None = None  # (checked at, free bytes, fraction)

    @property
    def root(self) -> Path:
        return self._root

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> RecoveryReport:
        """Take ownership of the spool (one gateway process per spool), recover, allow ingest."""
        report = await self._start(self._recover)
        self._ingest = True
        return report

    async def open_readonly(self) -> None:
        """Open the journal only, next to a running gateway (the ``queue`` CLI): no recovery, no
        ingest (``begin()`` raises SpoolFull). Forwarding-side and operator calls work; their writes
        (``retry_dead``, ``purge_dead``) wait on the journal lock (busy timeout 5 s)."""
        if not (self._root / JOURNAL_NAME).is_file():
            raise SpoolFull(
                f"no spool journal at {self._root / JOURNAL_NAME}: check spool_dir (the gateway "
                "creates it on its first start)"
            )
        await self._start(partial(self._journal.open, create=False))

    async def _start(self, job: Callable[[], T]) -> T:
        if self._executor is not None:
            raise SpoolFull("the spool is already open (a gateway bug)")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-journal")
        try:
            return await self._call(job, "opening the spool")
        except BaseException:
            await self._stop()
            raise

    async def close(self) -> None:
        """Stop ingest: abort unfinished receptions, let commits in progress finish (and the file
        work of cancelled ones), then close the journal."""
        self._ingest = False
        for writer in list(self._writers):
            writer.abort()
        await self._commits_idle.wait()
        if self._background:
            await asyncio.wait(self._background)
        await self._flush_idle.wait()
        await self._stop()

    async def _stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(sqlite3.Error):
            await loop.run_in_executor(executor, self._journal.close)
        executor.shutdown(wait=True)  # the journal thread is idle by now: this returns at once
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- recovery (journal thread) -----------------------------------------------------------

    def _recover(self) -> RecoveryReport:
        for directory in (self._root, self._objects, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        for shard in range(256):
            (self._objects / f"{shard:02x}").mkdir(exist_ok=True)
        self._lock()
        for directory in (self._root, self._objects, self._tmp):
            self._fsync_dir(directory)
        self._journal.open(create=True)
        swept = self._sweep_tmp()
        expected = {item.id: item for item in self._journal.expected_files()}
        orphans, foreign, top = self._reconcile(expected)
        for item in expected.values():
            log.error(
                "spool: journal row %d (SOP Instance UID %r, state %s) has no file %s: marked lost",
                item.id, item.sop_instance_uid, item.state, item.path,
            )
        lost = self._journal.mark_missing(list(expected.values()), self._clock())
        self._next_id = max(self._journal.max_id(), top) + 1
        self._stored_bytes = self._journal.stored_bytes()
        return RecoveryReport(
            swept, orphans, lost, foreign, self._journal.pending_count(), self._journal.held_count()
        )

    def _lock(self) -> None:
        fd = os.open(self._root / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolFull(
                f"spool {self._root} is in use by another gateway process; stop it, or give this "
                "one its own spool_dir"
            ) from None
        self._lock_fd = fd

    def _sweep_tmp(self) -> int:
        swept = 0
        for entry in os.scandir(self._tmp):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                os.unlink(entry.path)
                swept += 1
        if swept:
            log.warning("spool: removed %d partial reception(s) from %s", swept, self._tmp)
        return swept

    def _reconcile(self, expected: dict[int, ExpectedFile]) -> tuple[int, int, int]:
        """Delete object files no journal row wants; leave ``expected`` holding the missing ones."""
        orphans = foreign = top = 0
        for shard in os.scandir(self._objects):
            if not shard.is_dir(follow_symlinks=False):
                foreign += 1
                continue
            for entry in os.scandir(shard.path):
                match = _OBJECT_NAME.match(entry.name)
                if match is None or not entry.is_file(follow_symlinks=False):
                    foreign += 1
                    log.warning("spool: unexpected entry %s left alone", entry.path)
                    continue
                ident = int(match.group(1), 16)
                top = max(top, ident)
                row = expected.get(ident)
                if row is not None and self._root / row.path == Path(entry.path):
                    del expected[ident]
                    continue
                log.warning("spool: object file %s has no journal row (never acknowledged): "
                            "removed", entry.path)
                os.unlink(entry.path)
                orphans += 1
        return orphans, foreign, top

    # -- ingest ------------------------------------------------------------------------------

    def begin(self, meta: InstanceMeta) -> SpoolWriter:
        """Start receiving one object; raises SpoolFull when the spool cannot take it."""
        self._check_ingest()
        try:
            header = encode_file_meta(
                meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, meta.calling_ae
            )
        except ValueError as exc:
            raise ProtocolError(f"cannot store this object: {exc}") from None
        ident = self._next_id
        self._next_id += 1
        tmp_path = self._tmp / f"{ident:016x}.part"
        try:
            fd = self._fs.open(str(tmp_path), _TMP_FLAGS, 0o640)
        except OSError as exc:
            raise self._failed(exc, "creating a temporary file") from None
        writer = SpoolWriter(self, ident, meta, fd=fd, tmp_path=tmp_path, offset=len(header))
        writer._write_all(memoryview(header))
        if writer._error is not None:
            error = writer._error
            writer.abort()
            raise self._failed(error, "writing a file header")
        self._writers.add(writer)
        return writer

    def _check_ingest(self) -> None:
        if not self._ingest:
            raise SpoolFull("the spool is not open for ingest (the gateway is starting or stopping)")
        if self._failure is not None and time.monotonic() < self._failure_until:
            raise SpoolFull(self._failure)
        usage = self.usage()
        if usage.over_high_water:
            raise SpoolFull(
                f"spool {self._root} is over its high-water mark (used {usage.used_bytes} bytes of "
                f"spool_max_bytes {self._max_bytes}, {usage.free_bytes} bytes free on the disk, "
                f"spool_min_free_fraction {self._min_free}); check that the destinations are up "
                "and draining the queue, or give the spool more room"
            )

    async def _commit(
        self, writer: SpoolWriter, destinations: tuple[str, ...], matched_rules: tuple[str, ...]
    ) -> StoredInstance:
        self._writers.discard(writer)
        self._committing += 1
        self._commits_idle.clear()
        try:
            return await self._make_durable(writer, destinations, matched_rules)
        finally:
            self._committing -= 1
            if not self._committing:
                self._commits_idle.set()

    async def _make_durable(
        self, writer: SpoolWriter, destinations: tuple[str, ...], matched_rules: tuple[str, ...]
    ) -> StoredInstance:
        if writer._error is not None:
            error = writer._error
            self._discard(writer)
            raise self._failed(error, "writing the dataset")
        rel = f"objects/{writer._id & 0xFF:02x}/{writer._id:016x}.dcm"
        final = self._root / rel
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, self._persist, writer._take_fd(), writer.tmp_path, final)
        self._track(job)
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # not acknowledged, and nobody will journal it: remove the file once the job is done
            job.add_done_callback(lambda _: self._forget(writer, final))
            raise
        except OSError as exc:
            self._forget(writer, final)
            raise self._failed(exc, "making the object durable (fsync/rename)") from None
        item = _new_instance(writer, rel, self._clock(), destinations, matched_rules)
        inserted = await self._enqueue(item)
        self._failure = None
        return StoredInstance(
            inserted.id,
            self._root / inserted.path,
            inserted.size,
            inserted.dataset_offset,
            inserted.duplicate,
            inserted.held,
        )

    def _track(self, job: asyncio.Future[None] | asyncio.Future[OSError | None]) -> None:
        """Remember a default-executor job until it is done (``close()`` waits for it)."""
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    def _persist(self, fd: int, tmp_path: Path, final: Path) -> None:
        """fsync the file, rename it into objects/, fsync the directory (default executor)."""
        try:
            self._fs.fsync(fd)
        finally:
            os.close(fd)
        self._fs.replace(str(tmp_path), str(final))
        self._fsync_dir(final.parent)

    def _fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fs.fsync(fd)
        finally:
            os.close(fd)

    def _discard(self, writer: SpoolWriter) -> None:
        """Close and delete an unfinished temp file (loop thread)."""
        self._writers.discard(writer)
        fd = writer._take_fd()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._forget(writer, None)

    def _forget(self, writer: SpoolWriter, final: Path | None) -> None:
        self._inflight_bytes -= writer.size
        writer.size = 0
        for path in (writer.tmp_path, final):
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _enqueue(self, item: NewInstance) -> asyncio.Future[Inserted]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Inserted] = loop.create_future()
        self._queued.append((item, future))
        if self._flushing is None:
            self._start_flush(loop)
        return future

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queued = self._queued, []
        if self._executor is None:
            for item, future in batch:
                self._inflight_bytes -= item.size
                with contextlib.suppress(OSError):
                    os.unlink(self._root / item.path)
                if not future.done():
                    future.set_exception(SpoolFull("the spool closed before the object was saved"))
            return
        self._flush_idle.clear()
        job = loop.run_in_executor(self._executor, self._insert_job, [item for item, _ in batch])
        self._flushing = job
        job.add_done_callback(partial(self._flush_done, loop, batch))

    def _insert_job(self, items: list[NewInstance]) -> list[Inserted]:
        """Journal thread: one transaction for the batch; on failure delete the batch's files."""
        try:
            results = self._journal.insert_batch(items, self._policy)
        except BaseException:
            for item in items:
                with contextlib.suppress(OSError):
                    os.unlink(self._root / item.path)
            raise
        for item, result in zip(items, results, strict=True):
            if result.stored:
                self._stored_bytes += item.size
            else:
                with contextlib.suppress(OSError):
                    os.unlink(self._root / item.path)
        return results

    def _flush_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[NewInstance, asyncio.Future[Inserted]]],
        job: asyncio.Future[list[Inserted]],
    ) -> None:
        self._flushing = None
        error = None if job.cancelled() else job.exception()
        for index, (item, future) in enumerate(batch):
            self._inflight_bytes -= item.size
            if future.done():
                continue  # the committing task was cancelled: stored but never acknowledged
            if job.cancelled() or error is not None:
                future.set_exception(self._journal_error(error, "saving the journal row"))
            else:
                future.set_result(job.result()[index])
        if self._queued:
            self._start_flush(loop)
        else:
            self._flush_idle.set()

    # -- usage and failures ------------------------------------------------------------------

    def usage(self) -> SpoolUsage:
        """Cheap and synchronous: bytes tracked in memory, statvfs re-read at most every
        ``recheck_seconds``. After a write failure it starts a background ``probe()`` at most that
        often, so readiness comes back when the disk does, even with no traffic."""
        used = self._stored_bytes + self._inflight_bytes
        free, fraction = self._disk_free()
        over = (self._max_bytes > 0 and used > self._max_bytes) or fraction < self._min_free
        writable = self._ingest and self._failure is None
        if (
            self._ingest
            and self._failure is not None
            and self._probing is None
            and time.monotonic() >= self._failure_until
        ):
            with contextlib.suppress(RuntimeError):  # no running event loop: no background probe
                self._start_probe(asyncio.get_running_loop())
        return SpoolUsage(used, free, self._max_bytes, over, writable)

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

    async def probe(self) -> bool:
        """Does the disk take writes again? Creates, writes, fsyncs and deletes ``tmp/probe.part``
        (off the event loop); a success clears the remembered failure."""
        if not self._ingest:
            return False
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
        path = self._tmp / "probe.part"
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
            self._failed(error, "probing the spool after an error")

    def _failed(self, exc: OSError, doing: str) -> SpoolFull:
        """Remember a file-system failure for ``recheck_seconds`` and explain it."""
        message = _explain(exc, doing, self._root)
        if message != self._failure:
            log.error("%s", message)
        self._failure = message
        self._failure_until = time.monotonic() + self._fs.recheck_seconds
        return SpoolFull(message)

    def _journal_error(self, exc: BaseException | None, doing: str) -> SpoolFull:
        if isinstance(exc, sqlite3.Error):
            code = _sqlite_errno(getattr(exc, "sqlite_errorname", ""))
            if code is not None:
                exc = OSError(code, f"{os.strerror(code)} (journal: {exc})")
        if isinstance(exc, OSError):
            return self._failed(exc, doing)
        if isinstance(exc, SpoolFull):
            return SpoolFull(str(exc))
        detail = "the journal was closed" if exc is None else str(exc)
        message = (
            f"spool: journal error while {doing} ({detail}); check free space and the disk under "
            f"{self._root}, and that {JOURNAL_NAME} is intact"
        )
        log.error("%s", message)
        return SpoolFull(message)

    async def _call(self, job: Callable[[], T], doing: str) -> T:
        """Run ``job`` on the journal thread; translate foreign errors into SpoolFull."""
        if self._executor is None:
            raise SpoolFull("the spool is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, job)
        except (sqlite3.Error, OSError) as exc:
            raise self._journal_error(exc, doing) from None

    # -- forwarding side ---------------------------------------------------------------------

    async def pending(self, destination: str, after_id: int, limit: int, now: float) -> list[Delivery]:
        return await self._call(
            partial(self._journal.pending, destination, after_id, limit, now), "reading the queue"
        )

    async def next_due(self, destination: str) -> float | None:
        return await self._call(partial(self._journal.next_due, destination), "reading the queue")

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
        record = partial(
            self._journal.record_attempt, instance_id, destination, outcome, status, detail,
            next_attempt_at=next_attempt_at, dead=dead, now=self._clock(),
        )
        await self._call(lambda: self._delete_files(record()), "recording a forward attempt")

    async def counts(self) -> dict[str, DestinationCounts]:
        return await self._call(self._journal.counts, "counting the queue")

    async def held_count(self) -> int:
        return await self._call(self._journal.held_count, "counting held instances")

    async def list_items(
        self, *, destination: str | None, dead: bool, held: bool, limit: int
    ) -> list[ItemInfo]:
        return await self._call(
            partial(self._journal.list_items, destination=destination, dead=dead, held=held,
                    limit=limit),
            "listing the queue",
        )

    async def retry_dead(self, destination: str | None) -> int:
        return await self._call(
            partial(self._journal.retry_dead, destination, self._clock()), "retrying dead letters"
        )

    async def purge_dead(self, destination: str | None) -> int:
        purge = partial(self._journal.purge_dead, destination, self._clock())

        def job() -> int:
            count, refs = purge()
            self._delete_files(refs)
            return count

        return await self._call(job, "purging dead letters")

    async def held_items(self, limit: int, after_id: int = 0) -> list[HeldItem]:
        return await self._call(
            partial(self._journal.held_items, limit, after_id), "listing held instances"
        )

    async def reroute(
        self, instance_id: int, destinations: Sequence[str], matched_rules: Sequence[str]
    ) -> None:
        """Give a held instance its destinations (after a rules reload). An instance that is no
        longer held, or an empty ``destinations``, is left as it is."""
        await self._call(
            partial(self._journal.reroute, instance_id, tuple(destinations), tuple(matched_rules),
                    self._clock()),
            "routing a held instance",
        )

    async def sweep_retention(self) -> int:
        """Delete delivered files whose retention ran out, forget old finished rows, and re-read
        the used bytes from the journal. Call it periodically (e.g. every minute)."""
        return await self._call(partial(self._sweep, self._clock()), "sweeping retention")

    def _sweep(self, now: float) -> int:
        swept = 0
        while refs := self._journal.expire_files(now, _SWEEP_CHUNK):
            self._delete_files(refs)
            swept += len(refs)
        while self._journal.prune(now - max(self._history, self._retention), _SWEEP_CHUNK):
            pass
        self._stored_bytes = self._journal.stored_bytes()
        return swept

    def _delete_files(self, refs: Sequence[FileRef]) -> None:
        """Journal thread, after the commit that released them."""
        for ref in refs:
            try:
                os.unlink(self._root / ref.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("spool: cannot delete %s (%s); removed at next start", ref.path, exc)
            self._stored_bytes -= ref.size


def _new_instance(
    writer: SpoolWriter,
    rel: str,
    now: float,
    destinations: tuple[str, ...],
    matched_rules: tuple[str, ...],
) -> NewInstance:
    meta = writer.meta
    return NewInstance(
        id=writer._id,
        sop_instance_uid=_text(meta.sop_instance_uid),
        sop_class_uid=_text(meta.sop_class_uid),
        transfer_syntax=_text(meta.transfer_syntax),
        calling_ae=_text(meta.calling_ae),
        called_ae=_text(meta.called_ae),
        source_ip=_text(meta.source_ip),
        size=writer.size,
        dataset_offset=writer.dataset_offset,
        path=rel,
        received_at=now,
        destinations=destinations,
        matched_rules=matched_rules,
    )


def _text(value: str) -> str:
    """A value SQLite can store as UTF-8 text (lone surrogates from undecodable bytes escaped)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


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
