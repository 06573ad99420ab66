"""The Modality Worklist proxy: a modality's C-FIND goes to the RIS, the RIS's answers come back.

Theory of operation
-------------------
Every query opens its own association to the RIS (the per-calling-AE override, else the default
upstream) and proposes the worklist SOP class twice: once in exactly the transfer syntax the
modality used, once in Explicit then Implicit VR Little Endian. When the RIS takes the modality's
syntax, the query identifier goes up and every answer comes down as the bytes the peer sent: nothing
is decoded, so every key (sequences, empty keys, Specific Character Set, private tags) survives
byte for byte, and the proxy costs one extra hop, not a pydicom round trip per answer. Only when
the syntaxes differ, or when Scheduled Station AE Title coercion is on, is a dataset decoded and
re-encoded with pydicom.

Each pending answer is yielded as soon as it arrives. While waiting for the next answer the proxy
races the RIS against the modality's C-CANCEL (``FindRequest.cancelled``); when the cancel wins it
sends C-CANCEL upstream, drains what the RIS still sends without forwarding it, and answers 0xFE00.

Every wait is bounded twice: each PDU by the upstream's ``dimse_timeout`` (in the requestor), the
whole query by ``deadline``. Whatever goes wrong upstream, the modality gets one final failure
status with a short error comment (see ``FAILURES``), and the upstream association is released or
aborted. Logs carry AE titles, addresses, outcomes, counts and durations, never query values or
answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from io import BytesIO
from types import MappingProxyType
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from gateway.dicom import dimse
from gateway.dicom.events import AssociationInfo, FindRequest, FindResponse
from gateway.dicom.negotiation import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MODALITY_WORKLIST_FIND,
    VERIFICATION,
)
from gateway.dicom.pdu import ContextProposal
from gateway.dicom.requestor import NegotiatedContext, RequestorAssociation, RequestorConfig
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    GatewayError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
)
from gateway.settings import Worklist
from gateway.tls import peer_ssl

log = logging.getLogger("gateway.mwl")

Outcome = Literal["success", "cancelled", "upstream_failure", "failure"]
Observer = Callable[[str, Outcome, float | None, int], None]
"""``observer(calling_ae, outcome, upstream_seconds, results)``, once per query; ``upstream_seconds``
is None when the RIS was never asked."""

# Final statuses the proxy itself answers with (PS3.4 C.4.1.1.4: 0xCxxx = Failure, Unable to
# process). Distinct codes let an operator tell the causes apart in a modality's log.
UNABLE_TO_PROCESS = 0xC000
RIS_UNREACHABLE = 0xC001
RIS_REJECTED = 0xC002
RIS_TIMED_OUT = 0xC003
RIS_ABORTED = 0xC004
FAILURES: Mapping[int, str] = MappingProxyType({
    UNABLE_TO_PROCESS: "the gateway could not decode or convert a dataset",
    RIS_UNREACHABLE: "no TCP connection to the RIS",
    RIS_REJECTED: "the RIS rejected the association or the worklist SOP class",
    RIS_TIMED_OUT: "the RIS did not answer in time",
    RIS_ABORTED: "the RIS aborted the association or broke the protocol",
})

_ENCODINGS: Mapping[str, tuple[bool, bool]] = MappingProxyType({
    IMPLICIT_LE: (True, True),
    EXPLICIT_LE: (False, True),
    EXPLICIT_BE: (False, False),
})
_FALLBACK_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)
_NO_OVERRIDES: Mapping[str, Worklist] = MappingProxyType({})
_PENDING = (dimse.PENDING, dimse.PENDING_WARNING)
_COMMENT_MAX = 64
CHECK_START_DATE = "19000101"


# --- pure decisions ------------------------------------------------------------------------------


def proposals_for(transfer_syntax: str) -> tuple[ContextProposal, ...]:
    """The modality's own syntax alone in context 1 (so an SCP with its own preference order cannot
    pick another one there), then the uncompressed fallbacks in context 3."""
    fallback = tuple(ts for ts in _FALLBACK_SYNTAXES if ts != transfer_syntax)
    proposals = [ContextProposal(1, MODALITY_WORKLIST_FIND, (transfer_syntax,))]
    if fallback:
        proposals.append(ContextProposal(3, MODALITY_WORKLIST_FIND, fallback))
    return tuple(proposals)


def preferred_syntaxes(transfer_syntax: str) -> tuple[str, ...]:
    return (transfer_syntax, *(ts for ts in _FALLBACK_SYNTAXES if ts != transfer_syntax))


def failure_for(exc: BaseException, upstream: Worklist, *, associated: bool = True) -> FindResponse:
    """The final response that tells the modality what went wrong upstream; ``associated`` says
    whether the association was established (which timeout a ``PeerTimeout`` was)."""
    where = f"{upstream.host}:{upstream.port}"
    if isinstance(exc, PeerUnreachable):
        return _failure(RIS_UNREACHABLE, f"RIS unreachable at {where}")
    if isinstance(exc, AssociationRejected):
        return _failure(RIS_REJECTED,
                        f"RIS rejected the association ({exc.result},{exc.source},{exc.reason})")
    if isinstance(exc, PeerTimeout):
        waited = upstream.dimse_timeout if associated else upstream.connect_timeout
        return _failure(RIS_TIMED_OUT, f"RIS did not answer within {waited:g} s")
    if isinstance(exc, TimeoutError):
        return _failure(RIS_TIMED_OUT, f"RIS did not answer within {upstream.deadline:g} s")
    if isinstance(exc, AssociationAborted):
        return _failure(RIS_ABORTED, "RIS aborted the association")
    if isinstance(exc, ProtocolError):
        return _failure(RIS_ABORTED, "RIS broke the DICOM protocol")
    return _failure(UNABLE_TO_PROCESS, "gateway internal error; see the gateway log")


def _failure(status: int, comment: str) -> FindResponse:
    return FindResponse(status, None, comment[:_COMMENT_MAX])


def outcome_of(status: int, *, cancelled: bool) -> Outcome:
    if cancelled or status == dimse.CANCEL:
        return "cancelled"
    if status == dimse.SUCCESS:
        return "success"
    return "upstream_failure"


# --- datasets (pydicom, only off the byte pass-through path) -------------------------------------


class DatasetError(ProtocolError):
    """A query or an answer could not be decoded or re-encoded by pydicom."""


def decode(data: bytes, transfer_syntax: str) -> Dataset:
    implicit, little = _encoding(transfer_syntax)
    try:
        return read_dataset(BytesIO(data), implicit, little)
    except Exception as exc:  # foreign decoder: translate at the boundary
        raise DatasetError(f"cannot decode a dataset ({type(exc).__name__})") from None


def encode(dataset: Dataset, transfer_syntax: str) -> bytes:
    implicit, little = _encoding(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    try:
        write_dataset(buffer, dataset)
    except Exception as exc:  # foreign encoder: translate at the boundary
        raise DatasetError(f"cannot encode a dataset ({type(exc).__name__})") from None
    return buffer.getvalue()


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    try:
        return _ENCODINGS[transfer_syntax]
    except KeyError:
        raise DatasetError(f"transfer syntax {transfer_syntax} is not supported for C-FIND") from None


def transcode(data: bytes, source: str, target: str) -> bytes:
    """The same dataset in another (uncompressed) transfer syntax; unchanged when they are equal."""
    return data if source == target else encode(decode(data, source), target)


def coerce_station_ae(identifier: bytes, transfer_syntax: str, calling_ae: str) -> bytes:
    """Fill an empty (or ``*``) Scheduled Station AE Title in the Scheduled Procedure Step Sequence
    items with ``calling_ae``. A query without that sequence, or with an empty one, is unchanged."""
    dataset = decode(identifier, transfer_syntax)
    try:
        steps = dataset.get("ScheduledProcedureStepSequence")
        changed = False
        if isinstance(steps, DicomSequence):
            for step in steps:
                if step.get("ScheduledStationAETitle") in (None, "", "*"):
                    step.ScheduledStationAETitle = calling_ae
                    changed = True
    except DatasetError:
        raise
    except Exception as exc:  # lazily parsed elements: foreign errors surface here
        raise DatasetError(f"cannot read the query's step sequence ({type(exc).__name__})") from None
    return encode(dataset, transfer_syntax) if changed else identifier


def empty_query(start_date: str = CHECK_START_DATE) -> Dataset:
    """A worklist query that matches nothing on a sane RIS (a start date far in the past)."""
    step = Dataset()
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = start_date
    step.Modality = ""
    query = Dataset()
    query.PatientID = ""
    query.ScheduledProcedureStepSequence = DicomSequence([step])
    return query


# --- one upstream query --------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    outcome: Outcome = "cancelled"  # a query that ends without a final status: the modality left
    status: int | None = None
    results: int = 0
    reason: str = ""
    upstream_started: float | None = None
    upstream_seconds: float | None = None
    reported: bool = False


class _UpstreamQuery:
    """One C-FIND on one association to the RIS, raced against the modality's C-CANCEL."""

    def __init__(self, upstream: Worklist, config: RequestorConfig, request: FindRequest,
                 deadline: float) -> None:
        self.upstream = upstream
        self.config = config
        self.request = request
        self.deadline = deadline
        self.assoc: RequestorAssociation | None = None
        self.context: NegotiatedContext | None = None
        self.cancel_sent = False
        self._message_id = 0
        self._responses: AsyncIterator[tuple[dimse.Command, bytes | None]] | None = None
        self._written = False
        self._cancel_wait: asyncio.Task[bool] | None = None

    async def open(self) -> NegotiatedContext:
        upstream = self.upstream
        async with asyncio.timeout_at(self.deadline):
            self.assoc = await RequestorAssociation.open(
                upstream.host, upstream.port, upstream.ae_title,
                proposals_for(self.request.transfer_syntax), self.config)
        self.context = self.assoc.context_for(MODALITY_WORKLIST_FIND,
                                              preferred_syntaxes(self.request.transfer_syntax))
        if self.context is None:
            raise _NoWorklistContext
        return self.context

    def start(self, identifier: bytes) -> None:
        assert self.assoc is not None and self.context is not None
        self._message_id = self.assoc.next_message_id()
        self._responses = self.assoc.find(self.context, identifier, self._message_id)
        self._cancel_wait = asyncio.ensure_future(self.request.cancelled.wait())

    async def next_response(self) -> tuple[dimse.Command, bytes | None]:
        """The next upstream response; sends C-CANCEL upstream the moment the modality cancels."""
        step = asyncio.ensure_future(self._pull())
        try:
            async with asyncio.timeout_at(self.deadline):
                while not self.cancel_sent and not step.done():
                    assert self._cancel_wait is not None
                    await asyncio.wait((step, self._cancel_wait),
                                       return_when=asyncio.FIRST_COMPLETED)
                    # the C-FIND-RQ is written when the step task first runs, which asyncio's FIFO
                    # ready queue guarantees happens before the wait above returns
                    if self._cancel_wait.done() and self._written:
                        self._send_cancel()
                return await step
        finally:
            if not step.done():
                step.cancel()

    async def _pull(self) -> tuple[dimse.Command, bytes | None]:
        assert self._responses is not None
        self._written = True  # the first anext writes the C-FIND-RQ before it first suspends
        return await anext(self._responses)

    def _send_cancel(self) -> None:
        assert self.assoc is not None and self.context is not None
        self.cancel_sent = True
        self.assoc.send_cancel(self.context, self._message_id)

    async def release(self) -> None:
        self._stop_waiting()
        assoc, self.assoc = self.assoc, None
        if assoc is not None:
            await assoc.release()

    def abort(self) -> None:
        self._stop_waiting()
        assoc, self.assoc = self.assoc, None
        if assoc is not None:
            assoc.abort()

    def _stop_waiting(self) -> None:
        if self._cancel_wait is not None:
            self._cancel_wait.cancel()


