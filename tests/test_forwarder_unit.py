"""The forwarder's feeder and recorder against an in-memory journal and a fake PACS session.

What is checked: the feeder reads each new delivery once (no re-reading of what is in flight),
picks up late commits and due retries, and never feeds a delivery twice; a worker sends the next
item while the journal writes the previous record, yet a delivery leaves the in-flight set (and
the observer hears of it) only once its record is written; a failed record means a resend; a
destination failure pauses the destination at once. Every wait is bounded and event-driven.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import pytest
from peers import free_port
from prometheus_client import CollectorRegistry

from gateway import forwarder as forwarder_module
from gateway.errors import SpoolFull
from gateway.explain import explain_status
from gateway.forwarder import Attempt, Forwarder, Sender
from gateway.journal import Delivery
from gateway.metrics import Metrics
from gateway.retry import classify_status
from gateway.settings import Destination, RetryPolicy
from gateway.spool import Spool

NAME = "PACS"
WAIT = 10.0
US = "1.2.840.10008.5.1.4.1.1.6.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DELIVERED = Attempt("delivered", 0x0000, "0x0000 Success")


class Changes:
    """A pulse on every state change; ``wait_for`` re-checks a predicate on each one (bounded)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        try:
            with anyio.fail_after(timeout):
                while not predicate():
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"not reached within {timeout} s: {what}") from None


@dataclass
class Row:
    delivery: Delivery
    next_attempt_at: float = 0.0
    state: str = "pending"


class MemorySpool(Spool):
    """The forwarding side of the spool (``pending``, ``next_due``, ``record_attempt``) in memory,
    counting what the feeder reads; records can be held back (``records_open``) or failed."""

    def __init__(self, root: Path, changes: Changes) -> None:
        super().__init__(root)
        self.changes = changes
        self.rows: dict[int, Row] = {}
        self.reads: list[tuple[int, int]] = []  # (after, rows returned) of each pending()
        self.records: list[tuple[int, str]] = []
        self.records_open = anyio.Event()
        self.records_open.set()
        self.record_failures = 0

    def add(self, instance_id: int) -> None:
        delivery = Delivery(instance_id, NAME, Path(f"/nonexistent/{instance_id}.dcm"), 100, 0, US,
                            f"1.2.3.{instance_id}", EXPLICIT_LE, 0, time.time())
        self.rows[instance_id] = Row(delivery)

    def another_read(self) -> Callable[[], bool]:
        """A predicate: ``pending`` was called again since now."""
        seen = len(self.reads)
        return lambda: len(self.reads) > seen

    @property
    def rows_read(self) -> int:
        return sum(count for _, count in self.reads)

    async def pending(self, destination: str, after_id: int, limit: int, now: float) -> list[Delivery]:
        due = [row.delivery for key, row in sorted(self.rows.items())
               if key > after_id and row.state == "pending" and row.next_attempt_at <= now]
        self.reads.append((after_id, len(due[:limit])))
        self.changes.notify()
        return due[:limit]

    async def next_due(self, destination: str) -> float | None:
        times = [row.next_attempt_at for row in self.rows.values() if row.state == "pending"]
        return min(times, default=None)

    async def record_attempt(self, instance_id: int, destination: str, outcome: str,
                             status: int | None, detail: str, *, next_attempt_at: float | None,
                             dead: bool) -> None:
        await self.records_open.wait()
        if self.record_failures > 0:
            self.record_failures -= 1
            self.changes.notify()
            raise SpoolFull("spool: journal error while recording a forward attempt (test)")
        row = self.rows[instance_id]
        d = row.delivery
        row.delivery = Delivery(d.instance_id, d.destination, d.path, d.size, d.dataset_offset,
                                d.sop_class_uid, d.sop_instance_uid, d.transfer_syntax,
                                d.attempts + 1, d.received_at)
        if dead:
            row.state = "dead"
        elif next_attempt_at is None:
            row.state = "done"
        else:
            row.next_attempt_at = next_attempt_at
        self.records.append((instance_id, outcome))
        self.changes.notify()


