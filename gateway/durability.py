"""The durability thread's work on one batch of commits: fsync every file (cut to its object's size
first: a recycled spare may be longer), rename each into ``objects/``, fsync each touched shard
directory once, then one journal transaction for every row (``synchronous=FULL``). The crash-safety
argument is in ``docs/spool.md``.

Invariants: a commit is resolved (``inserted`` or ``error`` set) by the batch, never both; a failing
object fails alone and leaves no file behind; a commit cancelled before the journal transaction is
dropped with its file; files released by the transaction are deleted only after it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

from gateway.journal import EXPIRE_CHUNK, Inserted, NewInstance
from gateway.spool_files import FileSystem, fsync_directory, unlink_quietly
from gateway.spool_ledger import Ledger

__all__ = ["Commit", "DurableBatches"]

T = TypeVar("T")


class Commit:
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


class DurableBatches:
    """Makes batches of commits durable (the durability thread; ``fsyncs`` overlaps their fsyncs)."""

    def __init__(
        self,
        fs: FileSystem,
        ledger: Ledger,
        policy: Literal["forward", "ignore"],
        clock: Callable[[], float],
    ) -> None:
        self._fs = fs
        self._ledger = ledger
        self._policy: Literal["forward", "ignore"] = policy
        self._clock = clock

    def run(self, batch: list[Commit], release: bool, fsyncs: ThreadPoolExecutor | None) -> bool:
        """A failing object fails alone; the others go on. ``release``: also release the files of
        finished instances in the journal transaction. Returns whether that was done."""
        try:
            live = self._sync_files(batch, fsyncs)
            live = self._sync_directories(self._rename(live), fsyncs)
            live = [commit for commit in live if not _dropped(commit, commit.final)]
            return self._journal_rows(live, release, fsyncs) if live else False
        except BaseException as exc:  # a bug: fail what is unfinished, leave nothing behind
            for commit in batch:
                if commit.inserted is None and commit.error is None:
                    commit.fail(exc, "making the object durable")
                    for path in (commit.tmp, commit.final):
                        with contextlib.suppress(OSError):
                            os.unlink(path)
            raise

    def _sync_files(self, batch: list[Commit], fsyncs: ThreadPoolExecutor | None) -> list[Commit]:
        files = [(commit.fd, commit.item.size) for commit in batch]
        for commit in batch:
            commit.fd = -1
        live: list[Commit] = []
        for commit, error in zip(batch, _each(self._sync_file, files, fsyncs), strict=True):
            if error is not None:
                commit.fail(error, "making the object durable (fsync)")
                unlink_quietly(commit.tmp)
            elif not _dropped(commit, commit.tmp):
                live.append(commit)
        return live

    def _sync_file(self, file: tuple[int, int]) -> None:
        """fsync one object's file, first cutting what a recycled spare held beyond the object."""
        fd, size = file
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
            self._fs.fsync(fd)
        finally:
            os.close(fd)

    def _rename(self, batch: list[Commit]) -> list[Commit]:
        live: list[Commit] = []
        for commit in batch:
            try:
                self._fs.replace(str(commit.tmp), str(commit.final))
            except OSError as exc:
                commit.fail(exc, "making the object durable (rename)")
                unlink_quietly(commit.tmp)
            else:
                live.append(commit)
        return live

    def _sync_directories(
        self, batch: list[Commit], fsyncs: ThreadPoolExecutor | None
    ) -> list[Commit]:
        directories = list(dict.fromkeys(commit.final.parent for commit in batch))
        errors = dict(zip(directories, _each(self._fsync_dir, directories, fsyncs), strict=True))
        live: list[Commit] = []
        for commit in batch:
            error = errors[commit.final.parent]
            if error is not None:
                commit.fail(error, "making the object durable (fsync of its directory)")
                unlink_quietly(commit.final)
            else:
                live.append(commit)
        return live

    def _fsync_dir(self, directory: Path) -> None:
        fsync_directory(self._fs, directory)

    def _journal_rows(
        self, batch: list[Commit], release: bool, fsyncs: ThreadPoolExecutor | None
    ) -> bool:
        now = self._clock()
        ledger = self._ledger
        try:
            with ledger.lock:
                inserted, released = ledger.journal.insert_batch(
                    [commit.item for commit in batch], self._policy,
                    expire_before=now if release else None,
                )
                ledger.stored_bytes += sum(
                    commit.item.size for commit, result in zip(batch, inserted, strict=True)
                    if result.stored
                ) - sum(ref.size for ref in released)
        except Exception as exc:  # SQLite (or the disk under it): every row of the batch fails
            for commit in batch:
                commit.fail(exc, "saving the journal row")
                unlink_quietly(commit.final)
            return False
        for commit, result in zip(batch, inserted, strict=True):
            commit.inserted = result
            if not result.stored:  # an ignored duplicate: the first copy is kept
                unlink_quietly(commit.final)
        if released and fsyncs is not None:  # deleting frees blocks: not while commits wait
            fsyncs.submit(ledger.unlink, released)
        elif released:
            ledger.unlink(released)
        return release and len(released) < EXPIRE_CHUNK  # a full chunk: more may be due


def _each(
    job: Callable[[T], object], args: Sequence[T], fsyncs: ThreadPoolExecutor | None
) -> list[OSError | None]:
    """Run ``job`` on every argument (overlapping on the fsync threads when there are several);
    the OSError each one raised, or None."""

    def run(arg: T) -> OSError | None:
        try:
            job(arg)
        except OSError as exc:
            return exc
        return None

    if len(args) < 2 or fsyncs is None:
        return [run(arg) for arg in args]
    return list(fsyncs.map(run, args))


def _dropped(commit: Commit, path: Path) -> bool:
    """A commit cancelled before its journal transaction is dropped (its file removed)."""
    if commit.cancelled:
        unlink_quietly(path)
    return commit.cancelled
