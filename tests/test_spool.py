"""The durable spool on tmp_path: round trips, high-water marks, injected disk failures, recovery
(including a real kill -9), the forwarding-side journal API, and a second process on the same spool."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import shutil
import sqlite3
import struct
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway import spool_files
from gateway.errors import SpoolFull
from gateway.journal import (
    LOST_ERROR,
    AttemptRecord,
    Delivery,
    FileRef,
    Inserted,
    NewInstance,
)
from gateway.part10 import encode_file_meta
from gateway.spool import (
    RECYCLED_KEEP_BYTES,
    SPARE_FILES,
    FileSystem,
    InstanceMeta,
    Spool,
    SpoolWriter,
    StoredInstance,
)
from gateway.spool_writer import WRITEBACK_BYTES

REPO = Path(__file__).resolve().parents[1]
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
OBJECT_PATH = re.compile(r"^objects/[0-9a-f]{2}/[0-9a-f]{16}\.dcm$")
T0 = 1_700_000_000.0
TIMEOUT = 20.0
T = TypeVar("T")


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeFS(FileSystem):
    """The real file system, with failures and a statvfs answer on demand."""

    recheck_seconds = 0.0

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}  # operation -> errno raised while set
        self.let_through: dict[str, int] = {}  # operation -> calls to allow before failing
        self.free_fraction: float | None = None
        self.max_write: int | None = None
        self.block_fsync: tuple[threading.Event, Callable[[], object]] | None = None
        self.failing_files: set[Path] = set()  # fsync of these files raises EIO
        self.synced: list[Path] = []  # every file and directory fsync'd, in order
        self.opened: list[Path] = []  # every file created, in order
        self.writebacks: list[tuple[int, int]] = []  # (offset, length) of every start_writeback

    def _check(self, operation: str) -> None:
        code = self.errors.get(operation)
        if code is None:
            return
        if self.let_through.get(operation, 0) > 0:
            self.let_through[operation] -= 1
            return
        raise OSError(code, os.strerror(code))

    def open(self, path: str, flags: int, mode: int) -> int:
        self._check("open")
        self.opened.append(Path(path))
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._check("write")
        if self.max_write is not None:
            data = memoryview(data)[: self.max_write]
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._check("fsync")
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if self.block_fsync is not None:
            (gate, entered), self.block_fsync = self.block_fsync, None
            entered()
            gate.wait(TIMEOUT)
        if path in self.failing_files:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.synced.append(path)
        super().fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        self._check("replace")
        super().replace(src, dst)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        self.writebacks.append((offset, length))
        super().start_writeback(fd, offset, length)

    def statvfs(self, path: str) -> os.statvfs_result:
        if self.free_fraction is None:
            return super().statvfs(path)
        blocks = 1_000_000
        free = int(blocks * self.free_fraction)
        return os.statvfs_result((4096, 4096, blocks, free, free, 1000, 1000, 1000, 0, 255))


def meta(uid: str = "1.2.3.4", *, calling: str = "MODALITY", syntax: str = IMPLICIT_LE) -> InstanceMeta:
    return InstanceMeta(CT, uid, syntax, calling, "GATEWAY", "192.0.2.7")


def dataset_bytes(uid: str = "1.2.3.4", pixels: int = 4096) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.add_new(0x00091010, "OB", bytes(range(256)) * (pixels // 256))
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return fp.getvalue()


async def store(
    spool: Spool,
    uid: str = "1.2.3.4",
    destinations: Sequence[str] = ("PACS_A",),
    *,
    data: bytes | None = None,
    chunk: int = 1000,
) -> StoredInstance:
    body = dataset_bytes(uid) if data is None else data
    writer = spool.begin(meta(uid))
    for start in range(0, len(body), chunk):
        writer.write(memoryview(body)[start : start + chunk])
    return await writer.commit(destinations, ["rule-1"] if destinations else [])


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def journal_rows(root: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(root / "journal.sqlite3") as db:
        return db.execute(sql, args).fetchall()


@pytest.fixture
def fs() -> FakeFS:
    return FakeFS()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_spool(
    tmp_path: Path, fs: FakeFS, clock: Clock
) -> AsyncIterator[Callable[..., Spool]]:
    opened: list[Spool] = []

    def factory(**kwargs: object) -> Spool:
        spool = Spool(tmp_path / "spool", fs=fs, clock=clock, **kwargs)  # type: ignore[arg-type]
        opened.append(spool)
        return spool

    yield factory
    for spool in opened:
        await spool.close()


@pytest.fixture
async def spool(make_spool: Callable[..., Spool]) -> Spool:
    s = make_spool()
    await s.open()
    return s


# -- ingest --------------------------------------------------------------------------------


async def test_round_trip_writes_a_part10_file_and_journals_one_delivery_per_destination(
    spool: Spool,
) -> None:
    body = dataset_bytes("1.2.3.4")

    stored = await store(spool, "1.2.3.4", ["PACS_A", "PACS_B"], data=body)

    assert OBJECT_PATH.match(stored.path.relative_to(spool.root).as_posix())
    assert stored.path.stat().st_mode & 0o777 == 0o640
    assert not stored.duplicate and not stored.held
    raw = stored.path.read_bytes()
    assert stored.size == len(raw)
    assert raw[stored.dataset_offset :] == body
    assert stored.dataset_offset == len(encode_file_meta(CT, "1.2.3.4", IMPLICIT_LE, "MODALITY"))
    read = pydicom.dcmread(stored.path)
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert read.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert read.PatientName == "Doe^Jane"
    row = journal_rows(
        spool.root,
        "SELECT sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, called_ae, source_ip,"
        " size, dataset_offset, path, received_at, state, duplicate, matched_rules FROM instances",
    )
    assert row == [
        ("1.2.3.4", CT, IMPLICIT_LE, "MODALITY", "GATEWAY", "192.0.2.7", stored.size,
         stored.dataset_offset, stored.path.relative_to(spool.root).as_posix(), T0, "routed", 0,
         '["rule-1"]'),
    ]
    for destination in ("PACS_A", "PACS_B"):
        (delivery,) = await spool.pending(destination, 0, 10, T0)
        assert (delivery.instance_id, delivery.path, delivery.attempts) == (stored.id, stored.path, 0)
        assert delivery.dataset_offset == stored.dataset_offset
    assert await spool.held_count() == 0
    assert spool.usage().used_bytes == stored.size
    assert files_under(spool.root / "tmp") == []


async def test_an_object_without_destinations_is_held(spool: Spool) -> None:
    stored = await store(spool, "1.2.3.9", [])

    assert stored.held
    assert await spool.held_count() == 1
    assert await spool.counts() == {}
    (held,) = await spool.held_items(10)
    assert (held.id, held.path, held.calling_ae, held.called_ae, held.source_ip) == (
        stored.id, stored.path, "MODALITY", "GATEWAY", "192.0.2.7",
    )
    (item,) = await spool.list_items(destination=None, dead=False, held=True, limit=10)
    assert (item.instance_id, item.state, item.destination) == (stored.id, "held", None)


async def test_prefix_keeps_the_first_64_kib_and_short_writes_are_completed(
    spool: Spool, fs: FakeFS
) -> None:
    fs.max_write = 777
    body = dataset_bytes("1.2.3.5", pixels=100_000)
    writer = spool.begin(meta("1.2.3.5"))
    for start in range(0, len(body), 10_000):
        writer.write(body[start : start + 10_000])

    assert writer.prefix == body[: 64 * 1024]
    stored = await writer.commit(["PACS_A"], [])
    assert stored.path.read_bytes()[stored.dataset_offset :] == body


async def test_temp_files_are_created_ahead_off_the_event_loop(spool: Spool, fs: FakeFS) -> None:
    loop = asyncio.get_running_loop()
    refilled = asyncio.Event()
    real_make = spool._make_spares

    def make_spares() -> None:
        real_make()
        loop.call_soon_threadsafe(refilled.set)

    spool._make_spares = make_spares  # type: ignore[method-assign]
    first = await store(spool, "1.2.3.1")  # no spare yet: created in begin(), then the refill
    async with asyncio.timeout(TIMEOUT):
        await refilled.wait()
    spares = files_under(spool.root / "spare")
    assert len(spares) == SPARE_FILES and files_under(spool.root / "tmp") == []
    assert fs.opened == [spool.root / "tmp" / f"{first.id:016x}.part", *spares]

    writer = spool.begin(meta("1.2.3.2"))  # takes a spare: a rename, no file created

    assert files_under(spool.root / "tmp") == [writer.tmp_path]
    assert spares[0] not in files_under(spool.root / "spare")
    writer.write(dataset_bytes("1.2.3.2"))
    stored = await writer.commit(["PACS_A"], [])
    assert stored.path.read_bytes()[stored.dataset_offset :] == dataset_bytes("1.2.3.2")
    await spool.close()
    assert files_under(spool.root / "spare") == []  # closing removes the spares


async def test_writeback_starts_while_receiving_in_contiguous_steps(
    spool: Spool, fs: FakeFS
) -> None:
    body = dataset_bytes("1.2.3.1", pixels=1 << 20)
    stored = await store(spool, "1.2.3.1", data=body, chunk=1000)

    offsets = [offset for offset, _ in fs.writebacks]
    assert offsets[0] == 0 and len(fs.writebacks) >= 3
    assert all(WRITEBACK_BYTES <= length < WRITEBACK_BYTES + 1000 for _, length in fs.writebacks)
    assert stored.size - sum(fs.writebacks[-1]) < WRITEBACK_BYTES  # all but the tail started
    assert all(o + n == after for (o, n), after in zip(fs.writebacks, offsets[1:], strict=False))
    assert stored.path.read_bytes()[stored.dataset_offset:] == body


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux only")
def test_sync_file_range_is_bound_and_accepts_a_real_file(tmp_path: Path) -> None:
    assert spool_files._sync_file_range is not None
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x" * 8192)
        assert spool_files._sync_file_range(fd, 0, 8192, 2) == 0
    finally:
        os.close(fd)


async def test_a_released_file_becomes_a_spare_that_a_later_object_overwrites(
    make_spool: Callable[..., Spool], fs: FakeFS
) -> None:
    spool = make_spool(release_delay=3600.0)
    await spool.open()
    loop = asyncio.get_running_loop()
    recycled = asyncio.Event()
    real_recycle = spool._spares.recycle

    def recycle(path: Path, keep: int) -> bool:
        done = real_recycle(path, keep)
        loop.call_soon_threadsafe(recycled.set)
        return done

    spool._spares.recycle = recycle  # type: ignore[method-assign]
    first = await store(spool, "1.2.3.1", data=dataset_bytes("1.2.3.1", pixels=1 << 16))
    inode = first.path.stat().st_ino
    await spool.record_attempt(first.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    await store(spool, "1.2.3.2")  # its FULL transaction releases the first file
    async with asyncio.timeout(TIMEOUT):
        await recycled.wait()

    assert not first.path.exists()
    (spare,) = [p for p in files_under(spool.root / "spare") if p.stat().st_ino == inode]
    assert spare.stat().st_size == first.size <= RECYCLED_KEEP_BYTES  # its blocks are kept
    for i in range(SPARE_FILES + 1):  # the spares queue in order: the recycled one comes up
        small = dataset_bytes(f"1.2.4.{i}")
        stored = await store(spool, f"1.2.4.{i}", data=small)
        assert stored.path.read_bytes()[stored.dataset_offset:] == small
        if stored.path.stat().st_ino == inode:
            break
    else:
        raise AssertionError("the recycled file was never used")
    # the commit cut what the smaller object did not overwrite: nothing of the first one is left
    assert stored.path.stat().st_size == stored.size < first.size


async def deliver_and_recycle(
    spool: Spool, before_delivery: Callable[[], object] = lambda: None
) -> tuple[StoredInstance, Path]:
    """Store one object, record it delivered (``release_delay`` 0: released and recycled before
    ``record_attempt()`` returns); the object and the spare its file became."""
    await spool.open()
    first = await store(spool, "1.2.3.1", data=dataset_bytes("1.2.3.1", pixels=1 << 16))
    inode = first.path.stat().st_ino
    before_delivery()
    await spool.record_attempt(first.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    assert not first.path.exists()
    (spare,) = [p for p in files_under(spool.root / "spare") if p.stat().st_ino == inode]
    return first, spare


async def test_the_retention_sweep_cuts_what_recycled_spares_kept(
    make_spool: Callable[..., Spool]
) -> None:
    spool = make_spool(release_delay=0.0)
    first, spare = await deliver_and_recycle(spool)
    assert spare.stat().st_size == first.size  # the delivered object's bytes, kept for reuse

    await spool.sweep_retention()

    assert spare.stat().st_size == 0
    for i in range(SPARE_FILES + 1):  # a cut spare still takes the next objects
        small = dataset_bytes(f"1.2.4.{i}")
        stored = await store(spool, f"1.2.4.{i}", data=small)
        assert stored.path.read_bytes()[stored.dataset_offset:] == small
    assert files_under(spool.root / "tmp") == []


async def test_a_spare_recycled_while_short_of_space_keeps_no_blocks(
    make_spool: Callable[..., Spool], fs: FakeFS
) -> None:
    def short_of_space() -> None:
        fs.free_fraction = 0.01  # below spool_min_free_fraction: space is wanted

    _, spare = await deliver_and_recycle(make_spool(release_delay=0.0), short_of_space)
    assert spare.stat().st_size == 0


async def test_abort_leaves_nothing_behind(spool: Spool) -> None:
    writer = spool.begin(meta())
    writer.write(b"\x08\x00" * 1000)
    assert files_under(spool.root / "tmp") == [writer.tmp_path]

    writer.abort()

    assert files_under(spool.root / "tmp") == []
    assert files_under(spool.root / "objects") == []
    assert spool.usage().used_bytes == 0
    with pytest.raises(SpoolFull):
        await writer.commit(["PACS_A"], [])


async def test_hostile_uids_never_become_paths(spool: Spool) -> None:
    for uid in ("../../x", "/etc/x", "1.2\x00.3", "7" * 200, "\udcff../evil"):
        stored = await store(spool, uid, ["PACS_A"], data=b"\x08\x00\x18\x00\x00\x00\x00\x00")
        assert stored.path.parent.parent == spool.root / "objects"
        assert OBJECT_PATH.match(stored.path.relative_to(spool.root).as_posix())
    uids = [i.sop_instance_uid for i in await spool.list_items(destination="PACS_A", dead=False,
                                                               held=False, limit=10)]
    assert uids == ["../../x", "/etc/x", "1.2\x00.3", "7" * 200, "\\udcff../evil"]
    assert {p.parent.parent.parent for p in files_under(spool.root / "objects")} == {spool.root}


def block_next_fsync(fs: FakeFS) -> tuple[threading.Event, asyncio.Event]:
    loop = asyncio.get_running_loop()
    gate, entered = threading.Event(), asyncio.Event()
    fs.block_fsync = (gate, lambda: loop.call_soon_threadsafe(entered.set))
    return gate, entered


class Arrivals:
    """Wraps coroutines run as tasks; ``all_in`` is set when the last of ``expected`` starts.
    Each runs on to its first real suspension (queued in the spool, awaiting its batch) before a
    task waiting on ``all_in`` resumes."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.started = 0
        self.all_in = asyncio.Event()

    async def __call__(self, call: Awaitable[T]) -> T:
        self.started += 1
        if self.started == self.expected:
            self.all_in.set()
        return await call