@dataclass
class FakePACS:
    """What every worker session sends to: answers from ``answer``; sends can be held back."""

    changes: Changes
    answer: Callable[[Delivery], Attempt] = lambda _: DELIVERED
    sent: list[int] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    accepting: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.accepting.set()

    def session(self, _: Forwarder) -> Sender:
        return FakeSession(self)


class FakeSession:
    def __init__(self, pacs: FakePACS) -> None:
        self.pacs = pacs

    @property
    def open(self) -> bool:
        return True

    async def send(self, item: Delivery) -> Attempt:
        self.pacs.sent.append(item.instance_id)
        self.pacs.sent_at.append(time.time())  # the forwarder's own clock
        self.pacs.changes.notify()
        await self.pacs.accepting.wait()
        return self.pacs.answer(item)

    async def release(self) -> None:
        return None

    def abort(self) -> None:
        return None


@dataclass
class Rig:
    forwarder: Forwarder
    spool: MemorySpool
    pacs: FakePACS
    changes: Changes
    observed: list[tuple[int, str, bool]]

    def in_memory(self) -> list[int]:
        return [item.instance_id for item in self.forwarder.queue]


@pytest.fixture
def no_rescan_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic rescan would hide a feeder that missed a wake-up: switch it off."""
    monkeypatch.setattr(forwarder_module, "RESCAN", 3600.0)


@pytest.fixture
def changes() -> Changes:
    return Changes()


def make_rig(tmp_path: Path, changes: Changes, *, capacity: int = 1000, base_delay: float = 0.05,
             uniform: float = 0.5) -> Rig:
    spool = MemorySpool(tmp_path / "spool", changes)
    pacs = FakePACS(changes)
    observed: list[tuple[int, str, bool]] = []

    def observe(_: str, item: Delivery, attempt: Attempt, dead: bool) -> None:
        observed.append((item.instance_id, attempt.outcome, dead))
        changes.notify()

    destination = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(),
                              queue_capacity=capacity,
                              retry=RetryPolicy(base_delay=base_delay, max_delay=1.0))
    metrics = Metrics(CollectorRegistry(), destinations=(NAME,), known_calling_aes=())
    f = Forwarder(NAME, destination, spool, metrics, calling_ae="DICOMGW",
                  uniform=lambda: uniform, observer=observe, sessions=pacs.session)
    return Rig(f, spool, pacs, changes, observed)


@contextlib.asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[Rig]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.forwarder.run)
        try:
            yield rig
        finally:
            tg.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------ feeder


@pytest.mark.parametrize("with_ids", [True, False], ids=["wake(id)", "wake()"])
async def test_the_feeder_reads_each_new_delivery_once_while_forwarding_lags(
    tmp_path: Path, changes: Changes, with_ids: bool
) -> None:
    rig = make_rig(tmp_path, changes)
    rig.pacs.accepting = anyio.Event()  # the PACS is slow: nothing is delivered meanwhile
    count = 300
    async with running(rig):
        for i in range(1, count + 1):
            rig.spool.add(i)
            rig.forwarder.wake(i if with_ids else None)
            await changes.wait_for(partial(operator.contains, rig.forwarder.inflight, i),
                                   f"instance {i} fed")
        assert rig.pacs.sent == [1]
        assert rig.in_memory() == list(range(2, count + 1)), "arrival order, each once"
        # the old feeder re-read everything in flight on every wake: ~count**2 / 2 rows
        assert rig.spool.rows_read <= count + 10, rig.spool.rows_read
        rig.pacs.accepting.set()
        await changes.wait_for(lambda: len(rig.observed) == count, "everything delivered")
    assert rig.pacs.sent == list(range(1, count + 1))


async def test_a_late_commit_below_what_was_read_is_fed_at_once_when_its_id_is_given(
    tmp_path: Path, changes: Changes, no_rescan_timer: None
) -> None:
    rig = make_rig(tmp_path, changes)
    rig.pacs.accepting = anyio.Event()
    async with running(rig):
        for i in (1, 2, 4, 5):  # 3 began first but commits last (parallel senders)
            rig.spool.add(i)
            rig.forwarder.wake(i)
        await changes.wait_for(lambda: rig.forwarder.inflight == {1, 2, 4, 5}, "1, 2, 4, 5 fed")
        assert rig.forwarder.fed_to == 5
        rig.spool.add(3)
        rig.forwarder.wake(3)
        await changes.wait_for(lambda: 3 in rig.forwarder.inflight, "the late commit fed",
                               )  # the rescan timer is off: wake(3) did it
        assert rig.in_memory() == [2, 4, 5, 3]
        rig.pacs.accepting.set()
        await changes.wait_for(lambda: len(rig.observed) == 5, "everything delivered")
    assert rig.pacs.sent == [1, 2, 4, 5, 3]


async def test_a_late_commit_without_an_id_is_fed_once_the_queue_drains(
    tmp_path: Path, changes: Changes, no_rescan_timer: None
) -> None:
    rig = make_rig(tmp_path, changes)
    rig.pacs.accepting = anyio.Event()
    async with running(rig):
        for i in (1, 2, 4, 5):
            rig.spool.add(i)
            rig.forwarder.wake()
        await changes.wait_for(lambda: rig.forwarder.inflight == {1, 2, 4, 5}, "1, 2, 4, 5 fed")
        rig.spool.add(3)
        rig.forwarder.wake()
        rig.pacs.accepting.set()
        # with no rescan timer: the feeder reads from the start when the deque runs empty
        await changes.wait_for(lambda: len(rig.observed) == 5, "everything delivered")
    assert sorted(rig.pacs.sent) == [1, 2, 3, 4, 5], "each sent exactly once"


async def test_a_delivery_waiting_for_its_record_is_never_fed_again(
    tmp_path: Path, changes: Changes
) -> None:
    rig = make_rig(tmp_path, changes)
    rig.spool.records_open = anyio.Event()  # the journal is slow
    async with running(rig):
        for i in (1, 2, 3):
            rig.spool.add(i)
            rig.forwarder.wake()
        await changes.wait_for(lambda: rig.pacs.sent == [1, 2, 3], "all three sent")
        # reads from the start see all three still pending in the journal: none is fed again
        for _ in range(3):
            another_read = rig.spool.another_read()
            rig.forwarder.wake()
            await changes.wait_for(another_read, "a read from the start")
        assert rig.spool.reads[-1] == (0, 3)
        assert rig.forwarder.inflight == {1, 2, 3} and not rig.forwarder.queue
        assert rig.observed == [], "the observer hears only of recorded attempts"
        rig.spool.records_open.set()
        await changes.wait_for(lambda: len(rig.observed) == 3, "three records written")
        assert rig.forwarder.inflight == set()
    assert rig.pacs.sent == [1, 2, 3]
    assert sorted(rig.spool.records) == [(1, "delivered"), (2, "delivered"), (3, "delivered")]


# ---------------------------------------------------------------------------------------- recorder


async def test_a_worker_sends_the_next_item_while_the_record_is_written(
    tmp_path: Path, changes: Changes
) -> None:
    rig = make_rig(tmp_path, changes)
    rig.spool.records_open = anyio.Event()
    async with running(rig):
        for i in range(1, 6):
            rig.spool.add(i)
        rig.forwarder.wake()
        await changes.wait_for(lambda: len(rig.pacs.sent) == 5, "five sent, no record written yet")
        assert rig.spool.records == [] and rig.observed == []
        assert rig.forwarder.inflight == {1, 2, 3, 4, 5}
        rig.spool.records_open.set()
        await changes.wait_for(lambda: len(rig.observed) == 5, "five records written")
    assert sorted(rig.observed) == [(i, "delivered", False) for i in range(1, 6)]


async def test_a_record_that_fails_means_the_delivery_is_sent_again(
    tmp_path: Path, changes: Changes
) -> None:
    rig = make_rig(tmp_path, changes, uniform=0.0)  # no pause after the journal error
    rig.spool.record_failures = 1
    async with running(rig):
        rig.spool.add(1)
        rig.forwarder.wake(1)
        await changes.wait_for(lambda: len(rig.observed) == 1, "the second attempt recorded")
    assert rig.pacs.sent == [1, 1], "sent again: at least once"
    assert rig.spool.records == [(1, "delivered")]
    assert rig.observed == [(1, "delivered", False)]


async def test_a_destination_failure_pauses_the_destination_before_its_record_is_written(
    tmp_path: Path, changes: Changes
) -> None:
    pause = 0.5 * 0.4  # uniform x base_delay for the first failure
    rig = make_rig(tmp_path, changes, base_delay=0.4, uniform=0.5)
    refused = Attempt("transient", None, "PACS: nothing listens", destination_failure=True)
    rig.pacs.answer = lambda _: refused if len(rig.pacs.sent) == 1 else DELIVERED
    rig.spool.records_open = anyio.Event()
    async with running(rig):
        rig.spool.add(1)
        rig.spool.add(2)
        rig.forwarder.wake()
        await changes.wait_for(lambda: len(rig.pacs.sent) == 2, "the second item sent")
        assert rig.spool.records == [], "the pause did not wait for the journal"
        paused_until = rig.forwarder._paused_until
        assert paused_until >= rig.pacs.sent_at[0] + pause  # it decided to pause ...
        assert rig.pacs.sent_at[1] >= paused_until, "... and sent nothing before the pause ended"
        rig.spool.records_open.set()
        await changes.wait_for(lambda: (2, "delivered", False) in rig.observed, "item 2 recorded")
        await changes.wait_for(lambda: (1, "delivered", False) in rig.observed, "item 1 retried")
    assert rig.pacs.sent == [1, 2, 1]
    assert sorted(rig.spool.records) == [(1, "delivered"), (1, "transient"), (2, "delivered")]


async def test_a_retry_is_sent_when_it_falls_due_without_waiting_for_a_rescan(
    tmp_path: Path, changes: Changes, no_rescan_timer: None
) -> None:
    rig = make_rig(tmp_path, changes, base_delay=0.05, uniform=0.5)
    first = True

    def answer(_: Delivery) -> Attempt:
        nonlocal first
        if first:
            first = False
            return Attempt("transient", 0xA700, "0xA700 Refused: Out of Resources")
        return DELIVERED

    rig.pacs.answer = answer
    async with running(rig):
        rig.spool.add(1)
        rig.forwarder.wake(1)
        await changes.wait_for(lambda: len(rig.observed) == 2, "retried and delivered")
    assert rig.observed == [(1, "transient", False), (1, "delivered", False)]
    assert rig.pacs.sent == [1, 1]


async def test_a_full_queue_is_refilled_from_where_it_stopped_in_arrival_order(
    tmp_path: Path, changes: Changes
) -> None:
    rig = make_rig(tmp_path, changes, capacity=4)
    rig.pacs.accepting = anyio.Event()
    for i in range(1, 21):
        rig.spool.add(i)
    async with running(rig):
        rig.forwarder.wake()
        await changes.wait_for(lambda: len(rig.forwarder.queue) == 4, "the deque full")
        assert rig.pacs.sent == [1] and rig.in_memory() == [2, 3, 4, 5]
        rig.pacs.accepting.set()
        await changes.wait_for(lambda: len(rig.observed) == 20, "everything delivered")
    assert rig.pacs.sent == list(range(1, 21))
    assert rig.spool.rows_read <= 20 + 20, "the rows in flight are not read again and again"


# ------------------------------------------------------------------------------ judging statuses


def test_a_status_is_judged_with_the_destination_s_overrides_and_remembered_within_a_bound(
    tmp_path: Path,
) -> None:
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(),
                              retry=RetryPolicy(status_overrides={"B000": "permanent"}))
    metrics = Metrics(CollectorRegistry(), destinations=(NAME,), known_calling_aes=())
    f = Forwarder(NAME, destination, MemorySpool(tmp_path / "spool", Changes()), metrics,
                  calling_ae="DICOMGW")
    overrides = destination.retry.status_overrides

    for status in (0x0000, 0xB000, 0xA700, 0xB000, 0xC123):
        assert f.judge(status) == (classify_status(status, overrides),
                                   explain_status(status, overrides))
    assert f.judge(0xB000)[0] == "permanent"  # the override, not the default (a warning)
    assert f.judge(0x0000)[0] == "delivered"
    for status in range(0xC000, 0xC400):  # a peer inventing statuses cannot grow the table
        assert f.judge(status) == (classify_status(status, overrides),
                                   explain_status(status, overrides))
    assert len(f._judged) <= 64
