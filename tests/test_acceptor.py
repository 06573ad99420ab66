"""The gateway's acceptor under hostile and broken peers (PS3.8 upper layer robustness).

A real gateway runs in a thread (``GatewayThread``); peers are our own requestor, raw sockets and
pynetdicom. What happens inside the gateway is observed through its service hooks (an association
ended, a dataset fragment was written), turned into events the test waits on with a bound.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import GatewayThread
from pynetdicom import AE

import gateway.scp
from gateway.dicom import dimse, pdu
from gateway.dicom.events import AssociationInfo, DatasetSink, StoreRequest
from gateway.dicom.fsm import Action, Event
from gateway.dicom.requestor import NegotiatedContext, RequestorAssociation, RequestorConfig
from gateway.errors import AssociationAborted, AssociationRejected
from gateway.settings import Settings

HOST = "127.0.0.1"
GATEWAY_AE = "DICOMGW"
VERIFICATION = "1.2.840.10008.1.1"
US = "1.2.840.10008.5.1.4.1.1.6.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
PROPOSALS = (pdu.ContextProposal(1, VERIFICATION, (IMPLICIT,)),
             pdu.ContextProposal(3, US, (IMPLICIT,)))
WAIT = 10.0  # bound of every wait for something the gateway does
OBJECT_NAME = re.compile(r"^objects/[0-9a-f]{2}/[0-9a-f]{16}\.dcm$")


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)  # no rule files: everything is held in the spool
    values: dict[str, Any] = {
        "host": HOST, "port": 0, "http_port": 0, "spool_dir": tmp_path / "spool",
        "rules_dir": rules, "artim_timeout": 1.0, "network_timeout": 10.0,
        "shutdown_timeout": 2.0, "max_associations": 2, **overrides,
    }
    return Settings(**values)


class Watch:
    """Hooks into the running gateway's services; the test thread waits on what they saw."""

    def __init__(self, gw: GatewayThread, monkeypatch: pytest.MonkeyPatch) -> None:
        assert gw.gateway is not None and gw.gateway.acceptor is not None
        self._changed = threading.Condition()
        self.ended: list[bool] = []  # one entry per association end: was it aborted?
        self.fragments = 0
        self.begun = 0  # receptions started (each opens a spool file)
        services = gw.gateway.acceptor.services
        ended, begin = services.association_ended, services.begin_store

        def association_ended(info: AssociationInfo, aborted: bool) -> None:
            ended(info, aborted)
            self._bump(lambda: self.ended.append(aborted))

        def begin_store(info: AssociationInfo, request: StoreRequest) -> DatasetSink:
            self._bump(lambda: setattr(self, "begun", self.begun + 1))
            return _CountingSink(begin(info, request), self)

        monkeypatch.setattr(services, "association_ended", association_ended)
        monkeypatch.setattr(services, "begin_store", begin_store)

    def _bump(self, change: Callable[[], None]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()

    def fragment_written(self) -> None:
        self._bump(lambda: setattr(self, "fragments", self.fragments + 1))

    async def wait(self, predicate: Callable[[Watch], bool], timeout: float = WAIT) -> None:
        def block() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: predicate(self), timeout)

        if not await asyncio.to_thread(block):
            raise TimeoutError(f"gateway state not reached in {timeout} s: {vars(self)}")


class _CountingSink:
    def __init__(self, inner: DatasetSink, watch: Watch) -> None:
        self.inner, self.watch = inner, watch

    def write(self, data: memoryview) -> None:
        self.inner.write(data)
        self.watch.fragment_written()

    async def finish(self) -> tuple[int, str]:
        return await self.inner.finish()

    def abort(self) -> None:
        self.inner.abort()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayThread]:
    with GatewayThread(make_settings(tmp_path)) as gateway:
        yield gateway


@pytest.fixture
def watch(gw: GatewayThread, monkeypatch: pytest.MonkeyPatch) -> Watch:
    return Watch(gw, monkeypatch)


async def associate(port: int, called_ae: str = GATEWAY_AE,
                    proposals: tuple[pdu.ContextProposal, ...] = PROPOSALS) -> RequestorAssociation:
    return await RequestorAssociation.open(HOST, port, called_ae, proposals,
                                           RequestorConfig("TESTSCU", connect_timeout=5.0,
                                                           dimse_timeout=WAIT))


