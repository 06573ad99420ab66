"""One object being received into the spool, what it is, and what it became.

``SpoolWriter`` writes on the event loop (page-cache writes are cheap) and never raises while
writing: an OSError is recorded and ``commit()`` reports it. ``commit()`` returns only once the object
is durable and journaled (see ``gateway.spool`` and ``docs/spool.md``); ``abort()`` deletes the temp
file. A writer is finished once committed or aborted: it never writes again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import SpoolFull
from gateway.journal import NewInstance

if TYPE_CHECKING:
    from gateway.spool import Spool

__all__ = ["PREFIX_BYTES", "InstanceMeta", "SpoolWriter", "StoredInstance", "new_instance"]

PREFIX_BYTES = 64 * 1024
WRITEBACK_BYTES = 256 * 1024  # start writing to disk every this many bytes (see start_writeback)


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
        self._written_back = 0  # bytes whose writeback was started
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
        if self.size - self._written_back >= WRITEBACK_BYTES and self._error is None:
            fs.start_writeback(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

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


def new_instance(
    writer: SpoolWriter,
    rel: str,
    now: float,
    destinations: tuple[str, ...],
    matched_rules: tuple[str, ...],
) -> NewInstance:
    """The journal row of a received object (stored at ``rel``, relative to the spool)."""
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