class _NoWorklistContext(GatewayError):
    """The RIS accepted the association but none of our worklist presentation contexts."""


# --- the proxy -----------------------------------------------------------------------------------


class WorklistProxy:
    """The ``find`` part of ``gateway.dicom.events.Services``."""

    def __init__(self, upstream: Worklist, *, calling_ae: str,
                 upstreams_by_calling_ae: Mapping[str, Worklist] = _NO_OVERRIDES,
                 observer: Observer | None = None) -> None:
        self.upstream = upstream
        self.calling_ae = calling_ae
        self.upstreams_by_calling_ae = dict(upstreams_by_calling_ae)
        self.observer = observer

    def upstream_for(self, calling_ae: str) -> Worklist:
        return self.upstreams_by_calling_ae.get(calling_ae.strip(), self.upstream)

    async def find(self, info: AssociationInfo, request: FindRequest) -> AsyncIterator[FindResponse]:
        upstream = self.upstream_for(info.calling_ae)
        tally = _Tally()
        started = time.perf_counter()
        try:
            async with aclosing(self._relay(upstream, info, request, tally)) as responses:
                async for response in responses:
                    if response.status not in _PENDING:
                        self._report(info.calling_ae, upstream, tally, started)
                    yield response
        except Exception as exc:  # the proxy's one catch-all: a modality always gets a final status
            log.error("worklist query from %s failed inside the gateway: %s",
                      info.calling_ae, type(exc).__name__)
            log.debug("worklist proxy internal error", exc_info=True)
            if tally.status is not None:
                return  # the final status has been sent already
            response = failure_for(exc, upstream)
            tally.outcome, tally.status, tally.reason = "failure", response.status, response.comment
            self._report(info.calling_ae, upstream, tally, started)
            yield response
        finally:
            self._report(info.calling_ae, upstream, tally, started)

    async def _relay(self, upstream: Worklist, info: AssociationInfo, request: FindRequest,
                     tally: _Tally) -> AsyncGenerator[FindResponse, None]:
        deadline = asyncio.get_running_loop().time() + upstream.deadline
        if request.cancelled.is_set():
            tally.outcome, tally.status = "cancelled", dimse.CANCEL
            yield FindResponse(dimse.CANCEL)
            return
        try:
            identifier = request.identifier
            if upstream.coerce_station_ae:
                identifier = coerce_station_ae(identifier, request.transfer_syntax, info.calling_ae)
        except DatasetError:
            tally.outcome, tally.status = "failure", UNABLE_TO_PROCESS
            tally.reason = "cannot decode the worklist query"
            yield _failure(UNABLE_TO_PROCESS, tally.reason)
            return
        query = _UpstreamQuery(upstream, requestor_config(upstream, self.calling_ae), request,
                               deadline)
        tally.upstream_started = time.perf_counter()
        try:
            async with aclosing(self._exchange(query, identifier, request, tally)) as responses:
                async for response in responses:
                    yield response
            await query.release()
        finally:
            query.abort()

    async def _exchange(self, query: _UpstreamQuery, identifier: bytes, request: FindRequest,
                        tally: _Tally) -> AsyncGenerator[FindResponse, None]:
        """Talk to the RIS; yields the modality's responses, always ending with a final one."""
        try:
            context = await query.open()
            identifier = transcode(identifier, request.transfer_syntax, context.transfer_syntax)
            query.start(identifier)
            while True:
                command, dataset = await query.next_response()
                status = dimse.UNABLE_TO_PROCESS if command.status is None else command.status
                if status in _PENDING:
                    if query.cancel_sent:
                        continue  # drained, not forwarded
                    if dataset is not None:
                        dataset = transcode(dataset, context.transfer_syntax, request.transfer_syntax)
                    tally.results += 1
                    yield FindResponse(status, dataset)
                    continue
                final = self._final(query, status, command.error_comment, tally)
                break
        except _NoWorklistContext:
            final = self._failed(query, _failure(RIS_REJECTED, "RIS does not accept worklist queries"),
                                 tally)
        except DatasetError:
            final = self._failed(query, _failure(UNABLE_TO_PROCESS, "cannot convert a worklist dataset"),
                                 tally, "failure")
        except TimeoutError as exc:
            if query.cancel_sent:  # the RIS never finished after our C-CANCEL: the modality asked
                query.abort()
                final = self._final(query, dimse.CANCEL, "", tally)
            else:
                final = self._failed(query, failure_for(exc, query.upstream), tally)
        except GatewayError as exc:
            response = failure_for(exc, query.upstream, associated=query.context is not None)
            final = self._failed(query, response, tally)
        yield final

    def _final(self, query: _UpstreamQuery, status: int, comment: str, tally: _Tally) -> FindResponse:
        tally.upstream_seconds = _since(tally.upstream_started)
        if query.cancel_sent:
            status, comment = dimse.CANCEL, ""
        tally.outcome = outcome_of(status, cancelled=query.cancel_sent)
        tally.status = status
        return FindResponse(status, None, comment[:_COMMENT_MAX])

    def _failed(self, query: _UpstreamQuery, response: FindResponse, tally: _Tally,
                outcome: Outcome = "upstream_failure") -> FindResponse:
        query.abort()
        tally.upstream_seconds = _since(tally.upstream_started)
        tally.outcome, tally.status, tally.reason = outcome, response.status, response.comment
        return response

    def _report(self, calling_ae: str, upstream: Worklist, tally: _Tally, started: float) -> None:
        if tally.reported:
            return
        tally.reported = True
        status = "none" if tally.status is None else f"0x{tally.status:04X}"
        reason = f" ({tally.reason})" if tally.reason else ""
        log.info("worklist query from %s via %s at %s:%d: %s, status %s%s, %d result(s), %.3f s",
                 calling_ae, upstream.ae_title, upstream.host, upstream.port, tally.outcome, status,
                 reason, tally.results, time.perf_counter() - started)
        if self.observer is not None:
            self.observer(calling_ae, tally.outcome, tally.upstream_seconds, tally.results)


