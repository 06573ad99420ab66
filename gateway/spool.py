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
(the lock of ``gateway.spool_ledger.Ledger``). Forward attempts recorded meanwhile share one
transaction, committed with ``synchronous=NORMAL``: an attempt record lost to a power cut only means
the object is sent again (at least once). So that a lost record can never leave a pending row without
its file, an attempt never deletes a file: it marks the instance finished, and the file is released by
a later durable (FULL) transaction, the next ingest batch's or one of its own after ``release_delay``,
and only then unlinked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.durability import Commit, DurableBatches
from gateway.errors import ProtocolError, SpoolFull
from gateway.journal import (
    AttemptRecord,
    Delivery,
    DestinationCounts,
    HeldItem,
    ItemInfo,
    Journal,
)
from gateway.part10 import encode_file_meta
from gateway.recovery import RecoveryReport, SpoolRecovery, lock_spool
from gateway.retry import OUTCOMES
from gateway.spool_files import (
    JOURNAL_NAME,
    LOCK_NAME,
    RECYCLED_KEEP_BYTES,
    SPARE_FILES,
    TMP_FLAGS,
    FileSystem,
    SpareFiles,
    log,
    object_path,
    unlink_quietly,
)
from gateway.spool_health import SpoolHealth, SpoolUsage
from gateway.spool_ledger import SWEEP_CHUNK, Ledger
from gateway.spool_writer import (
    PREFIX_BYTES,
    InstanceMeta,
    SpoolWriter,
    StoredInstance,
    new_instance,
)

