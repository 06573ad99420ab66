"""The worklist proxy, end to end: a modality -> the gateway's acceptor -> WorklistProxy -> a RIS.

RIS peers: DCMTK ``wlmscpfs`` (real), test-local pynetdicom SCPs (slow, cancelling, blocking,
failing, recording), and raw asyncio servers (silent, aborting). The modality is DCMTK ``findscu``,
a pynetdicom SCU, or the gateway's own ``RequestorAssociation``. No sleeps: every wait is an event
with a bound.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest
from peers import (
    WorklistSCP,
    free_port,
    mwl_query_keys,
    read_findscu_results,
    run_findscu_worklist,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, evt
from pynetdicom.events import Event as PynetdicomEvent
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from gateway import mwl
from gateway.demo.worklist_items import demo_worklist
from gateway.dicom import dimse, pdu
from gateway.dicom.acceptor import Acceptor, AcceptorConfig
from gateway.dicom.events import (
    AssociationInfo,
    DatasetSink,
    FindRequest,
    FindResponse,
    Rejection,
    StoreRequest,
)
from gateway.dicom.negotiation import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MODALITY_WORKLIST_FIND,
    VERIFICATION,
)
from gateway.dicom.pdu import ContextProposal
from gateway.dicom.requestor import RequestorAssociation, RequestorConfig
from gateway.errors import AssociationAborted, AssociationRejected, PeerTimeout, PeerUnreachable
from gateway.mwl import (
    RIS_ABORTED,
    RIS_REJECTED,
    RIS_TIMED_OUT,
    RIS_UNREACHABLE,
    UNABLE_TO_PROCESS,
    Outcome,
    WorklistProxy,
    check_worklist,
    coerce_station_ae,
    decode,
    encode,
    failure_for,
    outcome_of,
    proposals_for,
    transcode,
)
from gateway.settings import Worklist

HOST = "127.0.0.1"
GATEWAY_AE = "DICOMGW"
RIS_AE = "RIS"
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
UTF8_NAME = "Müller^Zoë=ミュラー^ゾエ"
DEADLINE = 2.0
TODAY = date(2024, 3, 5)
WAIT = 20.0  # upper bound of any single wait in these tests


# --- the gateway under test ------------------------------------------------------------------------


class ProxyServices:
    """The smallest ``Services``: accept everyone, echo 0, no storage, find -> the proxy."""

    def __init__(self, proxy: WorklistProxy) -> None:
        self.proxy = proxy

    def check_calling(self, calling_ae: str, peer_ip: str) -> Rejection | None:
        return None

    def association_started(self, info: AssociationInfo) -> None:
        pass

    def association_ended(self, info: AssociationInfo, aborted: bool) -> None:
        pass

    def association_rejected(self, rejection: Rejection, calling_ae: str, peer_ip: str,
                             called_ae: str) -> None:
        pass

    def echo(self, info: AssociationInfo) -> int:
        return 0

    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink:
        raise NotImplementedError("no storage in worklist tests")

    def find(self, info: AssociationInfo, request: FindRequest) -> AsyncIterator[FindResponse]:
        return self.proxy.find(info, request)


@dataclass
class Observed:
    calls: list[tuple[str, Outcome, float | None, int]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, calling_ae: str, outcome: Outcome, seconds: float | None, results: int) -> None:
        self.calls.append((calling_ae, outcome, seconds, results))
        self.done.set()


@asynccontextmanager
async def gateway(upstream: Worklist, **options: Any) -> AsyncIterator[int]:
    """Run the acceptor with a WorklistProxy; yields the port it listens on."""
    proxy = WorklistProxy(upstream, calling_ae=GATEWAY_AE, **options)
    acceptor = Acceptor(AcceptorConfig(ae_title=GATEWAY_AE, worklist_enabled=True),
                        ProxyServices(proxy))
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(acceptor.serve, HOST, 0)
        try:
            yield port
        finally:
            await acceptor.drain(5.0)  # let the associations in flight end before the loop does
            tg.cancel_scope.cancel()


def worklist(port: int, ae_title: str = RIS_AE, **options: Any) -> Worklist:
    settings: dict[str, Any] = {"connect_timeout": 5.0, "dimse_timeout": 30.0, "deadline": 10.0}
    return Worklist(ae_title=ae_title, host=HOST, port=port, **{**settings, **options})


# --- the modality (our own requestor) -------------------------------------------------------------


@dataclass
class Answer:
    results: list[bytes]
    status: int
    comment: str


async def modality_query(port: int, query: Dataset | bytes, *, syntax: str = EXPLICIT_LE,
                         calling_ae: str = "US_ROOM1") -> Answer:
    config = RequestorConfig(calling_ae, connect_timeout=5.0, dimse_timeout=WAIT)
    proposal = ContextProposal(1, MODALITY_WORKLIST_FIND, (syntax,))
    assoc = await RequestorAssociation.open(HOST, port, GATEWAY_AE, [proposal], config)
    try:
        context = assoc.context_for(MODALITY_WORKLIST_FIND, [syntax])
        assert context is not None
        identifier = query if isinstance(query, bytes) else encode(query, syntax)
        results: list[bytes] = []
        async for command, dataset in assoc.find(context, identifier):
            if command.status in (dimse.PENDING, dimse.PENDING_WARNING):
                assert dataset is not None
                results.append(dataset)
            else:
                await assoc.release()
                assert command.status is not None
                return Answer(results, command.status, command.error_comment)
        raise AssertionError("no final response")
    finally:
        assoc.abort()


async def direct_query(port: int, called_ae: str, query: Dataset, *,
                       syntax: str = EXPLICIT_LE) -> list[bytes]:
    """The same query straight to the RIS, for a byte comparison."""
    config = RequestorConfig("US_ROOM1", connect_timeout=5.0, dimse_timeout=WAIT)
    assoc = await RequestorAssociation.open(
        HOST, port, called_ae, [ContextProposal(1, MODALITY_WORKLIST_FIND, (syntax,))], config)
    try:
        context = assoc.context_for(MODALITY_WORKLIST_FIND, [syntax])
        assert context is not None
        results = [dataset async for command, dataset in assoc.find(context, encode(query, syntax))
                   if command.status == dimse.PENDING and dataset is not None]
        await assoc.release()
        return results
    finally:
        assoc.abort()


async def gateway_echo(port: int) -> int:
    config = RequestorConfig("US_ROOM9", connect_timeout=5.0, dimse_timeout=5.0)
    assoc = await RequestorAssociation.open(
        HOST, port, GATEWAY_AE, [ContextProposal(1, VERIFICATION, (IMPLICIT_LE,))], config)
    try:
        status = await assoc.echo()
        await assoc.release()
        return status
    finally:
        assoc.abort()


# --- worklist items and queries --------------------------------------------------------------------


def step(station_ae: str = "", start_date: str = "") -> Dataset:
    item = Dataset()
    item.Modality = ""
    item.ScheduledStationAETitle = station_ae
    item.ScheduledProcedureStepStartDate = start_date
    item.ScheduledProcedureStepStartTime = ""
    item.ScheduledProcedureStepDescription = ""
    item.ScheduledProcedureStepID = ""
    return item


def mwl_query(station_ae: str = "", *, charset: bool = True) -> Dataset:
    query = Dataset()
    if charset:
        query.SpecificCharacterSet = ""
    query.PatientName = ""
    query.PatientID = ""
    query.PatientBirthDate = ""
    query.AccessionNumber = ""
    query.StudyInstanceUID = ""
    query.RequestedProcedureDescription = ""
    query.ScheduledProcedureStepSequence = DicomSequence([step(station_ae)])
    return query


def named_item(name: str, charset: str | list[str], accession: str) -> Dataset:
    item = demo_worklist(TODAY, station_ae="US_ROOM1", n=1)[0]
    item.SpecificCharacterSet = charset
    item.PatientName = name
    item.AccessionNumber = accession
    item.PatientBirthDate = ""  # an empty (type 2) key, returned empty
    return item


def rich_answer(index: int) -> Dataset:
    """What a RIS may send: charsets, an empty key, nested sequences, private tags."""
    item = named_item(JAPANESE_NAME if index % 2 else UTF8_NAME,
                      ["", "ISO 2022 IR 87"] if index % 2 else "ISO_IR 192", f"ACC{index:05d}")
    block = item.private_block(0x0029, "DICOMGW TEST", create=True)
    block.add_new(0x01, "LO", f"private {index}")
    block.add_new(0x02, "OB", bytes(range(8)))
    return item


# --- test-local RIS peers --------------------------------------------------------------------------


def _nodelay(event: PynetdicomEvent) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


Handler = Callable[["PynetdicomRIS", PynetdicomEvent], Iterator[tuple[int, Dataset | None]]]


class PynetdicomRIS:
    """A RIS on pynetdicom (its own threads) whose C-FIND generator is ``handler``."""

    def __init__(self, handler: Handler, *, ae_title: str = RIS_AE,
                 syntaxes: tuple[str, ...] = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)) -> None:
        self.handler = handler
        self.queries: list[Dataset] = []
        self.cancel_arrived = threading.Event()
        self.saw_cancel = threading.Event()
        self.release = threading.Event()  # a blocked handler waits for this
        self.find_started = threading.Event()
        self.released = threading.Event()  # an association to this RIS was released
        self.closed = threading.Event()  # a connection to this RIS was closed (release or abort)
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.maximum_pdu_size = 256 * 1024
        ae.add_supported_context(MODALITY_WORKLIST_FIND, list(syntaxes))
        ae.add_supported_context(VERIFICATION)
        handlers: list[EventHandlerType] = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_CONN_OPEN, _nodelay),
                    (evt.EVT_DIMSE_RECV, self._on_dimse),
                    (evt.EVT_RELEASED, lambda event: self.released.set()),
                    (evt.EVT_CONN_CLOSE, lambda event: self.closed.set())]
        server = ae.start_server((HOST, 0), block=False, evt_handlers=handlers)
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server
        self.port: int = server.server_address[1]

    def _on_dimse(self, event: PynetdicomEvent) -> None:
        if type(event.message).__name__ == "C_CANCEL_RQ":
            self.cancel_arrived.set()

    def _on_find(self, event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        self.queries.append(event.identifier)
        self.find_started.set()
        yield from self.handler(self, event)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def ris_factory() -> Iterator[Callable[..., PynetdicomRIS]]:
    started: list[PynetdicomRIS] = []

    def start(handler: Handler, **options: Any) -> PynetdicomRIS:
        ris = PynetdicomRIS(handler, **options)
        started.append(ris)
        return ris

    yield start
    for ris in started:
        ris.close()


def answers(items: list[Dataset]) -> Handler:
    def handler(ris: PynetdicomRIS, event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        for item in items:
            yield 0xFF00, item
        yield 0x0000, None

    return handler


@asynccontextmanager
async def raw_ris(on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                          Any]) -> AsyncIterator[int]:
    server = await asyncio.start_server(on_connection, HOST, 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    pdu_type, length = pdu.HEADER.unpack(await reader.readexactly(6))
    return pdu_type, await reader.readexactly(length)


async def accept_association(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _, body = await read_pdu(reader)
    rq = pdu.decode_associate_rq(body)
    results = tuple(pdu.ContextResult(c.id, 0, c.transfer_syntaxes[0]) for c in rq.contexts)
    writer.write(pdu.encode_associate_ac(pdu.AssociateAC(
        rq.called_ae, rq.calling_ae, pdu.APPLICATION_CONTEXT, results, pdu.UserInfo(65536))))
    await writer.drain()


# --- pure parts --------------------------------------------------------------------------------------


def test_proposals_put_the_modality_syntax_alone_first() -> None:
    implicit = proposals_for(IMPLICIT_LE)
    assert [(p.id, p.transfer_syntaxes) for p in implicit] == [(1, (IMPLICIT_LE,)), (3, (EXPLICIT_LE,))]
    explicit = proposals_for(EXPLICIT_LE)
    assert [(p.id, p.transfer_syntaxes) for p in explicit] == [(1, (EXPLICIT_LE,)), (3, (IMPLICIT_LE,))]
    big = proposals_for(EXPLICIT_BE)
    assert [p.transfer_syntaxes for p in big] == [(EXPLICIT_BE,), (EXPLICIT_LE, IMPLICIT_LE)]
    assert {p.abstract_syntax for p in big} == {MODALITY_WORKLIST_FIND}


def test_failures_name_the_cause_in_at_most_64_characters() -> None:
    upstream = Worklist(ae_title="RIS", host="a-very-long-host-name.radiology.example.org",
                        port=104, deadline=20, dimse_timeout=60, connect_timeout=10)
    cases = {
        PeerUnreachable("x", "connection_refused"): (RIS_UNREACHABLE, "RIS unreachable at a-very"),
        AssociationRejected(1, 1, 7): (RIS_REJECTED, "RIS rejected the association (1,1,7)"),
        TimeoutError(): (RIS_TIMED_OUT, "RIS did not answer within 20 s"),
        PeerTimeout("x"): (RIS_TIMED_OUT, "RIS did not answer within 60 s"),
        AssociationAborted("x"): (RIS_ABORTED, "RIS aborted the association"),
        KeyError("x"): (UNABLE_TO_PROCESS, "gateway internal error"),
    }
    for exc, (status, start) in cases.items():
        response = failure_for(exc, upstream)
        assert response.status == status and 0xC000 <= response.status <= 0xCFFF
        assert response.comment.startswith(start) and len(response.comment) <= 64
        assert response.identifier is None
    assert failure_for(PeerTimeout("x"), upstream, associated=False).comment.endswith("10 s")


def test_outcomes() -> None:
    assert outcome_of(0x0000, cancelled=False) == "success"
    assert outcome_of(0x0000, cancelled=True) == "cancelled"
    assert outcome_of(0xFE00, cancelled=False) == "cancelled"
    assert outcome_of(0xA700, cancelled=False) == "upstream_failure"


def test_coercion_fills_only_an_empty_station_ae_and_keeps_every_other_byte() -> None:
    query = mwl_query()
    query.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    query.PatientName = "Yamada*"
    for syntax in (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE):
        raw = encode(query, syntax)
        coerced = decode(coerce_station_ae(raw, syntax, "US_ROOM7"), syntax)
        assert coerced.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "US_ROOM7"
        del coerced.ScheduledProcedureStepSequence[0].ScheduledStationAETitle
        original = decode(raw, syntax)
        del original.ScheduledProcedureStepSequence[0].ScheduledStationAETitle
        assert coerced == original
    named = encode(mwl_query("CT_1"), EXPLICIT_LE)
    assert coerce_station_ae(named, EXPLICIT_LE, "US_ROOM7") == named
    without = mwl_query()
    del without.ScheduledProcedureStepSequence
    raw = encode(without, EXPLICIT_LE)
    assert coerce_station_ae(raw, EXPLICIT_LE, "US_ROOM7") == raw


def test_transcoding_keeps_the_dataset() -> None:
    item = rich_answer(1)
    raw = encode(item, EXPLICIT_LE)
    assert transcode(raw, EXPLICIT_LE, EXPLICIT_LE) is raw
    for target in (IMPLICIT_LE, EXPLICIT_BE):
        there = transcode(raw, EXPLICIT_LE, target)
        back = decode(transcode(there, target, EXPLICIT_LE), EXPLICIT_LE)
        assert str(back.PatientName) == JAPANESE_NAME
        assert back.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "US_ROOM1"


def forbid_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same syntax on both sides: the proxy must not decode or encode anything."""

    def forbidden(*args: object) -> Any:
        raise AssertionError("the proxy decoded or encoded a dataset on the pass-through path")

    monkeypatch.setattr(mwl, "decode", forbidden)
    monkeypatch.setattr(mwl, "encode", forbidden)