def count_batches(spool: Spool) -> list[int]:
    """Record the size of every ingest batch's journal transaction."""
    batches: list[int] = []
    real_insert = spool._journal.insert_batch

    def counting_insert(
        items: Sequence[NewInstance], policy: Literal["forward", "ignore"], *,
        expire_before: float | None = None,
    ) -> tuple[list[Inserted], list[FileRef]]:
        batches.append(len(items))
        return real_insert(items, policy, expire_before=expire_before)

    spool._journal.insert_batch = counting_insert  # type: ignore[method-assign]
    return batches


def begin_with_data(spool: Spool, uid: str) -> SpoolWriter:
    writer = spool.begin(meta(uid))
    writer.write(dataset_bytes(uid))
    return writer


async def test_commits_queued_during_a_batch_form_the_next_batch(spool: Spool, fs: FakeFS) -> None:
    batches = count_batches(spool)
    gate, entered = block_next_fsync(fs)
    first = asyncio.ensure_future(store(spool, "1.2.3.0"))
    async with asyncio.timeout(TIMEOUT):
        await entered.wait()  # the durability thread is inside the first batch
        writers = [begin_with_data(spool, f"1.2.3.{i}") for i in range(1, 5)]
        arrivals = Arrivals(len(writers))
        rest = [asyncio.ensure_future(arrivals(w.commit(["PACS_A"], []))) for w in writers]
        await arrivals.all_in.wait()
        assert len(spool._commits) == 4  # queued behind the batch in progress
        gate.set()
        stored = await asyncio.gather(first, *rest)

    assert batches == [1, 4]
    assert len({s.id for s in stored}) == 5
    assert all(s.path.is_file() for s in stored)
    assert len(await spool.pending("PACS_A", 0, 10, T0)) == 5
    assert spool.usage().used_bytes == sum(s.size for s in stored)