__all__ = [  # the constants too: importers take them from here
    "JOURNAL_NAME",
    "LOCK_NAME",
    "PREFIX_BYTES",
    "RECYCLED_KEEP_BYTES",
    "SPARE_FILES",
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

T = TypeVar("T")

HISTORY_SECONDS = 86400.0
RELEASE_DELAY = 0.05  # seconds a finished instance's file may wait for an ingest transaction
FSYNC_THREADS = 4  # fsyncs of one batch that overlap
BATCHES = 1  # batches in flight at once (2 measured no better: see docs/performance.md)


class Spool:
    """Object files under ``root/objects``, temp files under ``root/tmp``, the journal beside them.

    The facade over the spool's parts: ``SpareFiles`` and ``FileSystem`` (``gateway.spool_files``),
    the durability thread's ``DurableBatches`` (``gateway.durability``), ``SpoolRecovery``
    (``gateway.recovery``), ``SpoolHealth`` (``gateway.spool_health``) and the ``Ledger`` of journal
    and bytes (``gateway.spool_ledger``). It owns the threads, the queues of commits and attempt
    records, and the release of finished instances' files.
    """

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
        self._tmp = self._root / "tmp"
        self._retention = retention_seconds
        self._history = history_seconds
        self._release_delay = release_delay
        self._clock = clock
        self._fs = fs or FileSystem()
        self._journal = Journal(
            self._root / JOURNAL_NAME, self._root, retention_seconds=retention_seconds
        )
        self._ledger = Ledger(self._journal, self._root, self._recycle)
        self._health = SpoolHealth(
            self._root, self._fs, max_bytes=max_bytes, min_free_fraction=min_free_fraction,
            track=self._track,
        )
        self._spares = SpareFiles(self._root / "spare", self._fs)
        self._batcher = DurableBatches(self._fs, self._ledger, duplicate_policy, self._clock)
        self._executor: ThreadPoolExecutor | None = None  # the journal thread
        self._durable: ThreadPoolExecutor | None = None  # the durability thread (ingest only)
        self._fsyncs: ThreadPoolExecutor | None = None  # overlaps the fsyncs of one batch
        self._ingest = False
        self._lock_fd = -1
        self._next_id = 1
        self._inflight_bytes = 0  # written only on the event loop
        self._writers: set[SpoolWriter] = set()
        self._commits: list[Commit] = []  # waiting for the durability thread
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
        self._spares.close()
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
        return self._ledger.locked(job)

    def _recover(self) -> RecoveryReport:
        """The journal thread, before ingest: see ``gateway.recovery``."""
        recovery = SpoolRecovery(self._root, self._journal, self._fs, self._clock)
        with self._ledger.lock:  # nothing else runs yet; taken anyway, as for every journal call
            recovery.make_directories()
            self._lock_fd = lock_spool(self._root)
            recovered = recovery.recover()
            self._next_id = recovered.next_id
            self._ledger.stored_bytes = recovered.stored_bytes
        self._expire(self._clock())  # instances finished before the restart: their files go now
        return recovered.report

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
            fd = self._spares.take(tmp_path)
            if fd < 0:  # none ready: create it here, as the spare-file job would
                fd = self._fs.open(str(tmp_path), TMP_FLAGS, 0o640)
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

    def _refill_spares(self) -> None:
        """Keep ``SPARE_FILES`` temp files created ahead, on an fsync thread (loop thread)."""
        if self._fsyncs is None or not self._spares.claim_refill():
            return
        self._fsyncs.submit(self._make_spares)

    def _recycle(self, path: Path) -> bool:
        """Any spool thread: a released object file becomes a spare while the spool ingests; it
        keeps its allocated blocks unless the disk is short of space."""
        if not self._ingest:
            return False
        keep = 0 if self._short_of_space() else RECYCLED_KEEP_BYTES
        return self._spares.recycle(path, keep)

    def _make_spares(self) -> None:
        """An fsync thread: see ``SpareFiles.refill``."""
        self._spares.refill(lambda: self._ingest)

    def _check_ingest(self) -> None:
        if not self._ingest:
            raise SpoolFull("the spool is not open for ingest (the gateway is starting or stopping)")
        self._health.check_failure()
        usage = self.usage()
        if usage.over_high_water:
            raise SpoolFull(
                f"spool {self._root} is over its high-water mark (used {usage.used_bytes} bytes of "
                f"spool_max_bytes {self._health.max_bytes}, {usage.free_bytes} bytes free on the "
                f"disk, spool_min_free_fraction {self._health.min_free_fraction}); check that the "
                "destinations are up and draining the queue, or give the spool more room"
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
        rel = object_path(writer._id)
        loop = asyncio.get_running_loop()
        item = new_instance(writer, rel, self._clock(), destinations, matched_rules)
        commit = Commit(item, writer._take_fd(), writer.tmp_path, self._root / rel,
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
        self._health.clear_failure()
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
        job = loop.run_in_executor(self._durable, self._batcher.run, batch, release, self._fsyncs)
        job.add_done_callback(partial(self._durable_done, loop, batch, release))

    def _abandon(self, commit: Commit) -> None:
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
        batch: list[Commit],
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

    def _discard(self, writer: SpoolWriter) -> None:
        """Close and delete an unfinished temp file (loop thread)."""
        self._writers.discard(writer)
        fd = writer._take_fd()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._inflight_bytes -= writer.size
        writer.size = 0
        unlink_quietly(writer.tmp_path)

    def _track(self, job: asyncio.Future[Any]) -> None:
        """Remember a background job until it is done (``close()`` waits for it)."""
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    # -- usage and failures (see gateway.spool_health) ----------------------------------------

    def usage(self) -> SpoolUsage:
        """Cheap and synchronous: bytes tracked in memory, statvfs re-read at most every
        ``recheck_seconds``. After a write failure it starts a background ``probe()`` at most that
        often, so readiness comes back when the disk does, even with no traffic."""
        return self._health.usage(self._ledger.stored_bytes + self._inflight_bytes, self._ingest)

    def _short_of_space(self) -> bool:
        return self._health.short_of_space(self._ledger.stored_bytes + self._inflight_bytes)

    async def probe(self) -> bool:
        """Does the disk take writes again? Creates, writes, fsyncs and deletes ``tmp/probe.part``
        (off the event loop); a success clears the remembered failure."""
        if not self._ingest:
            return False
        return await self._health.probe()

    def _failed(self, exc: OSError, doing: str) -> SpoolFull:
        return self._health.failed(exc, doing)

    def _journal_error(self, exc: BaseException | None, doing: str) -> SpoolFull:
        return self._health.journal_error(exc, doing)

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
        with self._ledger.lock:
            due = self._journal.record_attempts(records)
        if due and at_once:
            try:
                self._expire(self._clock())
            except (sqlite3.Error, OSError) as exc:  # the attempts are recorded: only the release
                log.warning("spool: releasing delivered files failed, retried later: %s", exc)
                return due  # failed, so the loop asks for it again
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
        return self._ledger.expire(now)

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
        return await self._call(partial(self._ledger.release, purge), "purging dead letters")

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
        """Delete delivered files whose retention ran out, cut the spare files to zero, forget old
        finished rows, and re-read the used bytes from the journal. Call it periodically (e.g.
        every minute)."""
        return await self._call(partial(self._sweep, self._clock()), "sweeping retention")

    def _sweep(self, now: float) -> int:
        swept = self._expire(now)
        self._spares.trim()  # what recycled spares kept of delivered objects goes now
        while self._locked(
            partial(self._journal.prune, now - max(self._history, self._retention), SWEEP_CHUNK)
        ):
            pass
        with self._ledger.lock:
            self._ledger.stored_bytes = self._journal.stored_bytes()
        return swept