# --- against DCMTK wlmscpfs ------------------------------------------------------------------------


def wlmscpfs_items() -> list[Dataset]:
    items = demo_worklist(TODAY, station_ae="US_ROOM1", n=5)
    items.append(named_item(JAPANESE_NAME, ["", "ISO 2022 IR 87"], "JP0001"))
    items.append(named_item(UTF8_NAME, "ISO_IR 192", "UTF0001"))
    return items


@pytest.mark.peer
async def test_findscu_through_the_gateway_gets_what_it_gets_from_the_ris(
    worklist_scp: Callable[..., WorklistSCP], tmp_path: Path
) -> None:
    ris = worklist_scp(wlmscpfs_items(), ae_title=RIS_AE)
    observed = Observed()
    async with gateway(worklist(ris.port), observer=observed) as port:
        via, direct = tmp_path / "via", tmp_path / "direct"
        with anyio.fail_after(WAIT):
            proxied = await anyio.to_thread.run_sync(lambda: run_findscu_worklist(
                port, called_ae=GATEWAY_AE, calling_ae="US_ROOM1", out_dir=via,
                keys=mwl_query_keys()))
        assert proxied.returncode == 0, proxied.stdout + proxied.stderr
    with anyio.fail_after(WAIT):
        straight = await anyio.to_thread.run_sync(lambda: run_findscu_worklist(
            ris.port, called_ae=RIS_AE, calling_ae="US_ROOM1", out_dir=direct, keys=mwl_query_keys()))
    assert straight.returncode == 0, straight.stdout + straight.stderr

    def by_accession(answers: list[Dataset]) -> list[Dataset]:
        return sorted(answers, key=lambda ds: str(ds.AccessionNumber))

    got, expected = by_accession(read_findscu_results(via)), by_accession(read_findscu_results(direct))
    assert len(expected) == 7
    assert got == expected  # every element of every answer, sequences included
    assert {str(ds.PatientName) for ds in got} >= {JAPANESE_NAME, UTF8_NAME}
    assert observed.calls == [("US_ROOM1", "success", observed.calls[0][2], 7)]