def _since(started: float | None) -> float | None:
    return None if started is None else time.perf_counter() - started


# --- doctor --------------------------------------------------------------------------------------


def requestor_config(upstream: Worklist, calling_ae: str) -> RequestorConfig:
    """How the gateway calls ``upstream``: its timeouts and TLS, our AE title."""
    return RequestorConfig(calling_ae, connect_timeout=upstream.connect_timeout,
                           dimse_timeout=upstream.dimse_timeout, ssl=peer_ssl(upstream))


async def check_worklist(upstream: Worklist, calling_ae: str,
                         config_key: str = "worklist") -> tuple[bool, str]:
    """C-ECHO and an empty-result worklist query against ``upstream``: (ok, plain-words why).
    ``config_key``: where ``upstream`` is in the config, named in the advice (``worklist``, or
    ``worklist_by_calling_ae.<AE>``)."""
    where = f"RIS {upstream.ae_title} at {upstream.host}:{upstream.port}"
    try:
        async with asyncio.timeout(upstream.deadline):
            detail = await _check(upstream, calling_ae)
    except TimeoutError:
        return False, (f"{where}: no complete answer within {upstream.deadline:g} s "
                       f"({config_key}.deadline): the RIS is stuck or overloaded; check its log")
    except GatewayError as exc:
        return False, f"{where}: {_explain(exc, upstream, calling_ae, config_key)}"
    return True, f"{where}: {detail}"