async def test_a_batch_fsyncs_each_shard_directory_once(spool: Spool, fs: FakeFS) -> None:
    gate, entered = block_next_fsync(fs)
    spool._next_id = 0x1FF  # shard ff
    first = asyncio.ensure_future(store(spool, "1.2.3.0"))
    async with asyncio.timeout(TIMEOUT):
        await entered.wait()
        writers = []
        for ident in (0x201, 0x301, 0x302):  # two in shard 01, one in shard 02
            spool._next_id = ident
            writers.append(begin_with_data(spool, f"1.2.3.{ident}"))
        arrivals = Arrivals(len(writers))
        rest = [asyncio.ensure_future(arrivals(w.commit(["PACS_A"], []))) for w in writers]
        await arrivals.all_in.wait()
        assert len(spool._commits) == 3
        gate.set()
        stored = await asyncio.gather(first, *rest)

    assert [s.id for s in stored] == [0x1FF, 0x201, 0x301, 0x302]
    objects = spool.root / "objects"
    assert sorted(p for p in fs.synced if p.parent == objects) == [objects / "01", objects / "02",
                                                                  objects / "ff"]
    assert len([p for p in fs.synced if p.parent == spool.root / "tmp"]) == 4  # every file, once


async def test_a_failing_object_fails_alone_in_its_batch(spool: Spool, fs: FakeFS) -> None:
    batches = count_batches(spool)
    gate, entered = block_next_fsync(fs)
    first = asyncio.ensure_future(store(spool, "1.2.3.0"))
    async with asyncio.timeout(TIMEOUT):
        await entered.wait()
        bad, good = begin_with_data(spool, "1.2.3.1"), begin_with_data(spool, "1.2.3.2")
        fs.failing_files.add(bad.tmp_path)
        arrivals = Arrivals(2)
        bad_commit = asyncio.ensure_future(arrivals(bad.commit(["PACS_A"], [])))
        good_commit = asyncio.ensure_future(arrivals(good.commit(["PACS_A"], [])))
        await arrivals.all_in.wait()
        assert len(spool._commits) == 2
        gate.set()
        with pytest.raises(SpoolFull, match="EIO"):
            await bad_commit
        stored = [await first, await good_commit]

    assert batches == [1, 1]  # the failed object never reached the journal
    assert files_under(spool.root / "objects") == sorted(s.path for s in stored)
    assert files_under(spool.root / "tmp") == []
    assert journal_rows(spool.root, "SELECT sop_instance_uid FROM instances ORDER BY id") == [
        ("1.2.3.0",), ("1.2.3.2",)]
    assert spool.usage().used_bytes == sum(s.size for s in stored)


