"""The journal behind one lock, and the bytes the spool holds in object files.

Invariants: every journal call, from whichever thread (journal, durability), is made holding ``lock``,
one at a time, on the one SQLite connection; ``stored_bytes`` (SUM(size) of the rows with a file) is
written only holding ``lock``; a released file is deleted only after the transaction that released it
committed durably (see "Durability of journal transactions" in ``docs/spool.md``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from gateway.journal import FileRef, Journal

__all__ = ["SWEEP_CHUNK", "Ledger"]

log = logging.getLogger("gateway.spool")  # one logger for every spool module
T = TypeVar("T")

SWEEP_CHUNK = 500  # rows per expiry or prune transaction


class Ledger:
    """The spool's journal, its lock and its byte count (shared by the spool's threads)."""

    def __init__(self, journal: Journal, root: Path,
                 recycle: Callable[[Path], bool] | None = None) -> None:
        self.journal = journal
        self._recycle = recycle  # turns a released file into a spare instead (True: it did)
        self.lock = threading.Lock()  # one journal call at a time, whichever thread makes it
        self.stored_bytes = 0  # SUM(size) of rows with a file: written only holding the lock
        self._root = root

    def locked(self, job: Callable[[], T]) -> T:
        with self.lock:
            return job()

    def expire(self, now: float) -> int:
        """Release (durably) and delete the files of finished instances that expired by ``now``."""
        released = 0
        while count := self.release(lambda: _both(self.journal.expire_files(now, SWEEP_CHUNK))):
            released += count
        return released

    def release(self, job: Callable[[], tuple[int, Sequence[FileRef]]]) -> int:
        """Run a journal ``job`` that releases files in a durable transaction (holding the lock),
        take their bytes off ``stored_bytes``, then delete them; returns the job's count."""
        with self.lock:
            count, refs = job()
            self.stored_bytes -= sum(ref.size for ref in refs)
        self.unlink(refs)
        return count

    def unlink(self, refs: Sequence[FileRef]) -> None:
        """Delete files a committed, durable transaction released (outside the lock)."""
        for ref in refs:
            path = self._root / ref.path
            if self._recycle is not None and self._recycle(path):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("spool: cannot delete %s (%s); removed at next start", ref.path, exc)


def _both(refs: Sequence[FileRef]) -> tuple[int, Sequence[FileRef]]:
    return len(refs), refs