async def echo_works(port: int) -> None:
    assoc = await associate(port)
    try:
        assert await assoc.echo() == dimse.SUCCESS
    finally:
        await assoc.release()


def us_context(assoc: RequestorAssociation) -> NegotiatedContext:
    context = assoc.context_for(US, (IMPLICIT,))
    assert context is not None
    return context


def implicit_element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def small_dataset(sop_instance_uid: str, filler: int = 0) -> bytes:
    """An implicit VR LE US dataset, encoded by hand so that any UID (even a hostile one) fits."""
    return b"".join((
        implicit_element(0x00080016, US.encode()),
        implicit_element(0x00080018, sop_instance_uid.encode("utf-8", "surrogateescape")),
        implicit_element(0x00080060, b"US"),
        implicit_element(0x00100010, b"TEST^PATIENT"),
        implicit_element(0x00204000, b"x" * filler),  # Image Comments: bulk for a big dataset
    ))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def spool_files(spool: Path) -> list[str]:
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())


async def held_count(gw: GatewayThread) -> int:
    assert gw.gateway is not None
    spool = gw.gateway.spool
    return await asyncio.to_thread(gw.call, spool.held_count)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = WAIT) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()


# ------------------------------------------------------------------------ association control



async def expect_provider_abort(assoc: RequestorAssociation) -> None:
    """The next PDU is an A-ABORT from the gateway (source: service provider); then hang up."""
    _, body, action = await assoc.channel.read_pdu(WAIT)
    assoc.channel.close()
    assert action is Action.ABORT_INDICATION
    assert pdu.decode_abort(body)[0] == pdu.ABORT_SOURCE_PROVIDER

async def test_a_wrong_called_ae_title_is_rejected_1_1_7_and_counted(gw: GatewayThread) -> None:
    with pytest.raises(AssociationRejected) as raised:
        await associate(gw.port, called_ae="NOT_THE_GATEWAY")
    assert (raised.value.result, raised.value.source, raised.value.reason) == (1, 1, 7)
    assert gw.gateway is not None
    assert gw.gateway.registry.get_sample_value("dicomgw_association_rejects_total",
                                                {"reason": "called_ae"}) == 1.0
    await echo_works(gw.port)


def test_pynetdicom_sees_the_a_associate_rj_for_a_wrong_called_ae(gw: GatewayThread) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, gw.port, ae_title="WRONG_AE")
    assert assoc.is_rejected
    answer = assoc.acceptor.primitive
    assert answer is not None
    assert (answer.result, answer.result_source, answer.diagnostic) == (1, 1, 7)


async def test_one_association_too_many_is_rejected_2_3_2_promptly_and_a_slot_frees_up(
    gw: GatewayThread, watch: Watch
) -> None:
    first, second = await associate(gw.port), await associate(gw.port)
    try:
        with pytest.raises(AssociationRejected) as raised:
            async with asyncio.timeout(5):
                await associate(gw.port)
        assert (raised.value.result, raised.value.source, raised.value.reason) == (2, 3, 2)
        assert await second.echo() == dimse.SUCCESS  # the two held associations still work

        await first.release()
        await watch.wait(lambda w: len(w.ended) == 1)
        third = await associate(gw.port)
        assert await third.echo() == dimse.SUCCESS
        await third.release()
    finally:
        await second.release()
        first.abort()
    assert watch.ended[0] is False  # a release is not an abort


# ------------------------------------------------------------------------------ hostile UIDs