@pytest.mark.peer
async def test_answers_are_relayed_byte_for_byte_in_both_character_sets(
    worklist_scp: Callable[..., WorklistSCP], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    ris = worklist_scp(wlmscpfs_items(), ae_title=RIS_AE)
    caplog.set_level(logging.DEBUG, logger="gateway")
    forbid_pydicom(monkeypatch)
    query = mwl_query()
    for syntax in (EXPLICIT_LE, IMPLICIT_LE):
        async with gateway(worklist(ris.port)) as port:
            with anyio.fail_after(WAIT):
                answer = await modality_query(port, query, syntax=syntax)
        with anyio.fail_after(WAIT):
            expected = await direct_query(ris.port, RIS_AE, query, syntax=syntax)
        assert answer.status == 0x0000
        assert answer.results == expected  # the bytes wlmscpfs sent, unchanged
        names = {str(decode(raw, syntax).PatientName) for raw in answer.results}
        assert {JAPANESE_NAME, UTF8_NAME} <= names
        japanese = next(raw for raw in answer.results if b"ISO 2022 IR 87" in raw)
        assert "山田".encode("iso2022_jp").replace(b"\x1b(B", b"") in japanese
    assert "US_ROOM1" in caplog.text and "success" in caplog.text
    for secret in ("Yamada", "Müller", "DEMO^", "DEMO-00", "JP0001", "UTF0001"):
        assert secret not in caplog.text


@pytest.mark.peer
async def test_check_worklist_against_wlmscpfs_and_a_closed_port(
    worklist_scp: Callable[..., WorklistSCP]
) -> None:
    ris = worklist_scp(wlmscpfs_items(), ae_title=RIS_AE)
    with anyio.fail_after(WAIT):
        ok, why = await check_worklist(worklist(ris.port), "DICOMGW")
    assert ok, why
    assert "C-ECHO" in why and "0 result(s)" in why

    closed = free_port()
    with anyio.fail_after(WAIT):
        ok, why = await check_worklist(worklist(closed), "DICOMGW")
    assert not ok
    assert f"nothing listens at {HOST}:{closed}" in why and "worklist.port" in why

    with anyio.fail_after(WAIT):
        ok, why = await check_worklist(worklist(ris.port, ae_title="NOT_THE_RIS"), "DICOMGW")
    assert not ok
    assert "worklist.ae_title" in why and "A-ASSOCIATE-RJ" in why


# --- against pynetdicom RIS peers ------------------------------------------------------------------


async def test_private_tags_empty_keys_and_sequences_pass_byte_for_byte(
    ris_factory: Callable[..., PynetdicomRIS], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [rich_answer(i) for i in range(4)]
    forbid_pydicom(monkeypatch)
    ris = ris_factory(answers(items))
    async with gateway(worklist(ris.port)) as port:
        with anyio.fail_after(WAIT):
            answer = await modality_query(port, mwl_query())
    with anyio.fail_after(WAIT):
        expected = await direct_query(ris.port, RIS_AE, mwl_query())
    assert answer.status == 0 and len(answer.results) == 4
    assert ris.released.wait(WAIT), "the gateway did not release its association to the RIS"
    assert answer.results == expected
    first = decode(answer.results[0], EXPLICIT_LE)
    assert first.PatientBirthDate == "" and "PatientBirthDate" in first
    assert first.private_block(0x0029, "DICOMGW TEST")[0x01].value == "private 0"
    assert str(decode(answer.results[1], EXPLICIT_LE).PatientName) == JAPANESE_NAME
    assert first.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue


async def test_a_long_worklist_streams_before_the_ris_has_finished(
    ris_factory: Callable[..., PynetdicomRIS]
) -> None:
    total = 2000
    item = named_item("STREAM^TEST", "ISO_IR 192", "STREAM")
    last_sent = threading.Event()

    def slow(ris: PynetdicomRIS, event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        for _ in range(total - 1):
            yield 0xFF00, item
        ris.release.wait(WAIT)  # the last one only after the modality has seen a result
        last_sent.set()
        yield 0xFF00, item
        yield 0x0000, None

    ris = ris_factory(slow)
    observed = Observed()
    async with gateway(worklist(ris.port), observer=observed) as port:
        config = RequestorConfig("US_ROOM1", dimse_timeout=WAIT)
        proposal = ContextProposal(1, MODALITY_WORKLIST_FIND, (EXPLICIT_LE,))
        assoc = await RequestorAssociation.open(HOST, port, GATEWAY_AE, [proposal], config)
        context = assoc.context_for(MODALITY_WORKLIST_FIND, [EXPLICIT_LE])
        assert context is not None
        received, final = 0, None
        with anyio.fail_after(WAIT):
            async for command, _ in assoc.find(context, encode(mwl_query(), EXPLICIT_LE)):
                if command.status != dimse.PENDING:
                    final = command.status
                    break
                if received == 0:
                    assert not last_sent.is_set(), "the first result came only after the last"
                    ris.release.set()
                received += 1
            await assoc.release()
            await observed.done.wait()
    assert final == 0x0000
    assert received == total
    assert observed.calls[0][1:2] == ("success",) and observed.calls[0][3] == total


def _cancel_after_first(port: int) -> tuple[list[int], int]:
    """A pynetdicom modality: C-FIND, C-CANCEL after the first pending result; returns
    (every status received, pending results received)."""
    ae = AE(ae_title="US_ROOM3")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(MODALITY_WORKLIST_FIND, EXPLICIT_LE)
    assoc = ae.associate(HOST, port, ae_title=GATEWAY_AE, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    statuses, pending, cancelled = [], 0, False
    try:
        for status, _ in assoc.send_c_find(mwl_query(), MODALITY_WORKLIST_FIND, msg_id=7):
            statuses.append(int(status.Status))
            if status.Status == 0xFF00:
                pending += 1
                if not cancelled:
                    assoc.send_c_cancel(7, context_id)
                    cancelled = True
    finally:
        assoc.release()
    return statuses, pending


async def test_c_cancel_from_the_modality_reaches_the_ris_and_ends_with_fe00(
    ris_factory: Callable[..., PynetdicomRIS]
) -> None:
    item = named_item("CANCEL^TEST", "ISO_IR 192", "CANCEL")

    def until_cancelled(ris: PynetdicomRIS,
                        event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, item
        ris.cancel_arrived.wait(WAIT)  # hold the rest until a C-CANCEL has arrived
        for _ in range(500):
            if event.is_cancelled:
                ris.saw_cancel.set()
                yield 0xFE00, None
                return
            yield 0xFF00, item
        yield 0x0000, None

    ris = ris_factory(until_cancelled)
    observed = Observed()
    async with gateway(worklist(ris.port), observer=observed) as port:
        with anyio.fail_after(WAIT):
            statuses, pending = await anyio.to_thread.run_sync(_cancel_after_first, port)
            await observed.done.wait()
    assert ris.saw_cancel.is_set(), "the RIS never saw the C-CANCEL"
    assert statuses[-1] == 0xFE00
    assert pending == 1  # nothing forwarded after the cancel
    assert observed.calls[0][1] == "cancelled"


async def test_a_cancel_between_responses_is_sent_upstream_at_once(
    ris_factory: Callable[..., PynetdicomRIS]
) -> None:
    """The RIS sends one result and then nothing until it sees a cancel: only a cancel raced
    against the next response (not checked when a response arrives) can end this query."""
    item = named_item("CANCEL^TEST", "ISO_IR 192", "CANCEL")

    def silent_until_cancel(ris: PynetdicomRIS,
                            event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, item
        ris.cancel_arrived.wait(WAIT)
        yield 0xFE00, None

    ris = ris_factory(silent_until_cancel)
    async with gateway(worklist(ris.port, deadline=WAIT)) as port:
        with anyio.fail_after(WAIT / 2):
            statuses, pending = await anyio.to_thread.run_sync(_cancel_after_first, port)
    assert ris.cancel_arrived.is_set()
    assert statuses == [0xFF00, 0xFE00] and pending == 1


async def test_a_modality_that_aborts_mid_stream_ends_the_upstream_association(
    ris_factory: Callable[..., PynetdicomRIS]
) -> None:
    item = named_item("ABORT^TEST", "ISO_IR 192", "ABORT")

    def one_then_wait(ris: PynetdicomRIS, event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, item
        ris.release.wait(WAIT)
        yield 0x0000, None

    ris = ris_factory(one_then_wait)
    observed = Observed()
    async with gateway(worklist(ris.port, deadline=WAIT), observer=observed) as port:
        config = RequestorConfig("US_ROOM4", dimse_timeout=WAIT)
        proposal = ContextProposal(1, MODALITY_WORKLIST_FIND, (EXPLICIT_LE,))
        assoc = await RequestorAssociation.open(HOST, port, GATEWAY_AE, [proposal], config)
        context = assoc.context_for(MODALITY_WORKLIST_FIND, [EXPLICIT_LE])
        assert context is not None
        with anyio.fail_after(WAIT):
            responses = assoc.find(context, encode(mwl_query(), EXPLICIT_LE))
            command, _ = await anext(responses)
            assert command.status == dimse.PENDING
            assoc.abort()
            await observed.done.wait()
            assert await anyio.to_thread.run_sync(ris.closed.wait, WAIT), "upstream left open"
    assert not ris.released.is_set()  # aborted, not released: the RIS was still answering
    assert observed.calls[0][1] == "cancelled" and observed.calls[0][3] == 1


async def test_coercion_fills_the_station_ae_with_the_calling_ae(
    ris_factory: Callable[..., PynetdicomRIS]
) -> None:
    ris = ris_factory(answers([]))
    async with gateway(worklist(ris.port, coerce_station_ae=True)) as port:
        with anyio.fail_after(WAIT):
            coerced = await modality_query(port, mwl_query(), calling_ae="US_ROOM7")
            named = await modality_query(port, mwl_query("CT_1"), calling_ae="US_ROOM7")
    async with gateway(worklist(ris.port)) as port:
        with anyio.fail_after(WAIT):
            plain = await modality_query(port, mwl_query(), calling_ae="US_ROOM7")
    assert coerced.status == named.status == plain.status == 0
    stations = [q.ScheduledProcedureStepSequence[0].ScheduledStationAETitle for q in ris.queries]
    assert stations == ["US_ROOM7", "CT_1", ""]


async def test_a_ris_that_accepts_another_syntax_gets_a_transcoded_query(
    ris_factory: Callable[..., PynetdicomRIS]
) -> None:
    items = [rich_answer(i) for i in range(3)]
    ris = ris_factory(answers(items), syntaxes=(EXPLICIT_LE,))
    query = mwl_query()
    query.PatientName = "Yamada*"
    async with gateway(worklist(ris.port)) as port:
        with anyio.fail_after(WAIT):
            answer = await modality_query(port, query, syntax=IMPLICIT_LE)
    assert answer.status == 0
    assert str(ris.queries[0].PatientName) == "Yamada*"
    got = [decode(raw, IMPLICIT_LE) for raw in answer.results]
    assert [str(ds.PatientName) for ds in got] == [str(i.PatientName) for i in items]
    assert [ds.AccessionNumber for ds in got] == [i.AccessionNumber for i in items]


async def test_the_calling_ae_chooses_its_ris(ris_factory: Callable[..., PynetdicomRIS]) -> None:
    default = ris_factory(answers([named_item("DEFAULT^RIS", "ISO_IR 192", "D1")]))
    special = ris_factory(answers([named_item("SPECIAL^RIS", "ISO_IR 192", "S1")]), ae_title="RIS2")
    overrides = {"US_ROOM2": worklist(special.port, ae_title="RIS2")}
    async with gateway(worklist(default.port), upstreams_by_calling_ae=overrides) as port:
        with anyio.fail_after(WAIT):
            one = await modality_query(port, mwl_query(), calling_ae="US_ROOM1")
            two = await modality_query(port, mwl_query(), calling_ae="US_ROOM2")
    assert [decode(r, EXPLICIT_LE).AccessionNumber for r in one.results] == ["D1"]
    assert [decode(r, EXPLICIT_LE).AccessionNumber for r in two.results] == ["S1"]


async def test_a_ris_failure_status_is_passed_through(ris_factory: Callable[..., PynetdicomRIS]) -> None:
    item = named_item("PARTIAL^RESULT", "ISO_IR 192", "P1")

    def refusing(ris: PynetdicomRIS, event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, item
        yield 0xA700, None

    ris = ris_factory(refusing)
    observed = Observed()
    async with gateway(worklist(ris.port), observer=observed) as port:
        with anyio.fail_after(WAIT):
            answer = await modality_query(port, mwl_query())
            await observed.done.wait()
    assert answer.status == 0xA700 and len(answer.results) == 1
    assert observed.calls[0][1] == "upstream_failure"


# --- a RIS that is down, silent, rejecting or aborting ---------------------------------------------


async def _failing_query(upstream: Worklist, started: asyncio.Event | threading.Event | None,
                         ) -> tuple[Answer, int, Observed]:
    """Query through the gateway; once the RIS holds the query (``started``), C-ECHO the gateway."""
    observed = Observed()
    async with gateway(upstream, observer=observed) as port:
        with anyio.fail_after(WAIT):
            query = asyncio.ensure_future(modality_query(port, mwl_query()))
            if isinstance(started, asyncio.Event):
                await started.wait()
            elif isinstance(started, threading.Event):
                await anyio.to_thread.run_sync(started.wait, WAIT)
            echo = await gateway_echo(port)
            if started is not None:
                assert not query.done(), "the query ended before the RIS timed out"
            answer = await query
            await observed.done.wait()
    return answer, echo, observed


async def test_a_ris_that_is_down(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.mwl")
    port = free_port()
    answer, echo, observed = await _failing_query(worklist(port, deadline=DEADLINE), None)
    assert (answer.status, answer.comment) == (RIS_UNREACHABLE, f"RIS unreachable at {HOST}:{port}")
    assert echo == 0
    assert observed.calls[0][1] == "upstream_failure" and observed.calls[0][3] == 0
    assert "upstream_failure" in caplog.text


async def test_a_ris_that_accepts_tcp_and_never_answers() -> None:
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        while await reader.read(65536):
            pass
        writer.close()

    async with raw_ris(silent) as ris_port:
        answer, echo, _ = await _failing_query(worklist(ris_port, deadline=DEADLINE), connected)
    assert (answer.status, answer.comment) == (RIS_TIMED_OUT, "RIS did not answer within 2 s")
    assert echo == 0


async def test_a_ris_whose_find_never_answers(ris_factory: Callable[..., PynetdicomRIS]) -> None:
    def blocked(ris: PynetdicomRIS, event: PynetdicomEvent) -> Iterator[tuple[int, Dataset | None]]:
        ris.release.wait(WAIT)
        yield 0x0000, None

    ris = ris_factory(blocked)
    answer, echo, observed = await _failing_query(worklist(ris.port, deadline=DEADLINE),
                                                  ris.find_started)
    assert (answer.status, answer.comment) == (RIS_TIMED_OUT, "RIS did not answer within 2 s")
    assert echo == 0
    assert observed.calls[0][1] == "upstream_failure"


async def test_a_ris_that_aborts_mid_query() -> None:
    got_query = asyncio.Event()

    async def aborting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_association(reader, writer)
        await read_pdu(reader)  # the C-FIND-RQ
        got_query.set()
        writer.write(pdu.encode_abort())
        await writer.drain()
        writer.close()

    async with raw_ris(aborting) as ris_port:
        answer, echo, _ = await _failing_query(worklist(ris_port, deadline=DEADLINE), None)
    assert got_query.is_set()
    assert (answer.status, answer.comment) == (RIS_ABORTED, "RIS aborted the association")
    assert echo == 0


async def test_a_ris_that_rejects_us(ris_factory: Callable[..., PynetdicomRIS]) -> None:
    ris = ris_factory(answers([]))
    answer, _, _ = await _failing_query(worklist(ris.port, ae_title="WRONG_AE", deadline=DEADLINE),
                                        None)
    assert (answer.status, answer.comment) == (RIS_REJECTED, "RIS rejected the association (1,1,7)")


async def test_a_ris_without_the_worklist_sop_class() -> None:
    async def no_worklist(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_pdu(reader)
        rq = pdu.decode_associate_rq(body)
        results = tuple(pdu.ContextResult(c.id, 3) for c in rq.contexts)
        writer.write(pdu.encode_associate_ac(pdu.AssociateAC(
            rq.called_ae, rq.calling_ae, pdu.APPLICATION_CONTEXT, results, pdu.UserInfo(65536))))
        await writer.drain()
        while await reader.read(65536):
            pass

    async with raw_ris(no_worklist) as ris_port:
        answer, _, _ = await _failing_query(worklist(ris_port, deadline=DEADLINE), None)
    assert answer.status == RIS_REJECTED
    assert answer.comment == "RIS does not accept worklist queries"
