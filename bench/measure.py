"""Watching files land, without polling: Linux inotify through ctypes.

``Landing`` watches destination folders (a storescp output directory) and wakes when a file there
is closed after writing (``IN_CLOSE_WRITE``) or renamed into it (``IN_MOVED_TO``). The time a
file landed is the moment its event is read: the runner sleeps in ``select`` meanwhile, so it
costs the servers nothing and misses nothing. Every wait has a deadline.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from bench.servers import BenchError

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (the name follows)


class Landing:
    """Counts distinct files landed in each watched directory."""

    def __init__(self, directories: Sequence[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise BenchError(f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}")
        self._landed: dict[int, set[bytes]] = {}
        self.directories = list(directories)
        for directory in self.directories:
            wd = libc.inotify_add_watch(self._fd, os.fsencode(directory), IN_CLOSE_WRITE | IN_MOVED_TO)
            if wd < 0:
                os.close(self._fd)
                raise BenchError(f"cannot watch {directory}: {os.strerror(ctypes.get_errno())}")
            self._landed[wd] = set()
        self.last_landed = 0.0

    def counts(self) -> list[int]:
        return [len(names) for names in self._landed.values()]

    def wait(self, count: int, timeout: float) -> float:
        """Block until every directory has ``count`` files; returns ``perf_counter()`` of the last."""
        deadline = time.monotonic() + timeout
        while min(self.counts()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"only {self.counts()} of {count} files landed in "
                                 f"{[str(d) for d in self.directories]} within {timeout:.0f} s")
            readable, _, _ = select.select([self._fd], [], [], min(remaining, 1.0))
            if readable:
                self._read()
        return self.last_landed

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return
        now = time.perf_counter()
        offset = 0
        while offset < len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                raise BenchError("inotify queue overflowed: raise fs.inotify.max_queued_events")
            if wd in self._landed and name and name not in self._landed[wd]:
                self._landed[wd].add(name)
                self.last_landed = now

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Landing:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