@pytest.mark.parametrize(
    "uid",
    ["../../x", "/etc/x", "1." + "2" * 198, "1.2\x00/../../x", "..", "a\\b", "x" * 64 + "/" + "y",
     "1." + "9" * 65_000],
    ids=["dotdot", "absolute", "200-chars", "nul", "bare-dotdot", "backslash", "slash-inside",
         "65000-chars"],
)
async def test_hostile_sop_instance_uids_never_name_a_file(
    gw: GatewayThread, tmp_path: Path, uid: str
) -> None:
    spool = tmp_path / "spool"
    outside_before = {p for p in tmp_path.rglob("*") if spool not in p.parents}
    cwd_before = set(os.listdir())

    assoc = await associate(gw.port)
    try:
        response = await assoc.store_bytes(us_context(assoc), US, uid, small_dataset(uid))
    finally:
        await assoc.release()

    assert response.status == dimse.SUCCESS  # a UID is a value, stored as given
    assert {p for p in tmp_path.rglob("*") if spool not in p.parents} == outside_before
    assert set(os.listdir()) == cwd_before
    assert not Path("/etc/x").exists()
    new_files = [f for f in spool_files(spool) if f.startswith("objects/")]
    assert len(new_files) == 1 and OBJECT_NAME.match(new_files[0]), new_files
    assert spool_files(spool / "tmp") == []
    assert gw.gateway is not None
    spool_api = gw.gateway.spool
    (item,) = await asyncio.to_thread(gw.call, lambda: spool_api.held_items(10))
    assert item.sop_instance_uid == uid
    assert item.path.read_bytes()[item.dataset_offset:] == small_dataset(uid)
    await echo_works(gw.port)


# ----------------------------------------------------------------------- broken associations


async def test_a_c_store_request_without_a_dataset_is_aborted_before_any_spool_file(
    gw: GatewayThread, watch: Watch
) -> None:
    assoc = await associate(gw.port)
    context = us_context(assoc)
    command = dimse.encode_command({0x0002: US, 0x0100: dimse.C_STORE_RQ, 0x0110: 1,
                                    0x0700: 0, 0x0800: dimse.NO_DATASET, 0x1000: "1.2.3.4"})
    assoc.channel.fire(Event.LOCAL_DATA)
    assoc.channel.send(pdu.encode_pdata(context.id, 0x03, command))
    await assoc.channel.drain(WAIT)
    await expect_provider_abort(assoc)
    await watch.wait(lambda w: len(w.ended) == 1)
    assert watch.begun == 0  # refused before a reception (and its spool file) began