async def _check(upstream: Worklist, calling_ae: str) -> str:
    proposals = (ContextProposal(1, VERIFICATION, (IMPLICIT_LE,)),
                 ContextProposal(3, MODALITY_WORKLIST_FIND, _FALLBACK_SYNTAXES))
    assoc = await RequestorAssociation.open(upstream.host, upstream.port, upstream.ae_title,
                                            proposals, requestor_config(upstream, calling_ae))
    try:
        echo = await _echo(assoc)
        context = assoc.context_for(MODALITY_WORKLIST_FIND, _FALLBACK_SYNTAXES)
        if context is None:
            raise _NoWorklistContext
        status, results = await _count(assoc, context, encode(empty_query(), context.transfer_syntax))
        if status != dimse.SUCCESS:
            raise _CheckFailed(f"the RIS answered a test worklist query with 0x{status:04X}: "
                               "check the RIS log")
        await assoc.release()
    finally:
        assoc.abort()
    return (f"{echo}; a worklist query for {CHECK_START_DATE} answered success with "
            f"{results} result(s), calling AE {calling_ae}")


async def _echo(assoc: RequestorAssociation) -> str:
    if not any(c.abstract_syntax == VERIFICATION for c in assoc.contexts.values()):
        return "association accepted (the RIS does not offer C-ECHO)"
    status = await assoc.echo()
    if status != dimse.SUCCESS:
        raise _CheckFailed(f"the RIS answered C-ECHO with 0x{status:04X}: check the RIS log")
    return "association and C-ECHO succeeded"


