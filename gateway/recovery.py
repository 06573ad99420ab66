"""Start-up of a spool: take its lock, sweep what was never acknowledged, reconcile files and rows.

Invariants (the argument is in ``docs/spool.md``): one gateway process per spool (``flock`` on
``spool.lock``); a temp or spare file was never acknowledged and is deleted; an object file without a
journal row was never acknowledged and is deleted; a journal row without its file is marked lost and
logged (it should never happen); entries the spool did not name are left alone. Runs on the journal
thread, holding the journal lock, before ingest is allowed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import SpoolFull
from gateway.journal import ExpectedFile, Journal
from gateway.spool_files import (
    LOCK_NAME,
    FileSystem,
    empty_directory,
    fsync_directory,
    object_path,
)

__all__ = ["Recovered", "RecoveryReport", "SpoolRecovery", "lock_spool"]

log = logging.getLogger("gateway.spool")  # one logger for every spool module

_OBJECT_NAME = re.compile(r"^([0-9a-f]{16})\.dcm$")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    swept_temp_files: int  # partial receptions (never acknowledged), deleted
    orphan_files: int  # object files without a live journal row (never acknowledged), deleted
    lost_instances: int  # journal rows whose file was missing: should always be 0
    foreign_files: int  # files in objects/ the spool did not name; left alone
    pending_deliveries: int
    held_instances: int


@dataclass(frozen=True, slots=True)
class Recovered:
    report: RecoveryReport
    next_id: int  # the id the next object gets
    stored_bytes: int  # SUM(size) of the journal rows with a file


def lock_spool(root: Path) -> int:
    """Take the spool's lock (non-blocking); the fd that holds it."""
    fd = os.open(root / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolFull(
            f"spool {root} is in use by another gateway process; stop it, or give this "
            "one its own spool_dir"
        ) from None
    return fd


class SpoolRecovery:
    """One start-up pass over the spool under ``root`` (the caller holds the journal lock)."""

    def __init__(
        self, root: Path, journal: Journal, fs: FileSystem, clock: Callable[[], float]
    ) -> None:
        self._root = root
        self._objects = root / "objects"
        self._tmp = root / "tmp"
        self._spare = root / "spare"
        self._journal = journal
        self._fs = fs
        self._clock = clock

    def make_directories(self) -> None:
        for directory in (self._root, self._objects, self._tmp, self._spare):
            directory.mkdir(parents=True, exist_ok=True)
        for shard in range(256):
            (self._objects / f"{shard:02x}").mkdir(exist_ok=True)

    def recover(self) -> Recovered:
        """After ``make_directories()`` and ``lock_spool()``: sweep, reconcile, count."""
        for directory in (self._root, self._objects, self._tmp):
            fsync_directory(self._fs, directory)
        self._journal.open(create=True)
        empty_directory(self._spare)  # spare files are empty and were never used
        swept = empty_directory(self._tmp)
        if swept:
            log.warning("spool: removed %d partial reception(s) from %s", swept, self._tmp)
        orphans, foreign, top, missing = self._reconcile()
        for item in missing:
            log.error(
                "spool: journal row %d (SOP Instance UID %r, state %s) has no file %s: marked lost",
                item.id, item.sop_instance_uid, item.state, item.path,
            )
        lost = self._journal.mark_missing(missing, self._clock())
        next_id = max(self._journal.max_id(), top) + 1
        stored_bytes = self._journal.stored_bytes()
        report = RecoveryReport(
            swept, orphans, lost, foreign, self._journal.pending_count(), self._journal.held_count()
        )
        return Recovered(report, next_id, stored_bytes)

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
            if index < len(ids) and ids[index] == row.id and row.path == object_path(row.id):
                seen[shard][index] = 1
            else:
                missing.append(row)
        for ids, found in zip(shards, seen, strict=True):
            for index, ident in enumerate(ids):
                if not found[index]:
                    _remove_orphan(str(self._root / object_path(ident)))
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
                    _remove_orphan(entry.path)
                    orphans += 1
            if found:
                shards[found[0] & 0xFF] = array("q", sorted(found))
        return shards, orphans, foreign, top


def _remove_orphan(path: str) -> None:
    log.warning("spool: object file %s has no journal row (never acknowledged): removed", path)
    os.unlink(path)