@pytest.mark.parametrize("how", ["a-abort", "tcp-close"])
async def test_an_association_ended_mid_dataset_leaves_no_trace(
    gw: GatewayThread, watch: Watch, tmp_path: Path, how: str
) -> None:
    spool = tmp_path / "spool"
    dataset = small_dataset("1.2.826.0.1.3680043.8.498.77", filler=200_000)
    assoc = await associate(gw.port)
    context = us_context(assoc)
    assoc.channel.fire(Event.LOCAL_DATA)
    assoc.channel.send(pdu.encode_pdata(context.id, 0x03,
                                        dimse.store_rq(1, US, "1.2.826.0.1.3680043.8.498.77")))
    assoc.channel.send(pdu.encode_pdata(context.id, 0x00, dataset[: len(dataset) // 2]))
    await assoc.channel.drain(WAIT)
    await watch.wait(lambda w: w.fragments >= 1)
    assert len(spool_files(spool / "tmp")) == 1  # the partial object exists: not a vacuous test

    if how == "a-abort":
        assoc.abort()
    else:
        assoc.channel.close()
    await watch.wait(lambda w: len(w.ended) == 1)

    assert watch.ended == [True]
    assert spool_files(spool / "tmp") == []
    assert [f for f in spool_files(spool) if f.startswith("objects/")] == []
    assert await held_count(gw) == 0
    await echo_works(gw.port)


async def test_a_silent_peer_is_dropped_by_the_artim_timer_and_blocks_nobody(
    gw: GatewayThread, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.dicom")
    reader, writer = await asyncio.open_connection(HOST, gw.port)
    try:
        await echo_works(gw.port)  # served while the silent connection is open
        assert await read_until_closed(reader) == b""  # closed, nothing sent
    finally:
        writer.close()
    assert "ARTIM expired" in caplog.text  # the timer closed it (artim_timeout is 1 s)


async def test_a_request_that_trickles_and_stops_is_dropped_by_the_artim_timer(
    gw: GatewayThread, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.dicom")
    reader, writer = await asyncio.open_connection(HOST, gw.port)
    try:
        writer.write(pdu.HEADER.pack(pdu.ASSOCIATE_RQ, 500) + b"\x00\x01\x00\x00DICO")
        assert await read_until_closed(reader) == b""
    finally:
        writer.close()
    assert "ARTIM expired" in caplog.text  # the timer, not the partial request, ended it
    await echo_works(gw.port)


async def test_an_association_silent_for_network_timeout_is_aborted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.dicom")
    with GatewayThread(make_settings(tmp_path, network_timeout=1.0)) as gateway:
        assoc = await associate(gateway.port)
        assert await assoc.echo() == dimse.SUCCESS
        _, _, action = await assoc.channel.read_pdu(WAIT)  # we say nothing more
        assoc.channel.close()
        assert action is Action.ABORT_INDICATION
        assert "within 1 s" in caplog.text  # network_timeout, not anything else, ended it
        await echo_works(gateway.port)


async def test_a_pdata_pdu_over_the_negotiated_maximum_is_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with GatewayThread(make_settings(tmp_path, max_pdu=16384)) as gateway:
        watch = Watch(gateway, monkeypatch)
        assoc = await associate(gateway.port)
        context = us_context(assoc)
        assoc.channel.send(pdu.encode_pdata(context.id, 0x03, dimse.store_rq(1, US, "1.2.3")))
        assoc.channel.send(pdu.encode_pdata(context.id, 0x00, b"\0" * (16384 + 100)))
        await assoc.channel.drain(WAIT)
        await expect_provider_abort(assoc)
        await watch.wait(lambda w: len(w.ended) == 1)
        assert spool_files(tmp_path / "spool" / "tmp") == []


@pytest.mark.parametrize("when", ["first-pdu", "after-association"])
async def test_a_declared_pdu_length_of_4_gib_aborts_at_once_without_allocating(
    gw: GatewayThread, when: str
) -> None:
    rss_before = rss_bytes()
    huge = struct.pack(">BxL", pdu.P_DATA_TF, 0xFFFFFFFF)
    if when == "first-pdu":
        reader, writer = await asyncio.open_connection(HOST, gw.port)
        try:
            writer.write(struct.pack(">BxL", pdu.ASSOCIATE_RQ, 0xFFFFFFFF) + b"\0" * 1000)
            answer = await read_until_closed(reader, timeout=5.0)
        finally:
            writer.close()
        assert answer[:1] in (b"", bytes([pdu.ABORT]))
    else:
        assoc = await associate(gw.port)
        assoc.channel.send(huge + b"\0" * 1000)
        await assoc.channel.drain(WAIT)
        async with asyncio.timeout(5.0):
            _, body, action = await assoc.channel.read_pdu(5.0)
        assoc.channel.close()
        assert action is Action.ABORT_INDICATION
        assert pdu.decode_abort(body)[0] == pdu.ABORT_SOURCE_PROVIDER
    assert rss_bytes() - rss_before < 50 * 1024 * 1024
    await echo_works(gw.port)


async def test_http_sent_to_the_dicom_port_is_dropped(gw: GatewayThread) -> None:
    reader, writer = await asyncio.open_connection(HOST, gw.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await read_until_closed(reader, timeout=5.0)
    finally:
        writer.close()
    assert answer[:1] in (b"", bytes([pdu.ABORT]))
    assert b"HTTP" not in answer
    await echo_works(gw.port)


def _data_without_command(context: int) -> bytes:
    return pdu.encode_pdata(context, 0x02, b"dataset bytes nobody asked for")


def _command_on_unaccepted_context(context: int) -> bytes:
    return pdu.encode_pdata(99, 0x03, dimse.echo_rq(1))


def _second_associate_rq(context: int) -> bytes:
    return pdu.encode_associate_rq(pdu.AssociateRQ(GATEWAY_AE, "TESTSCU", pdu.APPLICATION_CONTEXT,
                                                   PROPOSALS))


def _unknown_pdu_type(context: int) -> bytes:
    return struct.pack(">BxL", 0x09, 4) + b"\0" * 4


def _find_on_a_storage_context(context: int) -> bytes:
    return pdu.encode_pdata(context, 0x03, dimse.find_rq(1, US))


def _truncated_pdv(context: int) -> bytes:
    return struct.pack(">BxL", pdu.P_DATA_TF, 8) + struct.pack(">LBB", 100, context, 3) + b"ab"


def _store_without_dataset(context: int) -> bytes:
    command = dimse.encode_command({0x0002: US, 0x0100: dimse.C_STORE_RQ, 0x0110: 1,
                                    0x0800: dimse.NO_DATASET, 0x1000: "1.2.3"})
    return pdu.encode_pdata(context, 0x03, command)


@pytest.mark.parametrize("violation", [
    _data_without_command, _command_on_unaccepted_context, _second_associate_rq, _unknown_pdu_type,
    _find_on_a_storage_context, _truncated_pdv, _store_without_dataset,
], ids=lambda f: f.__name__.strip("_"))
async def test_protocol_violations_abort_the_association_and_the_gateway_serves_on(
    gw: GatewayThread, watch: Watch, tmp_path: Path, violation: Callable[[int], bytes]
) -> None:
    assoc = await associate(gw.port)
    assoc.channel.send(violation(us_context(assoc).id))
    await assoc.channel.drain(WAIT)
    try:
        _, body, action = await assoc.channel.read_pdu(WAIT)
    except AssociationAborted:
        pass  # the connection was closed without an A-ABORT: also an abort
    else:
        assert action is Action.ABORT_INDICATION
        assert pdu.decode_abort(body)[0] == pdu.ABORT_SOURCE_PROVIDER
    finally:
        assoc.channel.close()
    await watch.wait(lambda w: len(w.ended) == 1)
    assert watch.ended == [True]
    assert spool_files(tmp_path / "spool" / "tmp") == []
    await echo_works(gw.port)


async def test_a_garbage_dataset_gets_a_failure_status_not_an_abort(
    gw: GatewayThread, tmp_path: Path
) -> None:
    assoc = await associate(gw.port, proposals=(
        pdu.ContextProposal(1, US, ("1.2.840.10008.1.2.1.99",)),  # deflated
        pdu.ContextProposal(3, US, (IMPLICIT,)),
    ))
    try:
        for context in assoc.contexts.values():
            response = await assoc.store_bytes(context, US, "1.2.3.4", os.urandom(5000))
            assert response.status == dimse.STORE_CANNOT_UNDERSTAND, context
        assert await held_count(gw) == 0
        assert spool_files(tmp_path / "spool" / "tmp") == []
    finally:
        await assoc.release()


async def test_an_internal_error_while_finishing_a_store_leaves_no_partial_file(
    gw: GatewayThread, watch: Watch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_finish(self: _CountingSink) -> tuple[int, str]:
        raise RuntimeError("a bug in a service")

    monkeypatch.setattr(_CountingSink, "finish", broken_finish)
    assoc = await associate(gw.port)
    try:
        with pytest.raises(AssociationAborted):  # the catch-all aborts the association
            await assoc.store_bytes(us_context(assoc), US, "1.2.3", small_dataset("1.2.3"))
    finally:
        assoc.channel.close()
    await watch.wait(lambda w: len(w.ended) == 1)
    assert spool_files(tmp_path / "spool" / "tmp") == []
    await echo_works(gw.port)


async def test_a_spooled_dataset_that_cannot_be_read_back_gets_a700(
    gw: GatewayThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(*args: object) -> object:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(gateway.scp, "read_header_file", unreadable)
    # an element of 70 KB before the SOP Class UID: the 64 KiB prefix cannot hold the header,
    # so ingest reads the temp file back
    big = implicit_element(0x00080001, b"\0" * 70_000) + small_dataset("1.2.3")
    assoc = await associate(gw.port)
    try:
        response = await assoc.store_bytes(us_context(assoc), US, "1.2.3", big)
        assert response.status == dimse.OUT_OF_RESOURCES
        assert await assoc.echo() == dimse.SUCCESS  # the association carries on
    finally:
        await assoc.release()
    assert spool_files(tmp_path / "spool" / "tmp") == []
    assert await held_count(gw) == 0


async def test_shutdown_aborts_associations_still_open_without_asyncio_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with GatewayThread(make_settings(tmp_path, shutdown_timeout=0.2)) as gateway:
        assoc = await associate(gateway.port)
        assert await assoc.echo() == dimse.SUCCESS
        await asyncio.to_thread(gateway.stop)  # drains for 0.2 s, then aborts the association
    await expect_provider_abort(assoc)
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