async def _count(assoc: RequestorAssociation, context: NegotiatedContext,
                 identifier: bytes) -> tuple[int, int]:
    results = 0
    async for command, _ in assoc.find(context, identifier):
        if command.status in _PENDING:
            results += 1
        else:
            return (dimse.UNABLE_TO_PROCESS if command.status is None else command.status), results
    raise ProtocolError("the RIS ended the query without a final status")


class _CheckFailed(GatewayError):
    """The RIS answered, but not with success."""


_REJECT_ADVICE: Mapping[tuple[int, int], str] = MappingProxyType({
    (1, 3): "the RIS does not know our calling AE title {calling}: register it (with this host's "
            "address) on the RIS",
    (1, 7): "the RIS does not answer to the AE title {called}: check {key}.ae_title against "
            "the RIS configuration",
    (1, 2): "the RIS does not support the DICOM application context: is {address} a DICOM port?",
    (3, 2): "the RIS is busy (its association limit is reached): retry later or raise its limit",
})

_UNREACHABLE_ADVICE: Mapping[str, str] = MappingProxyType({
    "connection_refused": "nothing listens at {address}: check that the RIS worklist service runs "
                          "and that {key}.host/{key}.port are right",
    "connect_timeout": "no answer from {address}: a firewall drops the connection or {key}.host "
                       "is wrong",
    "connection_reset": "{address} reset the connection: the RIS or a firewall closed it",
})