async def test_a_commit_cancelled_during_fsync_leaves_nothing(spool: Spool, fs: FakeFS) -> None:
    gate, entered = block_next_fsync(fs)
    task = asyncio.ensure_future(store(spool))
    async with asyncio.timeout(TIMEOUT):
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await spool.close()  # waits for the fsync job and its clean-up

    assert files_under(spool.root / "tmp") == []
    assert files_under(spool.root / "objects") == []
    assert journal_rows(spool.root, "SELECT COUNT(*) FROM instances") == [(0,)]
    assert spool.usage().used_bytes == 0


async def test_close_lets_a_commit_in_progress_finish(spool: Spool, fs: FakeFS) -> None:
    gate, entered = block_next_fsync(fs)
    task = asyncio.ensure_future(store(spool))
    async with asyncio.timeout(TIMEOUT):
        await entered.wait()
        closing = asyncio.ensure_future(spool.close())
        gate.set()
        stored = await task
        await closing

    assert stored.path.is_file()
    assert journal_rows(spool.root, "SELECT id FROM instances") == [(stored.id,)]


# -- high-water marks and injected failures --------------------------------------------------


async def test_max_bytes_high_water_refuses_then_recovers_when_the_queue_drains(
    make_spool: Callable[..., Spool],
) -> None:
    spool = make_spool(max_bytes=10_000, release_delay=3600.0)
    await spool.open()
    first = await store(spool, "1.2.3.1", data=b"\0" * 12_000)
    assert spool.usage().over_high_water

    with pytest.raises(SpoolFull, match="high-water"):
        spool.begin(meta("1.2.3.2"))

    # over the mark, a delivered file is released (durably) before record_attempt returns
    await spool.record_attempt(first.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    assert not first.path.exists()
    usage = spool.usage()
    assert (usage.used_bytes, usage.capacity_bytes, usage.over_high_water) == (0, 10_000, False)
    assert (await store(spool, "1.2.3.2")).path.is_file()


async def test_free_fraction_high_water_refuses_then_recovers(spool: Spool, fs: FakeFS) -> None:
    fs.free_fraction = 0.01
    assert spool.usage().over_high_water
    assert spool.usage().free_bytes == 10_000 * 4096
    with pytest.raises(SpoolFull, match="high-water"):
        spool.begin(meta())
    assert files_under(spool.root / "tmp") == []

    fs.free_fraction = 0.5

    assert not spool.usage().over_high_water
    assert (await store(spool)).path.is_file()


@pytest.mark.parametrize(
    ("operation", "code", "let_through"),
    [
        ("write", errno.ENOSPC, 0),
        ("fsync", errno.EIO, 0),  # the object file
        ("fsync", errno.EIO, 1),  # its directory, after the rename
        ("replace", errno.EROFS, 0),
    ],
)
async def test_disk_failures_during_commit_give_spool_full_and_leave_nothing(
    spool: Spool, fs: FakeFS, operation: str, code: int, let_through: int
) -> None:
    writer = spool.begin(meta())
    fs.errors[operation] = code
    fs.let_through[operation] = let_through
    writer.write(dataset_bytes())
    assert writer.failed == (operation == "write")

    with pytest.raises(SpoolFull, match=errno.errorcode[code]):
        await writer.commit(["PACS_A"], [])

    assert files_under(spool.root / "tmp") == []
    assert files_under(spool.root / "objects") == []
    assert journal_rows(spool.root, "SELECT COUNT(*) FROM instances") == [(0,)]
    assert not spool.usage().writable
    assert spool.usage().used_bytes == 0
    fs.errors.clear()
    assert await spool.probe()  # the disk is fine again: readiness comes back without traffic
    assert spool.usage().writable
    assert (await store(spool)).path.is_file()


async def test_a_read_only_spool_refuses_at_begin_and_recovers(spool: Spool, fs: FakeFS) -> None:
    fs.errors["open"] = errno.EROFS
    with pytest.raises(SpoolFull, match="read-only"):
        spool.begin(meta())
    assert not spool.usage().writable
    fs.errors.clear()
    assert (await store(spool)).path.is_file()
    assert spool.usage().writable


async def test_a_failed_failure_is_remembered_for_the_recheck_interval(
    spool: Spool, fs: FakeFS
) -> None:
    fs.recheck_seconds = 3600.0
    fs.errors["open"] = errno.EROFS
    with pytest.raises(SpoolFull):
        spool.begin(meta())
    fs.errors.clear()
    with pytest.raises(SpoolFull, match="read-only"):
        spool.begin(meta())  # not asked again within the interval: cheap refusal under load


async def test_journal_failure_removes_the_object_file(spool: Spool) -> None:
    def broken(items: object, policy: object, *, expire_before: float | None = None) -> object:
        raise sqlite3.OperationalError("database or disk is full")

    spool._journal.insert_batch = broken  # type: ignore[assignment, method-assign]
    with pytest.raises(SpoolFull, match=r"saving the journal row \(database or disk is full\)"):
        await store(spool)
    assert files_under(spool.root / "objects") == []
    assert files_under(spool.root / "tmp") == []
    assert spool.usage().used_bytes == 0


async def test_a_closed_spool_refuses_everything(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool()
    with pytest.raises(SpoolFull, match="not open"):
        spool.begin(meta())
    await spool.open()
    writer = spool.begin(meta())
    await spool.close()
    assert not writer.tmp_path.exists()  # unfinished receptions are aborted
    with pytest.raises(SpoolFull):
        spool.begin(meta())
    with pytest.raises(SpoolFull):
        await spool.pending("PACS_A", 0, 10, T0)
    assert not spool.usage().writable


# -- duplicates ------------------------------------------------------------------------------


async def test_duplicate_policy_forward_stores_and_forwards_again(spool: Spool) -> None:
    first = await store(spool, "1.2.3.7")
    second = await store(spool, "1.2.3.7")

    assert (first.duplicate, second.duplicate) == (False, True)
    assert first.id != second.id and first.path.is_file() and second.path.is_file()
    assert [d.instance_id for d in await spool.pending("PACS_A", 0, 10, T0)] == [first.id, second.id]


async def test_duplicate_policy_ignore_keeps_the_first(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool(duplicate_policy="ignore")
    await spool.open()
    first = await store(spool, "1.2.3.7")
    second = await store(spool, "1.2.3.7")

    assert second.duplicate
    assert (second.id, second.path) == (first.id, first.path)
    assert files_under(spool.root / "objects") == [first.path]
    assert spool.usage().used_bytes == first.size
    assert [d.instance_id for d in await spool.pending("PACS_A", 0, 10, T0)] == [first.id]

    await spool.record_attempt(first.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    third = await store(spool, "1.2.3.7")  # the first is done: a new reception, not a duplicate
    assert not third.duplicate and third.id != first.id


# -- recovery --------------------------------------------------------------------------------


async def test_recovery_sweeps_temps_removes_orphans_keeps_committed_and_marks_lost(
    make_spool: Callable[..., Spool],
) -> None:
    spool = make_spool()
    await spool.open()
    kept = await store(spool, "1.2.3.1", ["PACS_A"])
    vanished = await store(spool, "1.2.3.2", ["PACS_A"])
    held = await store(spool, "1.2.3.3", [])
    partial_reception = spool.begin(meta("1.2.3.4"))
    partial_reception.write(b"\0" * 100)
    await spool.close()
    temp = spool.root / "tmp" / "00000000000000ff.part"
    temp.write_bytes(b"partial")
    spare = spool.root / "spare" / "0000000000000001.part"  # created ahead, never used
    spare.write_bytes(b"")
    recycled = spool.root / "spare" / "0000000000000002.part"  # recycled, crash before truncating
    recycled.write_bytes(b"a delivered object's bytes")
    orphan = spool.root / "objects" / "ab" / "0000000000000fab.dcm"
    orphan.write_bytes(b"renamed but never journaled")
    misplaced = spool.root / "objects" / "01" / "0000000000000fac.dcm"  # not in its shard (ac)
    misplaced.write_bytes(b"no row can name it")
    foreign = spool.root / "objects" / "ab" / "README"
    foreign.write_text("not ours")
    vanished.path.unlink()

    again = make_spool()
    report = await again.open()

    assert (report.swept_temp_files, report.orphan_files, report.lost_instances) == (1, 2, 1)
    assert (report.foreign_files, report.pending_deliveries, report.held_instances) == (1, 1, 1)
    assert files_under(again.root / "tmp") == [] and not spare.exists() and not recycled.exists()
    assert not orphan.exists() and not misplaced.exists() and foreign.exists()
    assert kept.path.is_file() and held.path.is_file()
    assert [d.instance_id for d in await again.pending("PACS_A", 0, 10, T0)] == [kept.id]
    (lost,) = await again.list_items(destination="PACS_A", dead=True, held=False, limit=10)
    assert (lost.instance_id, lost.last_error) == (vanished.id, LOST_ERROR)
    assert await again.retry_dead(None) == 0  # nothing to send: the file is gone
    assert again.usage().used_bytes == kept.size + held.size
    assert (await store(again, "1.2.3.5")).id > 0xFAC  # never reuses a name found on disk


class NoSyncFS(FileSystem):
    """Set-up only: no durability needed."""

    def fsync(self, fd: int) -> None:
        pass


async def test_recovery_streams_the_journal_instead_of_loading_it(tmp_path: Path) -> None:
    rows = 2000
    spool = Spool(tmp_path / "spool", fs=NoSyncFS())
    await spool.open()
    for i in range(rows):
        await store(spool, f"1.2.3.{i}", data=b"\0\0")
    await spool.close()

    again = Spool(tmp_path / "spool")
    tracemalloc.start()
    try:
        report = await again.open()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await again.close()

    assert (report.pending_deliveries, report.orphan_files, report.lost_instances) == (rows, 0, 0)
    # about 30 bytes per row here (sorted ids on disk); materialising the rows took ~650
    assert peak < rows * 100, f"recovery peaked at {peak} bytes for {rows} rows"


CHILD = """
import asyncio, struct, sys
from pathlib import Path
from gateway.spool import InstanceMeta, Spool

def payload(i):
    uid = f"1.2.3.{i}".encode() + b"\\0" * (len(f"1.2.3.{i}") % 2)
    pixels = bytes([i % 251]) * 30000
    return (struct.pack("<HHI", 0x0008, 0x0018, len(uid)) + uid
            + struct.pack("<HHI", 0x7FE0, 0x0010, len(pixels)) + pixels)

async def main():
    spool = Spool(Path(sys.argv[1]))
    await spool.open()
    i = 0
    while True:
        i += 1
        writer = spool.begin(InstanceMeta("1.2.840.10008.5.1.4.1.1.7", f"1.2.3.{i}",
                                          "1.2.840.10008.1.2", "KILLME", "GW", "127.0.0.1"))
        body = payload(i)
        for start in range(0, len(body), 8192):
            writer.write(body[start:start + 8192])
        stored = await writer.commit(["PACS_A"], [])
        print(stored.id, i, flush=True)
        if i % 3 == 0:  # forwarded: its file is released after a later durable commit
            await spool.record_attempt(stored.id - 1, "PACS_A", "delivered", 0, "",
                                       next_attempt_at=None, dead=False)
            print("delivered", stored.id - 1, flush=True)

asyncio.run(main())
"""


def child_payload(i: int) -> bytes:
    uid = f"1.2.3.{i}".encode() + b"\0" * (len(f"1.2.3.{i}") % 2)
    pixels = bytes([i % 251]) * 30000
    return (
        struct.pack("<HHI", 0x0008, 0x0018, len(uid)) + uid
        + struct.pack("<HHI", 0x7FE0, 0x0010, len(pixels)) + pixels
    )


async def test_kill_9_never_loses_an_acknowledged_object(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    wanted = random.randint(3, 40)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(root), stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    acknowledged: dict[int, int] = {}
    delivered: set[int] = set()

    def note(text: str) -> None:
        first, second = text.split()
        if first == "delivered":  # printed after record_attempt() returned
            delivered.add(int(second))
        else:  # printed after commit() returned: acknowledged
            acknowledged[int(first)] = int(second)

    try:
        async with asyncio.timeout(TIMEOUT):
            while len(acknowledged) < wanted:
                line = await proc.stdout.readline()
                assert line, "the child died before it was killed"
                note(line.decode())
    finally:
        proc.kill()  # SIGKILL, wherever it is: mid-write, mid-fsync, mid-transaction
        async with asyncio.timeout(TIMEOUT):
            rest = await proc.stdout.read()
            await proc.wait()
    for text in rest.decode().splitlines():
        if text.count(" ") == 1:
            note(text)

    spool = Spool(root)
    report = await spool.open()
    try:
        assert report.lost_instances == 0
        pending = await spool.pending("PACS_A", 0, 100_000, float("inf"))
        by_id = {d.instance_id: d for d in pending}
        assert acknowledged.keys() - delivered <= by_id.keys(), f"lost after kill -9 at {wanted}"
        assert not delivered & by_id.keys()  # a recorded attempt survives kill -9 (not power loss)
        for ident in acknowledged.keys() - delivered:
            delivery = by_id[ident]
            raw = delivery.path.read_bytes()
            assert raw[delivery.dataset_offset :] == child_payload(acknowledged[ident])
            assert pydicom.dcmread(delivery.path).file_meta.MediaStorageSOPInstanceUID == (
                f"1.2.3.{acknowledged[ident]}")
        assert files_under(root / "tmp") == []
        # delivered files were released (durably) before or at this start: only pending ones stay
        assert set(files_under(root / "objects")) == {d.path for d in pending}
        assert report.pending_deliveries == len(pending)
    finally:
        await spool.close()


# -- forwarding side -------------------------------------------------------------------------


async def test_pending_pages_in_arrival_order_and_respects_next_attempt_at(
    spool: Spool, clock: Clock
) -> None:
    ids = [(await store(spool, f"1.2.3.{i}", data=b"\0\0")).id for i in range(25)]

    pages, after = [], 0
    while page := await spool.pending("PACS_A", after, 10, T0):
        pages.append([d.instance_id for d in page])
        after = page[-1].instance_id
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for p in pages for i in p] == ids

    await spool.record_attempt(ids[0], "PACS_A", "transient", 0xA700, "out of resources",
                               next_attempt_at=T0 + 60, dead=False)
    assert [d.instance_id for d in await spool.pending("PACS_A", 0, 2, T0)] == ids[1:3]
    assert await spool.next_due("PACS_A") == T0
    (retried,) = await spool.pending("PACS_A", 0, 1, T0 + 60)
    assert (retried.instance_id, retried.attempts) == (ids[0], 1)
    assert await spool.next_due("PACS_B") is None
    assert await spool.pending("PACS_B", 0, 10, T0) == []


async def test_delivered_to_every_destination_deletes_the_file_and_logs_attempts(
    make_spool: Callable[..., Spool], clock: Clock
) -> None:
    spool = make_spool(release_delay=0.0)
    await spool.open()
    stored = await store(spool, "1.2.3.1", ["PACS_A", "PACS_B"])
    clock.now = T0 + 5

    await spool.record_attempt(stored.id, "PACS_A", "delivered", 0x0000, "", next_attempt_at=None,
                               dead=False)
    assert stored.path.is_file()
    assert await spool.pending("PACS_A", 0, 10, T0 + 5) == []
    await spool.record_attempt(stored.id, "PACS_B", "warning", 0xB000, "coercion",
                               next_attempt_at=None, dead=False)

    assert not stored.path.exists()
    assert spool.usage().used_bytes == 0
    assert await spool.counts() == {}
    assert journal_rows(spool.root, "SELECT state, has_file FROM instances") == [("done", 0)]
    assert journal_rows(
        spool.root, "SELECT destination, at, outcome, status, detail FROM attempts ORDER BY rowid"
    ) == [("PACS_A", T0 + 5, "delivered", 0, ""), ("PACS_B", T0 + 5, "warning", 0xB000, "coercion")]


async def test_attempts_recorded_meanwhile_share_one_transaction(spool: Spool) -> None:
    ids = [(await store(spool, f"1.2.3.{i}", data=b"\0\0")).id for i in range(5)]
    batches: list[int] = []
    real_record = spool._journal.record_attempts

    def counting_record(records: Sequence[AttemptRecord]) -> int:
        batches.append(len(records))
        return real_record(records)

    spool._journal.record_attempts = counting_record  # type: ignore[method-assign]
    gate = threading.Event()
    blocker = asyncio.ensure_future(spool._call(lambda: gate.wait(TIMEOUT), "blocking"))
    arrivals = Arrivals(len(ids))
    records = [
        asyncio.ensure_future(arrivals(spool.record_attempt(
            ident, "PACS_A", "transient", 0xA700, "busy", next_attempt_at=T0 + 60, dead=False)))
        for ident in ids
    ]
    async with asyncio.timeout(TIMEOUT):
        await arrivals.all_in.wait()
        assert len(spool._attempts) == 4  # the first one is already waiting on the journal thread
        gate.set()
        await blocker
        await asyncio.gather(*records)

    assert batches == [1, 4]
    assert journal_rows(spool.root, "SELECT COUNT(*) FROM attempts") == [(5,)]
    assert await spool.pending("PACS_A", 0, 10, T0) == []
    assert [d.attempts for d in await spool.pending("PACS_A", 0, 10, T0 + 60)] == [1] * 5


def transactions(statements: Sequence[str]) -> list[tuple[str, str]]:
    """(first write of each transaction, PRAGMA synchronous it committed with)."""
    found, mode, begun = [], "FULL", False
    for sql in statements:
        if sql.startswith("PRAGMA synchronous = "):
            mode = sql.rsplit(" ", 1)[1]
        elif sql == "BEGIN IMMEDIATE":
            begun = True
        elif begun and sql.startswith("INSERT INTO"):
            found.append((sql.split()[2], mode))
            begun = False
    return found


async def test_attempts_commit_with_synchronous_normal_ingest_with_full(spool: Spool) -> None:
    statements: list[str] = []
    spool._journal._db.set_trace_callback(statements.append)
    first = await store(spool, "1.2.3.1")
    await spool.record_attempt(first.id, "PACS_A", "transient", 0xA700, "busy",
                               next_attempt_at=T0 + 1, dead=False)
    await store(spool, "1.2.3.2")
    spool._journal._db.set_trace_callback(None)

    assert transactions(statements) == [
        ("instances", "FULL"), ("attempts", "NORMAL"), ("instances", "FULL")]


async def test_a_delivered_file_is_deleted_only_after_a_durable_commit(
    make_spool: Callable[..., Spool],
) -> None:
    spool = make_spool(release_delay=3600.0)  # no release of its own within this test
    await spool.open()
    first = await store(spool, "1.2.3.1")
    await spool.record_attempt(first.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)

    assert first.path.is_file()  # the record is not durable yet: the file must stay
    assert journal_rows(spool.root, "SELECT state, has_file FROM instances") == [("done", 1)]
    assert await spool.pending("PACS_A", 0, 10, T0) == []

    second = await store(spool, "1.2.3.2")  # its FULL transaction releases the first file

    assert journal_rows(spool.root, "SELECT state, has_file FROM instances ORDER BY id") == [
        ("done", 0), ("routed", 1)]
    assert spool.usage().used_bytes == second.size

    await spool.record_attempt(second.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    await spool.close()  # releases what is due, and waits for the deletions, before closing
    assert journal_rows(spool.root, "SELECT state, has_file FROM instances") == [("done", 0)] * 2
    assert files_under(spool.root / "objects") == []


def watch_releases(spool: Spool, before: Callable[[], object] = lambda: None) -> asyncio.Event:
    """An event set once a release transaction (``Spool._expire``, on a spool thread) released
    files; ``before`` runs ahead of each one (and may raise to fail it)."""
    loop = asyncio.get_running_loop()
    released = asyncio.Event()
    real_expire = spool._expire

    def expire(now: float) -> int:
        before()
        count = real_expire(now)
        if count:
            loop.call_soon_threadsafe(released.set)
        return count

    spool._expire = expire  # type: ignore[method-assign]
    return released


async def test_a_failed_release_after_recording_fails_no_attempt_and_is_retried(
    make_spool: Callable[..., Spool],
) -> None:
    spool = make_spool(release_delay=0.0)  # release at once, in the journal thread's job
    await spool.open()
    stored = await store(spool)
    calls: list[int] = []

    def fail_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")

    released = watch_releases(spool, before=fail_once)
    await spool.record_attempt(stored.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)  # does not raise: the attempt itself was recorded
    async with asyncio.timeout(TIMEOUT):
        await released.wait()

    assert len(calls) == 2 and not stored.path.exists()
    assert journal_rows(spool.root, "SELECT state, has_file FROM instances") == [("done", 0)]


async def test_without_ingest_a_release_of_its_own_follows_within_the_delay(
    make_spool: Callable[..., Spool],
) -> None:
    spool = make_spool(release_delay=0.01)
    await spool.open()
    stored = await store(spool)
    released = watch_releases(spool)
    await spool.record_attempt(stored.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    async with asyncio.timeout(TIMEOUT):
        await released.wait()

    assert not stored.path.exists()
    assert journal_rows(spool.root, "SELECT state, has_file FROM instances") == [("done", 0)]
    assert spool.usage().used_bytes == 0


def copy_journal(source: Path, target: Path) -> None:
    """A copy of the journal as it is on disk now (the spool is idle between transactions)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("journal.sqlite3", "journal.sqlite3-wal"):
        shutil.copyfile(source / name, target / name)


async def test_a_lost_attempt_record_never_leaves_a_pending_row_without_its_file(
    make_spool: Callable[..., Spool], tmp_path: Path
) -> None:
    spool = make_spool(release_delay=3600.0)
    await spool.open()
    stored = await store(spool, "1.2.3.1")
    copy_journal(spool.root, tmp_path / "before")
    await spool.record_attempt(stored.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)

    # a power cut may lose the NORMAL commit (journal as before the attempt) or keep it (as
    # after); either way the files are as they are now, since nothing durable released them
    copy_journal(spool.root, tmp_path / "after")
    for state in ("before", "after"):
        shutil.copytree(spool.root / "objects", tmp_path / state / "objects")
    lost_record = Spool(tmp_path / "before", clock=Clock())
    report = await lost_record.open()
    try:
        assert report.lost_instances == 0
        (again,) = await lost_record.pending("PACS_A", 0, 10, T0)  # sent again: at least once
        assert again.path.read_bytes() == stored.path.read_bytes()
    finally:
        await lost_record.close()
    kept_record = Spool(tmp_path / "after", clock=Clock())
    report = await kept_record.open()  # the record survived: its file is released now
    try:
        assert (report.lost_instances, report.pending_deliveries) == (0, 0)
        assert files_under(tmp_path / "after" / "objects") == []
        assert kept_record.usage().used_bytes == 0
    finally:
        await kept_record.close()


def test_a_delivery_builds_its_path_on_first_use() -> None:
    lazy = Delivery(7, "PACS_A", "objects/07/0000000000000007.dcm", 10, 5, CT, "1.2.3",
                    IMPLICIT_LE, 0, T0, root=Path("/spool"))
    eager = Delivery(7, "PACS_A", Path("/spool/objects/07/0000000000000007.dcm"), 10, 5, CT,
                     "1.2.3", IMPLICIT_LE, 0, T0)

    assert lazy.path == Path("/spool/objects/07/0000000000000007.dcm")
    assert lazy == eager and hash(lazy) == hash(eager)
    assert lazy != Delivery(7, "PACS_A", "x.dcm", 10, 5, CT, "1.2.3", IMPLICIT_LE, 1, T0)


async def test_retention_keeps_delivered_files_until_swept(
    make_spool: Callable[..., Spool], clock: Clock
) -> None:
    spool = make_spool(retention_seconds=100.0, history_seconds=1000.0)
    await spool.open()
    stored = await store(spool)
    await spool.record_attempt(stored.id, "PACS_A", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    assert stored.path.is_file()

    clock.now = T0 + 99
    assert await spool.sweep_retention() == 0
    assert stored.path.is_file()
    assert spool.usage().used_bytes == stored.size

    clock.now = T0 + 100
    assert await spool.sweep_retention() == 1
    assert not stored.path.exists()
    assert spool.usage().used_bytes == 0
    assert journal_rows(spool.root, "SELECT COUNT(*) FROM instances") == [(1,)]

    clock.now = T0 + 1100  # past the history window: finished rows are forgotten
    await spool.sweep_retention()
    assert journal_rows(spool.root, "SELECT COUNT(*) FROM instances") == [(0,)]
    assert journal_rows(spool.root, "SELECT COUNT(*) FROM attempts") == [(0,)]
    assert (await store(spool)).id > stored.id


async def test_dead_letters_retry_and_purge(make_spool: Callable[..., Spool], clock: Clock) -> None:
    spool = make_spool(release_delay=0.0)
    await spool.open()
    both = await store(spool, "1.2.3.1", ["PACS_A", "PACS_B"])
    only_a = await store(spool, "1.2.3.2", ["PACS_A"])
    for ident in (both.id, only_a.id):
        await spool.record_attempt(ident, "PACS_A", "permanent", 0xA900, "dataset mismatch",
                                   next_attempt_at=None, dead=True)

    counts = await spool.counts()
    assert counts["PACS_A"].pending == 0 and counts["PACS_A"].dead == 2
    assert counts["PACS_B"].pending == 1 and counts["PACS_B"].oldest_received_at == T0
    dead = await spool.list_items(destination="PACS_A", dead=True, held=False, limit=10)
    assert [(d.instance_id, d.state, d.attempts, d.last_status, d.last_error) for d in dead] == [
        (both.id, "dead", 1, 0xA900, "dataset mismatch"),
        (only_a.id, "dead", 1, 0xA900, "dataset mismatch"),
    ]

    clock.now = T0 + 30
    assert await spool.retry_dead("PACS_A") == 2
    retried = await spool.pending("PACS_A", 0, 10, T0 + 30)
    assert [(d.instance_id, d.attempts) for d in retried] == [(both.id, 0), (only_a.id, 0)]
    assert await spool.pending("PACS_A", 0, 10, T0 + 29) == []

    for ident in (both.id, only_a.id):
        await spool.record_attempt(ident, "PACS_A", "permanent", 0xA900, "again",
                                   next_attempt_at=None, dead=True)
    assert await spool.purge_dead("PACS_A") == 2
    assert not only_a.path.exists()  # nothing else needed it
    assert both.path.is_file()  # PACS_B still needs it
    assert await spool.list_items(destination=None, dead=True, held=False, limit=10) == []
    await spool.record_attempt(both.id, "PACS_B", "delivered", 0, "", next_attempt_at=None,
                               dead=False)
    assert not both.path.exists()
    assert spool.usage().used_bytes == 0


async def test_reroute_gives_a_held_instance_its_destinations(spool: Spool) -> None:
    held = await store(spool, "1.2.3.1", [])
    routed = await store(spool, "1.2.3.2", ["PACS_A"])

    await spool.reroute(held.id, ["PACS_B", "PACS_A"], ["ct-to-both"])
    await spool.reroute(held.id, ["PACS_C"], ["later"])  # no longer held: nothing happens
    await spool.reroute(routed.id, ["PACS_C"], ["x"])

    assert await spool.held_count() == 0
    assert await spool.held_items(10) == []
    assert [d.instance_id for d in await spool.pending("PACS_A", 0, 10, T0)] == [held.id, routed.id]
    assert [d.instance_id for d in await spool.pending("PACS_B", 0, 10, T0)] == [held.id]
    assert await spool.pending("PACS_C", 0, 10, T0) == []
    assert journal_rows(spool.root, "SELECT matched_rules FROM instances WHERE id = ?", held.id) == [
        ('["ct-to-both"]',)
    ]


async def test_held_items_page_by_id(spool: Spool) -> None:
    ids = [(await store(spool, f"1.2.3.{i}", [], data=b"\0\0")).id for i in range(5)]
    first = await spool.held_items(3)
    rest = await spool.held_items(3, after_id=first[-1].id)
    assert [h.id for h in first + rest] == ids


async def test_record_attempt_rejects_an_unknown_outcome(spool: Spool) -> None:
    stored = await store(spool)
    with pytest.raises(ValueError, match="outcome"):
        await spool.record_attempt(stored.id, "PACS_A", "maybe", None, "", next_attempt_at=None,
                                   dead=False)


# -- a second process on the same spool -------------------------------------------------------


async def test_the_cli_can_retry_dead_letters_while_the_gateway_runs(
    spool: Spool, make_spool: Callable[..., Spool]
) -> None:
    stored = await store(spool)
    await spool.record_attempt(stored.id, "PACS_A", "permanent", 0xC000, "refused",
                               next_attempt_at=None, dead=True)
    writer: SpoolWriter = spool.begin(meta("1.2.3.99"))  # a reception in flight
    writer.write(b"\0\0")

    cli = make_spool()
    await cli.open_readonly()
    assert (await cli.counts())["PACS_A"].dead == 1
    assert await cli.retry_dead(None) == 1
    with pytest.raises(SpoolFull):
        cli.begin(meta())
    await cli.close()

    assert writer.tmp_path.is_file()  # the CLI recovered nothing and swept nothing
    assert [d.instance_id for d in await spool.pending("PACS_A", 0, 10, T0)] == [stored.id]
    assert (await writer.commit(["PACS_A"], [])).path.is_file()


async def test_a_second_gateway_on_the_same_spool_is_refused(
    spool: Spool, make_spool: Callable[..., Spool]
) -> None:
    with pytest.raises(SpoolFull, match="in use by another gateway"):
        await make_spool().open()
    assert (await store(spool)).path.is_file()


async def test_the_cli_on_a_missing_spool_says_so(tmp_path: Path) -> None:
    with pytest.raises(SpoolFull, match="no spool journal"):
        await Spool(tmp_path / "nowhere").open_readonly()
    assert not (tmp_path / "nowhere").exists()
