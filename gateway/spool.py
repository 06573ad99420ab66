"""The durable spool: Part-10 object files plus the SQLite journal of instances and deliveries.

The invariant: an object the gateway acknowledged is never lost. ``SpoolWriter.commit()`` returns only
after the object file is fsync'd, renamed into ``objects/``, its directory fsync'd, and its journal row
committed (``synchronous=FULL``); the C-STORE Success goes out after that. See ``docs/spool.md`` for the
crash-safety argument and the on-disk layout.

Threads. ``begin()``/``write()`` run on the event loop (page-cache writes are cheap). ``commit()`` hands
the object to the *durability thread* and awaits it: one hop per batch, since commits queued while a
batch is in progress form the next batch. For a batch that thread fsyncs every file (on a few fsync
threads when there are several, so they overlap), renames each into ``objects/``, fsyncs each touched
shard directory once, commits one journal transaction for every row, and then resolves every waiting
commit. Every other journal call runs on the *journal thread* (a ``ThreadPoolExecutor(max_workers=1)``,
awaited with ``loop.run_in_executor``). Both threads use the one SQLite connection, one call at a time
(``_db_lock``). Forward attempts recorded meanwhile share one transaction, committed with
``synchronous=NORMAL``: an attempt record lost to a power cut only means the object is sent again (at
least once). So that a lost record can never leave a pending row without its file, an attempt never
deletes a file: it marks the instance finished, and the file is released by a later durable (FULL)
transaction, the next ingest batch's or one of its own after ``release_delay``, and only then unlinked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import re
import sqlite3
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.errors import ProtocolError, SpoolFull
from gateway.journal import (
    OUTCOMES,
    AttemptRecord,
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
RELEASE_DELAY = 0.05  # seconds a finished instance's file may wait for an ingest transaction
FSYNC_THREADS = 4  # fsyncs of one batch that overlap
BATCHES = 1  # batches in flight at once (2 measured no better: see docs/performance.md)
SPARE_FILES = 4  # empty temp files created ahead of begin(), off the event loop
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


class _Commit:
    """One object handed to the durability thread, which fills in how it went."""

    __slots__ = ("cancelled", "doing", "error", "fd", "final", "future", "inserted", "item", "tmp")

    def __init__(
        self, item: NewInstance, fd: int, tmp: Path, final: Path, future: asyncio.Future[Inserted]
    ) -> None:
        self.item = item
        self.fd = fd
        self.tmp = tmp
        self.final = final
        self.future = future
        self.cancelled = False  # set on the loop when the committing task was cancelled
        self.inserted: Inserted | None = None
        self.error: BaseException | None = None
        self.doing = ""

    def fail(self, error: BaseException, doing: str) -> None:
        self.error, self.doing = error, doing


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
        release_delay: float = RELEASE_DELAY,
    ) -> None:
        self._root = Path(root).absolute()
        self._objects = self._root / "objects"
        self._tmp = self._root / "tmp"
        self._spare = self._root / "spare"
        self._max_bytes = max_bytes
        self._min_free = min_free_fraction
        self._policy: Literal["forward", "ignore"] = duplicate_policy
        self._retention = retention_seconds
        self._history = history_seconds
        self._release_delay = release_delay
        self._clock = clock
        self._fs = fs or FileSystem()
        self._journal = Journal(
            self._root / JOURNAL_NAME, self._root, retention_seconds=retention_seconds
        )
        self._db_lock = threading.Lock()  # one journal call at a time, whichever thread makes it
        self._executor: ThreadPoolExecutor | None = None  # the journal thread
        self._durable: ThreadPoolExecutor | None = None  # the durability thread (ingest only)
        self._fsyncs: ThreadPoolExecutor | None = None  # overlaps the fsyncs of one batch
        self._ingest = False
        self._lock_fd = -1
        self._next_id = 1
        self._stored_bytes = 0  # SUM(size) of rows with a file: written only holding _db_lock
        self._inflight_bytes = 0  # written only on the event loop
        self._writers: set[SpoolWriter] = set()
        self._spares: collections.deque[tuple[int, str]] = collections.deque()  # (fd, path)
        self._refilling = False  # a spare-file job is queued or running
        self._spare_count = 0  # names spare files (only the spare-file job uses it)
        self._commits: list[_Commit] = []  # waiting for the durability thread
        self._batches = 0  # batches on the durability threads
        self._durable_idle = asyncio.Event()  # no batch on the durability threads
        self._durable_idle.set()
        self._commits_idle = asyncio.Event()  # no commit() between its first and last step
        self._commits_idle.set()
        self._committing = 0
        self._attempts: list[tuple[AttemptRecord, asyncio.Future[None]]] = []
        self._recording: asyncio.Future[int] | None = None
        self._recording_idle = asyncio.Event()  # no attempt transaction running
        self._recording_idle.set()
        self._release_due = False  # attempts finished instances: release their files durably
        self._release_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
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
        self._durable = ThreadPoolExecutor(max_workers=BATCHES, thread_name_prefix="spool-durable")
        self._fsyncs = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="spool-fsync")
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
        await self._start(partial(self._locked, partial(self._journal.open, create=False)))

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
        """Stop ingest: abort unfinished receptions, let commits and attempt records in progress
        finish (and the file work of cancelled commits), release the files of finished instances,
        then close the journal."""
        self._ingest = False
        for writer in list(self._writers):
            writer.abort()
        await self._commits_idle.wait()
        await self._durable_idle.wait()
        await self._recording_idle.wait()
        if self._background:
            await asyncio.wait(self._background)
        if self._release_due and self._executor is not None:
            self._release_due = False
            with contextlib.suppress(SpoolFull):  # logged; the next start releases them
                await self._call(partial(self._expire, self._clock()), "deleting delivered objects")
        await self._stop()

    async def _stop(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        for pool in (self._durable, self._fsyncs):
            if pool is not None:
                pool.shutdown(wait=True)  # idle by now (a spare-file job ends at once)
        self._durable = self._fsyncs = None
        while self._spares:
            fd, path = self._spares.popleft()
            with contextlib.suppress(OSError):
                os.close(fd)
            _unlink_quietly(Path(path))
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(sqlite3.Error):
            await loop.run_in_executor(executor, self._locked, self._journal.close)
        executor.shutdown(wait=True)  # the journal thread is idle by now: this returns at once
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _locked(self, job: Callable[[], T]) -> T:
        with self._db_lock:
            return job()

    # -- recovery (journal thread) -----------------------------------------------------------

    def _recover(self) -> RecoveryReport:
        with self._db_lock:  # nothing else runs yet; taken anyway, as for every journal call
            report = self._recover_locked()
        self._expire(self._clock())  # instances finished before the restart: their files go now
        return report

    def _recover_locked(self) -> RecoveryReport:
        for directory in (self._root, self._objects, self._tmp, self._spare):
            directory.mkdir(parents=True, exist_ok=True)
        for shard in range(256):
            (self._objects / f"{shard:02x}").mkdir(exist_ok=True)
        self._lock()
        for directory in (self._root, self._objects, self._tmp):
            self._fsync_dir(directory)
        self._journal.open(create=True)
        _empty(self._spare)  # spare files are empty and were never used
        swept = _empty(self._tmp)
        if swept:
            log.warning("spool: removed %d partial reception(s) from %s", swept, self._tmp)
        orphans, foreign, top, missing = self._reconcile()
        for item in missing:
            log.error(
                "spool: journal row %d (SOP Instance UID %r, state %s) has no file %s: marked lost",
                item.id, item.sop_instance_uid, item.state, item.path,
            )
        lost = self._journal.mark_missing(missing, self._clock())
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

    def _reconcile(self) -> tuple[int, int, int, list[ExpectedFile]]:
        """Match object files and journal rows without holding the table in memory: the ids found
        on disk go into one sorted array per shard (8 bytes each), the journal rows stream past
        them. Deletes files no row wants; returns (orphans, foreign, highest id, missing rows)."""
        shards, orphans, foreign, top = self._scan_objects()
        seen = [bytearray(len(ids)) for ids in shards]
        missing: list[ExpectedFile] = []
        for row in self._journal.expected_files():
            shard = row.id & 0xFF
            ids = shards[shard]
            index = bisect_left(ids, row.id)
            if index < len(ids) and ids[index] == row.id and row.path == _object_path(row.id):
                seen[shard][index] = 1
            else:
                missing.append(row)
        for ids, found in zip(shards, seen, strict=True):
            for index, ident in enumerate(ids):
                if not found[index]:
                    self._remove_orphan(str(self._root / _object_path(ident)))
                    orphans += 1
        return orphans, foreign, top, missing

    def _scan_objects(self) -> tuple[list[array[int]], int, int, int]:
        """The ids of the object files in their own shard, sorted per shard. A file of ours in
        another folder can have no journal row: it is deleted at once."""
        shards: list[array[int]] = [array("q") for _ in range(256)]
        orphans = foreign = top = 0
        for shard in os.scandir(self._objects):
            if not shard.is_dir(follow_symlinks=False):
                foreign += 1
                continue
            found: list[int] = []
            for entry in os.scandir(shard.path):
                match = _OBJECT_NAME.match(entry.name)
                if match is None or not entry.is_file(follow_symlinks=False):
                    foreign += 1
                    log.warning("spool: unexpected entry %s left alone", entry.path)
                    continue
                ident = int(match.group(1), 16)
                top = max(top, ident)
                if shard.name == f"{ident & 0xFF:02x}":
                    found.append(ident)
                else:
                    self._remove_orphan(entry.path)
                    orphans += 1
            if found:
                shards[found[0] & 0xFF] = array("q", sorted(found))
        return shards, orphans, foreign, top

    @staticmethod
    def _remove_orphan(path: str) -> None:
        log.warning("spool: object file %s has no journal row (never acknowledged): removed", path)
        os.unlink(path)

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
            fd = self._take_spare(tmp_path)
            if fd < 0:  # none ready: create it here, as the spare-file job would
                fd = self._fs.open(str(tmp_path), _TMP_FLAGS, 0o640)
        except OSError as exc:
            raise self._failed(exc, "creating a temporary file") from None
        self._refill_spares()
        writer = SpoolWriter(self, ident, meta, fd=fd, tmp_path=tmp_path, offset=len(header))
        writer._write_all(memoryview(header))
        if writer._error is not None:
            error = writer._error
            writer.abort()
            raise self._failed(error, "writing a file header")
        self._writers.add(writer)
        return writer

    def _take_spare(self, tmp_path: Path) -> int:
        """A spare file renamed to ``tmp_path`` (a rename is far cheaper than creating a file: on
        ext4 without a journal a create can cost 0.2-0.8 ms of CPU), or -1 when none is ready."""
        try:
            fd, path = self._spares.popleft()
        except IndexError:
            return -1
        try:
            self._fs.replace(path, str(tmp_path))
        except OSError:
            os.close(fd)
            _unlink_quietly(Path(path))
            raise
        return fd

    def _refill_spares(self) -> None:
        """Keep ``SPARE_FILES`` temp files created ahead, on an fsync thread (loop thread)."""
        if self._refilling or len(self._spares) > SPARE_FILES // 2 or self._fsyncs is None:
            return
        self._refilling = True
        self._fsyncs.submit(self._make_spares)

    def _make_spares(self) -> None:
        """An fsync thread. A failure is left for the next ``begin()`` to meet and report."""
        try:
            while self._ingest and len(self._spares) < SPARE_FILES:
                self._spare_count += 1
                path = str(self._spare / f"{self._spare_count:016x}.part")
                self._spares.append((self._fs.open(path, _TMP_FLAGS, 0o640), path))
        except OSError as exc:
            log.debug("spool: cannot create a spare temp file: %s", exc)
        finally:
            self._refilling = False

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
        rel = _object_path(writer._id)
        loop = asyncio.get_running_loop()
        item = _new_instance(writer, rel, self._clock(), destinations, matched_rules)
        commit = _Commit(item, writer._take_fd(), writer.tmp_path, self._root / rel,
                         loop.create_future())
        self._commits.append(commit)
        if self._batches < BATCHES:
            self._start_durable(loop)
        try:
            inserted = await commit.future
        except asyncio.CancelledError:
            # never acknowledged: the durability thread drops it if its journal transaction has
            # not started yet; otherwise it is journaled anyway (a possible duplicate, no loss)
            commit.cancelled = True
            raise
        self._failure = None
        return StoredInstance(
            inserted.id,
            self._root / inserted.path,
            inserted.size,
            inserted.dataset_offset,
            inserted.duplicate,
            inserted.held,
        )

    def _start_durable(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every queued commit to the durability thread as one batch (one hop per batch)."""
        batch, self._commits = self._commits, []
        if self._durable is None:
            for commit in batch:
                self._abandon(commit)
            return
        release, self._release_due = self._release_due, False
        self._batches += 1
        self._durable_idle.clear()
        job = loop.run_in_executor(self._durable, self._durable_batch, batch, release)
        job.add_done_callback(partial(self._durable_done, loop, batch, release))

    def _abandon(self, commit: _Commit) -> None:
        """The spool closed under a commit (loop thread)."""
        self._inflight_bytes -= commit.item.size
        with contextlib.suppress(OSError):
            os.close(commit.fd)
        with contextlib.suppress(OSError):
            os.unlink(commit.tmp)
        if not commit.future.done():
            commit.future.set_exception(SpoolFull("the spool closed before the object was saved"))

    def _durable_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Commit],
        release: bool,
        job: asyncio.Future[bool],
    ) -> None:
        self._batches -= 1
        crash = job.exception() if not job.cancelled() else None  # the job catches everything
        released = not job.cancelled() and crash is None and job.result()
        for commit in batch:
            self._inflight_bytes -= commit.item.size
            if commit.future.done():
                continue  # the committing task was cancelled: never acknowledged
            if commit.inserted is not None:
                commit.future.set_result(commit.inserted)
            else:
                doing = commit.doing or "making the object durable"
                commit.future.set_exception(self._journal_error(commit.error or crash, doing))
        if release and not released:
            self._want_release(loop)
        if self._commits:
            self._start_durable(loop)
        elif not self._batches:
            self._durable_idle.set()

    # -- the durability thread ---------------------------------------------------------------

    def _durable_batch(self, batch: list[_Commit], release: bool) -> bool:
        """fsync every file, rename each into objects/, fsync each touched shard directory once,
        then one journal transaction for every row (``synchronous=FULL``). A failing object fails
        alone; the others go on. ``release``: also release the files of finished instances in that
        transaction. Returns whether that was done."""
        try:
            live = self._sync_files(batch)
            live = self._sync_directories(self._rename(live))
            live = [commit for commit in live if not self._dropped(commit, commit.final)]
            return self._journal_rows(live, release) if live else False
        except BaseException as exc:  # a bug: fail what is unfinished, leave nothing behind
            for commit in batch:
                if commit.inserted is None and commit.error is None:
                    commit.fail(exc, "making the object durable")
                    for path in (commit.tmp, commit.final):
                        with contextlib.suppress(OSError):
                            os.unlink(path)
            raise

    def _sync_files(self, batch: list[_Commit]) -> list[_Commit]:
        fds = [commit.fd for commit in batch]
        for commit in batch:
            commit.fd = -1
        live: list[_Commit] = []
        for commit, error in zip(batch, self._each(self._sync_file, fds), strict=True):
            if error is not None:
                commit.fail(error, "making the object durable (fsync)")
                _unlink_quietly(commit.tmp)
            elif not self._dropped(commit, commit.tmp):
                live.append(commit)
        return live

    def _sync_file(self, fd: int) -> None:
        try:
            self._fs.fsync(fd)
        finally:
            os.close(fd)

    def _rename(self, batch: list[_Commit]) -> list[_Commit]:
        live: list[_Commit] = []
        for commit in batch:
            try:
                self._fs.replace(str(commit.tmp), str(commit.final))
            except OSError as exc:
                commit.fail(exc, "making the object durable (rename)")
                _unlink_quietly(commit.tmp)
            else:
                live.append(commit)
        return live

    def _sync_directories(self, batch: list[_Commit]) -> list[_Commit]:
        directories = list(dict.fromkeys(commit.final.parent for commit in batch))
        errors = dict(zip(directories, self._each(self._fsync_dir, directories), strict=True))
        live: list[_Commit] = []
        for commit in batch:
            error = errors[commit.final.parent]
            if error is not None:
                commit.fail(error, "making the object durable (fsync of its directory)")
                _unlink_quietly(commit.final)
            else:
                live.append(commit)
        return live

    def _each(self, job: Callable[[T], object], args: Sequence[T]) -> list[OSError | None]:
        """Run ``job`` on every argument (overlapping on the fsync threads when there are
        several); the OSError each one raised, or None."""

        def run(arg: T) -> OSError | None:
            try:
                job(arg)
            except OSError as exc:
                return exc
            return None

        if len(args) < 2 or self._fsyncs is None:
            return [run(arg) for arg in args]
        return list(self._fsyncs.map(run, args))

    @staticmethod
    def _dropped(commit: _Commit, path: Path) -> bool:
        """A commit cancelled before its journal transaction is dropped (its file removed)."""
        if commit.cancelled:
            _unlink_quietly(path)
        return commit.cancelled

    def _journal_rows(self, batch: list[_Commit], release: bool) -> bool:
        now = self._clock()
        try:
            with self._db_lock:
                inserted, released = self._journal.insert_batch(
                    [commit.item for commit in batch], self._policy,
                    expire_before=now if release else None,
                )
                self._stored_bytes += sum(
                    commit.item.size for commit, result in zip(batch, inserted, strict=True)
                    if result.stored
                ) - sum(ref.size for ref in released)
        except Exception as exc:  # SQLite (or the disk under it): every row of the batch fails
            for commit in batch:
                commit.fail(exc, "saving the journal row")
                _unlink_quietly(commit.final)
            return False
        for commit, result in zip(batch, inserted, strict=True):
            commit.inserted = result
            if not result.stored:  # an ignored duplicate: the first copy is kept
                _unlink_quietly(commit.final)
        if released and self._fsyncs is not None:  # deleting frees blocks: not while commits wait
            self._fsyncs.submit(self._unlink, released)
        elif released:
            self._unlink(released)
        return release

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
        self._inflight_bytes -= writer.size
        writer.size = 0
        _unlink_quietly(writer.tmp_path)

    def _track(self, job: asyncio.Future[Any]) -> None:
        """Remember a background job until it is done (``close()`` waits for it)."""
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    # -- usage and failures ------------------------------------------------------------------

    def usage(self) -> SpoolUsage:
        """Cheap and synchronous: bytes tracked in memory, statvfs re-read at most every
        ``recheck_seconds``. After a write failure it starts a background ``probe()`` at most that
        often, so readiness comes back when the disk does, even with no traffic."""
        used = self._stored_bytes + self._inflight_bytes
        free, fraction = self._disk_free()
        over = self._over_high_water(used, fraction)
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

    def _over_high_water(self, used: int, free_fraction: float) -> bool:
        return (self._max_bytes > 0 and used > self._max_bytes) or free_fraction < self._min_free

    def _short_of_space(self) -> bool:
        return self._over_high_water(self._stored_bytes + self._inflight_bytes, self._disk_free()[1])

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

    async def _query(self, job: Callable[[], T], doing: str) -> T:
        """``_call`` for one journal call, holding the journal lock."""
        return await self._call(partial(self._locked, job), doing)

    # -- forwarding side ---------------------------------------------------------------------

    async def pending(self, destination: str, after_id: int, limit: int, now: float) -> list[Delivery]:
        return await self._query(
            partial(self._journal.pending, destination, after_id, limit, now), "reading the queue"
        )

    async def next_due(self, destination: str) -> float | None:
        return await self._query(partial(self._journal.next_due, destination), "reading the queue")

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
        """Record one forward attempt. Attempts recorded meanwhile share one transaction; it is
        ``synchronous=NORMAL`` (see the module doc: losing it to a power cut means a resend). Files
        it frees are deleted only after a later durable commit."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {sorted(OUTCOMES)}")
        if self._executor is None:
            raise SpoolFull("the spool is not open")
        record = AttemptRecord(instance_id, destination, outcome, status, detail, next_attempt_at,
                               dead, self._clock())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._attempts.append((record, future))
        if self._recording is None:
            self._start_recording(loop)
        await future

    def _start_recording(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._attempts = self._attempts, []
        self._recording_idle.clear()
        at_once = self._release_delay <= 0 or self._short_of_space()  # space is wanted now
        job = loop.run_in_executor(self._executor, self._record_job, [r for r, _ in batch], at_once)
        self._recording = job
        job.add_done_callback(partial(self._recorded, loop, batch))

    def _record_job(self, records: list[AttemptRecord], at_once: bool) -> int:
        """Journal thread: one NORMAL transaction; returns how many files it made due for
        release. ``at_once`` (``release_delay`` 0, or the spool over its high-water mark): release
        them before returning, in a durable transaction of their own."""
        with self._db_lock:
            due = self._journal.record_attempts(records)
        if due and at_once:
            self._expire(self._clock())
            return 0
        return due

    def _recorded(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[AttemptRecord, asyncio.Future[None]]],
        job: asyncio.Future[int],
    ) -> None:
        self._recording = None
        error = None if not job.cancelled() and job.exception() is None else job
        if error is None:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            if job.result():
                self._want_release(loop)
        else:
            exc = None if job.cancelled() else job.exception()
            message = str(self._journal_error(exc, "recording a forward attempt"))
            for _, future in batch:
                if not future.done():
                    future.set_exception(SpoolFull(message))
        if self._attempts:
            self._start_recording(loop)
        else:
            self._recording_idle.set()

    # -- releasing the files of finished instances ---------------------------------------------

    def _want_release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Files are due for release: the next ingest batch's transaction releases them; if none
        starts within ``release_delay``, a transaction of their own does."""
        self._release_due = True
        if self._release_timer is None:
            self._release_timer = loop.call_later(self._release_delay, self._release_soon, loop)

    def _release_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        self._release_timer = None
        if not self._release_due or self._executor is None:
            return
        self._release_due = False
        job = loop.run_in_executor(self._executor, self._expire, self._clock())
        self._track(job)
        job.add_done_callback(self._released)

    def _released(self, job: asyncio.Future[int]) -> None:
        error = None if job.cancelled() else job.exception()
        if error is not None:  # logged; retried with the next release, the sweep or a restart
            self._journal_error(error, "deleting delivered objects")
            self._release_due = True

    def _expire(self, now: float) -> int:
        """Release (durably) and delete the files of finished instances that expired by ``now``."""
        released = 0
        while True:
            with self._db_lock:
                refs = self._journal.expire_files(now, _SWEEP_CHUNK)
                self._stored_bytes -= sum(ref.size for ref in refs)
            if not refs:
                return released
            self._unlink(refs)
            released += len(refs)

    # -- operator views and actions ------------------------------------------------------------

    async def counts(self) -> dict[str, DestinationCounts]:
        return await self._query(self._journal.counts, "counting the queue")

    async def held_count(self) -> int:
        return await self._query(self._journal.held_count, "counting held instances")

    async def list_items(
        self, *, destination: str | None, dead: bool, held: bool, limit: int
    ) -> list[ItemInfo]:
        return await self._query(
            partial(self._journal.list_items, destination=destination, dead=dead, held=held,
                    limit=limit),
            "listing the queue",
        )

    async def retry_dead(self, destination: str | None) -> int:
        return await self._query(
            partial(self._journal.retry_dead, destination, self._clock()), "retrying dead letters"
        )

    async def purge_dead(self, destination: str | None) -> int:
        purge = partial(self._journal.purge_dead, destination, self._clock())

        def job() -> int:
            with self._db_lock:
                count, refs = purge()
                self._stored_bytes -= sum(ref.size for ref in refs)
            self._unlink(refs)
            return count

        return await self._call(job, "purging dead letters")

    async def held_items(self, limit: int, after_id: int = 0) -> list[HeldItem]:
        return await self._query(
            partial(self._journal.held_items, limit, after_id), "listing held instances"
        )

    async def reroute(
        self, instance_id: int, destinations: Sequence[str], matched_rules: Sequence[str]
    ) -> None:
        """Give a held instance its destinations (after a rules reload). An instance that is no
        longer held, or an empty ``destinations``, is left as it is."""
        await self._query(
            partial(self._journal.reroute, instance_id, tuple(destinations), tuple(matched_rules),
                    self._clock()),
            "routing a held instance",
        )

    async def sweep_retention(self) -> int:
        """Delete delivered files whose retention ran out, forget old finished rows, and re-read
        the used bytes from the journal. Call it periodically (e.g. every minute)."""
        return await self._call(partial(self._sweep, self._clock()), "sweeping retention")

    def _sweep(self, now: float) -> int:
        swept = self._expire(now)
        while self._locked(
            partial(self._journal.prune, now - max(self._history, self._retention), _SWEEP_CHUNK)
        ):
            pass
        with self._db_lock:
            self._stored_bytes = self._journal.stored_bytes()
        return swept

    def _unlink(self, refs: Sequence[FileRef]) -> None:
        """Delete files a committed, durable transaction released (outside the journal lock)."""
        for ref in refs:
            try:
                os.unlink(self._root / ref.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("spool: cannot delete %s (%s); removed at next start", ref.path, exc)


def _object_path(ident: int) -> str:
    """Where object ``ident`` lives, relative to the spool (the shard is the id's low byte)."""
    return f"objects/{ident & 0xFF:02x}/{ident:016x}.dcm"


def _empty(directory: Path) -> int:
    """Delete the files (and symlinks) in ``directory``; how many there were."""
    removed = 0
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            os.unlink(entry.path)
            removed += 1
    return removed


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