def _explain(exc: GatewayError, upstream: Worklist, calling_ae: str, key: str) -> str:
    address = f"{upstream.host}:{upstream.port}"
    names = {"address": address, "calling": calling_ae, "called": upstream.ae_title, "key": key}
    if isinstance(exc, PeerUnreachable):
        advice = _UNREACHABLE_ADVICE.get(exc.kind, "cannot connect to {address}: check the network")
        return f"{advice.format(**names)} ({exc})"
    if isinstance(exc, AssociationRejected):
        advice = _REJECT_ADVICE.get((exc.source, exc.reason),
                                    "the RIS rejected the association: check the RIS log")
        if exc.result != 1 and (exc.source, exc.reason) not in _REJECT_ADVICE:
            advice = "the RIS is temporarily unable to accept us: retry later, check the RIS log"
        return (f"{advice.format(**names)} [A-ASSOCIATE-RJ result {exc.result}, source "
                f"{exc.source}, reason {exc.reason}]")
    if isinstance(exc, PeerTimeout):
        return (f"the RIS accepted the connection but did not answer within "
                f"{upstream.dimse_timeout:g} s ({key}.dimse_timeout): it may be stuck; check its log")
    if isinstance(exc, AssociationAborted):
        return (f"the RIS aborted the association ({exc}): check the RIS log, e.g. whether it "
                f"accepts calling AE {calling_ae}")
    if isinstance(exc, _NoWorklistContext):
        return ("the RIS accepted the association but not the Modality Worklist Information FIND "
                f"SOP class ({MODALITY_WORKLIST_FIND}) in Explicit or Implicit VR Little Endian: "
                "enable worklist queries for our AE on the RIS")
    return str(exc)

