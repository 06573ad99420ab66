"""The spool's files: the file-system seam, where an object lives, and the spare temp files.

Invariants (the argument is in ``docs/spool.md``): every name is the spool's own (from a counter,
never from anything a peer sent); temp files are created ``O_CREAT|O_EXCL``, mode 0640; a spare file
holds no object and no journal row refers to it (created empty, or an object file a durable
transaction released, renamed into ``spare/`` and cut to at most ``RECYCLED_KEEP_BYTES``, which the next
object overwrites; its commit cuts what it did not overwrite, and the retention sweep cuts every
spare to zero), so recovery deletes whatever ``spare/`` holds.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "JOURNAL_NAME",
    "LOCK_NAME",
    "RECYCLED_KEEP_BYTES",
    "SPARE_FILES",
    "TMP_FLAGS",
    "FileSystem",
    "SpareFiles",
    "empty_directory",
    "fsync_directory",
    "object_path",
    "unlink_quietly",
]

log = logging.getLogger("gateway.spool")  # one logger for every spool module

JOURNAL_NAME = "journal.sqlite3"
LOCK_NAME = "spool.lock"
SPARE_FILES = 4  # empty temp files created ahead of begin(), off the event loop
RECYCLED_FILES = 32  # at most this many spare files, counting released object files recycled
# A recycled spare keeps the disk blocks of its first 2 MiB (a 0.9 MB ultrasound image, a CT or MR
# slice): the next object overwrites blocks that are already allocated, so its fsync writes no
# allocation metadata (0.19 instead of 0.30 ms for 0.9 MB here) and nothing is freed (with the
# ``discard`` mount option freeing blocks costs a TRIM). At most 32 x 2 MiB stay reserved.
RECYCLED_KEEP_BYTES = 2 << 20
TMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Python has no binding), or None off Linux. ``CDLL(None)`` is the
    process's own symbol table, libc included (glibc or musl), without searching for a library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


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

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk now, without
        waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): by the time the object's last
        fragment arrives most of it is on disk, so the fsync before Success waits for the tail
        only. A hint: it never raises, and it is a no-op where the call does not exist."""
        if _sync_file_range is not None:
            _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def statvfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(path)


class SpareFiles:
    """Empty temp files ready for ``begin()``: taking one is a rename, far cheaper than a create
    (on ext4 without a journal a create can cost 0.2-0.8 ms of CPU). They are created ahead on an
    fsync thread, or recycled from object files that were delivered and released: a rename and a
    truncate instead of an unlink now and a create later, so a spool that forwards as fast as it
    receives allocates no inodes at all."""

    def __init__(self, directory: Path, fs: FileSystem) -> None:
        self._directory = directory
        self._fs = fs
        self._ready: collections.deque[tuple[int, str]] = collections.deque()  # (fd, path)
        self._refilling = False  # a spare-file job is queued or running
        self._names = itertools.count(1)  # names spare files (any thread: next() is atomic)
        self._closing = threading.Lock()  # recycle() against close()
        self._closed = False

    def take(self, tmp_path: Path) -> int:
        """A spare file renamed to ``tmp_path``, or -1 when none is ready (loop thread)."""
        try:
            fd, path = self._ready.popleft()
        except IndexError:
            return -1
        try:
            self._fs.replace(path, str(tmp_path))
        except OSError:
            os.close(fd)
            unlink_quietly(Path(path))
            raise
        return fd

    def claim_refill(self) -> bool:
        """Whether a refill job should start now; if so it counts as started (loop thread)."""
        if self._refilling or len(self._ready) > SPARE_FILES // 2:
            return False
        self._refilling = True
        return True

    def refill(self, keep_going: Callable[[], bool]) -> None:
        """An fsync thread. A failure is left for the next ``begin()`` to meet and report."""
        try:
            while keep_going() and len(self._ready) < SPARE_FILES:
                path = self._name()
                self._ready.append((self._fs.open(path, TMP_FLAGS, 0o640), path))
        except OSError as exc:
            log.debug("spool: cannot create a spare temp file: %s", exc)
        finally:
            self._refilling = False

    def recycle(self, path: Path, keep: int) -> bool:
        """Make the released object file ``path`` a spare (an fsync or journal thread), cut to at
        most ``keep`` bytes; False when there are enough spares or it failed, and the caller
        deletes it as before. The bytes kept are the delivered object's: whoever takes the spare
        writes from offset 0 over them and cuts the rest before its fsync."""
        if len(self._ready) >= RECYCLED_FILES:
            return False
        spare = self._name()
        try:
            self._fs.replace(str(path), spare)
        except OSError:
            return False
        try:
            fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            unlink_quietly(Path(spare))
            return True
        try:
            if os.fstat(fd).st_size > keep:
                os.ftruncate(fd, keep)
        except OSError:
            os.close(fd)
            unlink_quietly(Path(spare))
            return True
        self._put_back(fd, spare)
        return True

    def trim(self) -> None:
        """Cut every ready spare to zero (any thread but the loop's), so the bytes a recycled spare
        kept of a delivered object stay on disk only until the next sweep. Each spare is taken off
        the queue while it is cut, so ``take()`` never hands out one being cut."""
        for _ in range(len(self._ready)):
            try:
                fd, path = self._ready.popleft()
            except IndexError:
                return
            try:
                os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                unlink_quietly(Path(path))
                continue
            self._put_back(fd, path)

    def _put_back(self, fd: int, path: str) -> None:
        with self._closing:
            if not self._closed:
                self._ready.append((fd, path))
                return
        os.close(fd)
        unlink_quietly(Path(path))

    def _name(self) -> str:
        return str(self._directory / f"{next(self._names):016x}.part")

    def close(self) -> None:
        """Close and delete the spares not taken (no refill job runs any more)."""
        with self._closing:
            self._closed = True
        while self._ready:
            fd, path = self._ready.popleft()
            with contextlib.suppress(OSError):
                os.close(fd)
            unlink_quietly(Path(path))


def object_path(ident: int) -> str:
    """Where object ``ident`` lives, relative to the spool (the shard is the id's low byte)."""
    return f"objects/{ident & 0xFF:02x}/{ident:016x}.dcm"


def fsync_directory(fs: FileSystem, directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fs.fsync(fd)
    finally:
        os.close(fd)


def empty_directory(directory: Path) -> int:
    """Delete the files (and symlinks) in ``directory``; how many there were."""
    removed = 0
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            os.unlink(entry.path)
            removed += 1
    return removed


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)

