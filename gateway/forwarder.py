"""One forwarder per destination: a bounded queue fed from the journal, associations reused,
retries with backoff, dead letters.

Theory of operation
-------------------
The journal is the queue of record; memory holds at most ``queue_capacity`` deliveries. The
*feeder* pages due deliveries out of the journal in arrival (id) order into the in-memory deque and
then waits until it is woken (a new instance was routed here, a retry was scheduled), a retry
becomes due, or ``RESCAN`` seconds pass (which also picks up ``dicom-gateway queue retry`` done by
another process). ``associations`` *workers* take deliveries from the deque; each keeps one
association open while work remains and releases it after ``idle_timeout``.

The feeder remembers how far it has read (``fed_to``): every due delivery with an id up to there
is in flight (``inflight``: in the deque, being sent, or waiting for its record), so the next read
continues after it instead of re-reading the whole queue. It starts lower only when something below
may have become due: a retry time passed, ``RESCAN`` elapsed, a record failed, or an instance was
committed late (ids are given when a reception *begins*, so with parallel senders a lower id can
commit after a higher one: ``wake(instance_id)`` says which, and a wake without an id makes the
feeder read from the start as soon as that is cheap, i.e. when the deque is empty). Only the
rescans (at start, every ``RESCAN``, after a journal error) ask the journal when its next retry is
due; retries this process scheduled are in ``_retry_times``.

After every attempt the worker classifies the outcome (``gateway.retry``), applies what concerns
the destination at once (a refused, rejected or unreachable PACS charges only the delivery at hand
and pauses the whole destination for a backoff, so an outage neither burns every item's attempts
nor spins), and hands the record to a recorder task so it can send the next item while the journal
writes. A delivery leaves the in-flight set only after its record is written (or failed): the feeder
can never feed it twice, and the observer sees only recorded attempts. A crash before the record
leaves the delivery pending, so it is sent again after restart (at least once). Destinations never
share queues, tasks or associations: one that is down never slows another.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.abc import TaskGroup
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.dicom.negotiation import EXPLICIT_BE, IMPLICIT_LE, UNCOMPRESSED
from gateway.dicom.requestor import NegotiatedContext, RequestorAssociation, RequestorConfig
from gateway.errors import AssociationRejected, GatewayError, SpoolFull
from gateway.explain import explain_failure, explain_status, one_line, uid_name
from gateway.journal import Delivery
from gateway.metrics import Metrics
from gateway.retry import (
    DONE_OUTCOMES,
    Outcome,
    Step,
    backoff,
    classify_failure,
    classify_status,
    next_step,
)
from gateway.scu import Failure, build_proposals, echo_peer, explain_peer, failure_of
from gateway.settings import Destination
from gateway.spool import Spool
from gateway.tls import peer_ssl

log = logging.getLogger("gateway.forwarder")

RESCAN = 5.0
PROBE_INTERVAL = 30.0
_EVERYTHING = 0  # ``after`` for a read from the start of the queue
_NOWHERE = 1 << 62  # no request to read from lower down
_JUDGED = 64  # response statuses a forwarder remembers the judgement of


class NoContext(GatewayError):
    """The destination accepted no presentation context this object can be sent in."""


class NotConvertible(GatewayError):
    """The object had to be re-encoded for the destination and could not be decoded."""


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Outcome
    status: int | None
    detail: str  # our explanation: safe to log
    destination_failure: bool = False
    comment: str = ""  # the peer's Error Comment, free text: journaled, never logged

    def journal_detail(self) -> str:
        return f"{self.detail}: {self.comment}" if self.comment else self.detail


AttemptObserver = Callable[[str, Delivery, Attempt, bool], None]
"""Called after every recorded attempt with (destination, delivery, attempt, dead-lettered)."""


class Sender(Protocol):
    """What a worker sends with: one association at a time (``Session``; tests pass fakes)."""

    @property
    def open(self) -> bool: ...

    async def send(self, item: Delivery) -> Attempt: ...

    async def release(self) -> None: ...

    def abort(self) -> None: ...


class Forwarder:
    def __init__(self, name: str, destination: Destination, spool: Spool, metrics: Metrics, *,
                 calling_ae: str, max_pdu: int = 262144,
                 clock: Callable[[], float] = time.time,
                 uniform: Callable[[], float] = random.random,
                 observer: AttemptObserver | None = None,
                 sessions: Callable[[Forwarder], Sender] | None = None) -> None:
        self.name = name
        self.destination = destination
        self.spool = spool
        self.metrics = metrics
        self.calling_ae = calling_ae
        self.config = RequestorConfig(calling_ae, max_pdu, destination.connect_timeout,
                                      destination.dimse_timeout, ssl=peer_ssl(destination))
        self.clock = clock
        self.uniform = uniform
        self.observer = observer
        self.sessions: Callable[[Forwarder], Sender] = sessions or Session
        self.queue: collections.deque[Delivery] = collections.deque()
        self.inflight: set[int] = set()
        self.fed_to = 0
        self._lower = _NOWHERE  # the next read starts after min(fed_to, _lower)
        self._unsure = True  # something may have been committed below fed_to
        self._rescan = True  # read everything and ask the journal when its next retry is due
        self._scanned_at = 0.0  # time.monotonic() of the last rescan
        self._journal_due: float | None = None  # the journal's earliest retry, as last read
        self._retry_times: list[tuple[float, int]] = []  # (retry_at, instance_id), a heap
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._records = anyio.Semaphore(destination.queue_capacity)
        self._tasks: TaskGroup | None = None
        self._paused_until = 0.0
        self._failures = 0
        self._judged: dict[int, tuple[Outcome, str]] = {}  # status -> (outcome, explanation)
        self._last_success = 0.0

    def wake(self, instance_id: int | None = None) -> None:
        """New work may be in the journal: ``instance_id`` was just routed here (``None``: some
        instance, id unknown; a late one is then picked up when the deque runs empty, or within
        ``RESCAN`` seconds)."""
        if instance_id is None:
            self._unsure = True
        else:
            self._lower = min(self._lower, instance_id - 1)
        self._wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            tg.start_soon(self._feed)
            tg.start_soon(self._probe)
            for _ in range(self.destination.associations):
                tg.start_soon(self._work)

    # ------------------------------------------------------------------------------- feeding

    async def _feed(self) -> None:
        while True:
            try:
                await self._fill()
            except SpoolFull as exc:
                log.error("%s: cannot read the queue from the journal, trying again in %g s: %s",
                          self.name, RESCAN, exc)
                self._rescan = True
                await anyio.sleep(RESCAN)

    async def _fill(self) -> None:
        capacity = self.destination.queue_capacity
        while True:
            if len(self.queue) >= capacity:
                self._space.clear()
                await self._space.wait()
                continue
            self._wake.clear()
            start = self._start()
            if self._rescan:
                self._rescan = False
                self._journal_due = await self.spool.next_due(self.name)
            if not await self._read(start):
                continue  # the deque is full: wait for space, then go on from fed_to
            await self._sleep_until_work()

    def _start(self) -> int:
        """Where the next read begins (and forget the requests it satisfies)."""
        now = self.clock()
        while self._retry_times and self._retry_times[0][0] <= now:
            _, instance_id = heapq.heappop(self._retry_times)
            self._lower = min(self._lower, instance_id - 1)
        moment = time.monotonic()
        if moment - self._scanned_at >= RESCAN:
            self._rescan = True
        if self._rescan:
            self._scanned_at = moment
        if self._rescan or (self._unsure and not self.queue):
            self._lower = _EVERYTHING
        start = max(min(self.fed_to, self._lower), _EVERYTHING)
        self._lower = _NOWHERE
        if start == _EVERYTHING:
            self._unsure = False
        return start

    async def _read(self, after: int) -> bool:
        """Feed due deliveries with ids above ``after`` until the deque is full; True when the
        journal had no more."""
        capacity = self.destination.queue_capacity
        while True:
            room = capacity - len(self.queue)
            if room <= 0:
                return False
            # below fed_to, rows in flight come back too: read past them
            limit = room if after >= self.fed_to else room + len(self.inflight)
            items = await self.spool.pending(self.name, after, limit, self.clock())
            fresh = [item for item in items if item.instance_id not in self.inflight][:room]
            if fresh:
                self.queue.extend(fresh)
                self.inflight.update(item.instance_id for item in fresh)
                self._ready.set()
            if len(fresh) == room and fresh[-1] is not items[-1]:
                self.fed_to = fresh[-1].instance_id  # rows after it were not looked at
                return False
            position = items[-1].instance_id if items else after
            if len(items) < limit:
                self.fed_to = max(self.fed_to, position)
                return True
            self.fed_to = position
            after = position

    async def _sleep_until_work(self) -> None:
        now = self.clock()
        rescan = RESCAN
        due = self._journal_due
        if due is not None and due > now:
            rescan = min(rescan, due - now)
        retry = self._retry_times[0][0] - now if self._retry_times else rescan
        with anyio.move_on_after(max(min(retry, rescan), 0.01)) as scope:
            await self._wake.wait()
        if scope.cancelled_caught and rescan <= retry:
            self._rescan = True  # a retry only the journal knows of, or the RESCAN timer

    # ------------------------------------------------------------------------------- sending

    def judge(self, status: int) -> tuple[Outcome, str]:
        """``classify_status`` and ``explain_status`` of a response status with this destination's
        overrides. Both are pure, so each status is judged once (at most ``_JUDGED`` remembered:
        a peer cannot grow the table without bound)."""
        judged = self._judged.get(status)
        if judged is None:
            overrides = self.destination.retry.status_overrides
            judged = (classify_status(status, overrides), explain_status(status, overrides))
            if len(self._judged) < _JUDGED:
                self._judged[status] = judged
        return judged

    async def _take(self, timeout: float | None) -> Delivery | None:
        while not self.queue:
            self._ready.clear()
            with anyio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
                await self._ready.wait()
            if scope.cancelled_caught:
                return None
        item = self.queue.popleft()
        self._space.set()
        if self._unsure and not self.queue:
            self._wake.set()  # reading from the start is cheap now: look for late commits
        return item

    async def _work(self) -> None:
        session = self.sessions(self)
        try:
            while True:
                item = await self._take(self.destination.idle_timeout if session.open else None)
                if item is None:
                    await session.release()
                    continue
                handed = False
                try:
                    attempt, step = await self._deliver(session, item)
                    await self._records.acquire()
                    assert self._tasks is not None
                    self._tasks.start_soon(self._record, item, attempt, step)
                    handed = True
                finally:
                    if not handed:
                        self.inflight.discard(item.instance_id)
        finally:
            session.abort()

    async def _deliver(self, session: Sender, item: Delivery) -> tuple[Attempt, Step]:
        """Send one delivery and decide what comes next; the destination learns the outcome at
        once (pause or recovery), the journal later (``_record``)."""
        pause = self._paused_until - self.clock()
        if pause > 0:
            await anyio.sleep(pause)
        started = time.perf_counter()
        attempt = await session.send(item)
        seconds = time.perf_counter() - started
        self.metrics.forward_attempt(self.name, attempt.outcome, seconds, item.size)
        now = self.clock()
        policy = self.destination.retry
        step = next_step(item.attempts + 1, item.received_at, now, attempt.outcome, policy,
                         self.uniform())
        if attempt.destination_failure:
            self._failures += 1
            self._paused_until = now + backoff(self._failures, policy, self.uniform())
            self.metrics.set_destination_up(self.name, False)
        elif attempt.outcome in DONE_OUTCOMES:
            self._failures = 0
            self._last_success = now
            self.metrics.set_destination_up(self.name, True)
        return attempt, step

    async def _record(self, item: Delivery, attempt: Attempt, step: Step) -> None:
        """Write one attempt to the journal (a task of its own), then let the delivery go."""
        reason = "" if step.done or not step.dead else f"; {step.reason}"
        detail = attempt.journal_detail() + reason
        try:
            await self.spool.record_attempt(item.instance_id, self.name, attempt.outcome,
                                            attempt.status, detail[:1000],
                                            next_attempt_at=step.retry_at, dead=step.dead)
        except SpoolFull as exc:
            self._not_recorded(item, exc)
            return
        finally:
            self.inflight.discard(item.instance_id)
            self._records.release()
        if step.retry_at is not None:
            heapq.heappush(self._retry_times, (step.retry_at, item.instance_id))
            self._wake.set()  # the feeder's sleep may have to end sooner
        if self.observer is not None:
            self.observer(self.name, item, attempt, step.dead)
        if step.dead:
            # the PACS's own comment may name the patient: it is in the queue, not in the log
            log.warning("dead-lettered instance %s for %s: %s%s", item.sop_instance_uid, self.name,
                        attempt.detail, reason)

    def _not_recorded(self, item: Delivery, exc: SpoolFull) -> None:
        """The attempt was made but the journal did not record it: the delivery stays due and is
        sent again (at least once). Pause the destination so a failing journal does not spin."""
        self._failures += 1
        pause = backoff(self._failures, self.destination.retry, self.uniform())
        self._paused_until = self.clock() + pause
        log.error("%s: cannot record the attempt for instance %s, sending it again in %.1f s: %s",
                  self.name, item.sop_instance_uid, pause, exc)
        self.wake(item.instance_id)

    async def _probe(self) -> None:
        """C-ECHO the destination when it has been quiet, so ``destination_up`` stays current."""
        while True:
            if self.clock() - self._last_success >= PROBE_INTERVAL:
                result = await echo_peer(self.name, self.destination, self.calling_ae)
                self.metrics.set_destination_up(self.name, result.ok)
            await anyio.sleep(PROBE_INTERVAL)


class Session:
    """One worker's association to the destination, reused while its contexts fit the work."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.association: RequestorAssociation | None = None
        self.covered: set[tuple[str, str]] = set()

    @property
    def open(self) -> bool:
        return self.association is not None

    async def send(self, item: Delivery) -> Attempt:
        f = self.forwarder
        reused = self.association is not None and self._key(item) in self.covered
        try:
            association = await self._association_for(item)
        except (GatewayError, OSError) as exc:
            self.abort()
            failure = failure_of(exc)
            return Attempt(classify_failure(failure.kind, rj=failure.rj), None, self._explain(failure),
                           destination_failure=True)
        try:
            context, payload = await self._context_and_payload(association, item)
            if payload is None:
                response = await association.store_file(context, item.sop_class_uid,
                                                        item.sop_instance_uid, item.path,
                                                        item.dataset_offset)
            else:
                response = await association.store_bytes(context, item.sop_class_uid,
                                                         item.sop_instance_uid, payload)
        except NoContext as exc:
            if reused:  # negotiated before the PACS may have been fixed (queue retry): ask again
                await self.release()
                return await self.send(item)
            return Attempt("permanent", None, str(exc))
        except NotConvertible as exc:
            return Attempt("permanent", None, str(exc))
        except (GatewayError, OSError) as exc:
            self.abort()
            failure = failure_of(exc)
            return Attempt(classify_failure(failure.kind, rj=failure.rj), None, self._explain(failure))
        status = response.status if response.status is not None else 0xC000
        outcome, detail = f.judge(status)
        comment = one_line(response.error_comment) if response.error_comment else ""
        return Attempt(outcome, status, detail, comment=comment)

    def _explain(self, failure: Failure) -> str:
        f = self.forwarder
        return explain_peer(f.name, f.destination, f.calling_ae, failure)

    @staticmethod
    def _key(item: Delivery) -> tuple[str, str]:
        return (item.sop_class_uid, item.transfer_syntax)

    async def _association_for(self, item: Delivery) -> RequestorAssociation:
        key = self._key(item)
        if self.association is not None and key in self.covered:
            return self.association
        await self.release()
        f = self.forwarder
        upcoming = itertools.islice(f.queue, 2 * 128)
        pairs = [key, *((d.sop_class_uid, d.transfer_syntax) for d in upcoming)]
        proposals, self.covered = build_proposals(pairs)
        try:
            self.association = await RequestorAssociation.open(
                f.destination.host, f.destination.port, f.destination.ae_title, proposals, f.config)
        except AssociationRejected:
            f.metrics.association_refused(f.name)
            raise
        f.metrics.association_opened("out", f.name)
        f._last_success = f.clock()
        return self.association

    async def _context_and_payload(self, association: RequestorAssociation,
                                   item: Delivery) -> tuple[NegotiatedContext, bytes | None]:
        context = association.context_for(item.sop_class_uid, [item.transfer_syntax])
        if context is not None:
            return context, None
        if item.transfer_syntax in UNCOMPRESSED:
            context = association.context_for(item.sop_class_uid, UNCOMPRESSED)
            if context is not None:
                payload = await self._convert(item, context.transfer_syntax)
                return context, payload
        f = self.forwarder
        raise NoContext(explain_failure(
            "no_presentation_context", peer_name=f.name, host=f.destination.host,
            port=f.destination.port, called_ae=f.destination.ae_title, calling_ae=f.calling_ae,
            sop_class_uid=item.sop_class_uid, transfer_syntax_uid=item.transfer_syntax))

    async def _convert(self, item: Delivery, syntax: str) -> bytes:
        try:
            return await anyio.to_thread.run_sync(convert_uncompressed, item, syntax)
        except OSError:
            raise
        except Exception as exc:  # pydicom raises many types on malformed data; translated here
            # only the exception type: pydicom's messages may quote element values (patient data)
            f = self.forwarder
            raise NotConvertible(
                f"{f.name}: the peer accepts SOP class {uid_name(item.sop_class_uid)} only in "
                f"{uid_name(syntax)}, and this object in {uid_name(item.transfer_syntax)} cannot be "
                f"decoded to convert it ({type(exc).__name__}): the object is malformed; fix it at "
                "the modality, or configure the PACS to accept its transfer syntax") from None

    async def release(self) -> None:
        association, self.association = self.association, None
        self.covered = set()
        if association is not None:
            await association.release()
            self.forwarder.metrics.association_closed("out")

    def abort(self) -> None:
        association, self.association = self.association, None
        self.covered = set()
        if association is not None:
            association.abort()
            self.forwarder.metrics.association_aborted("out", self.forwarder.name)
            self.forwarder.metrics.association_closed("out")


def convert_uncompressed(item: Delivery, syntax: str) -> bytes:
    """Re-encode an uncompressed dataset in another uncompressed syntax (the only conversion
    the gateway makes; compressed data is never transcoded)."""
    dataset = dcmread(item.path, force=True)
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != EXPLICIT_BE
    buffer.is_implicit_VR = syntax == IMPLICIT_LE
    del dataset.file_meta
    write_dataset(buffer, dataset)
    return buffer.getvalue()
