"""The channel's receive buffer on a real loopback socket: bodies are lent without copies, a lent
body is never overwritten while more PDUs arrive, reading pauses under back-pressure and resumes,
and a PDU larger than the buffer grows it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.dicom import pdu
from gateway.dicom.channel import INITIAL_BUFFER, Channel, PduProtocol, receive_capacity
from gateway.dicom.fsm import Action, State
from gateway.errors import AssociationAborted, PeerTimeout

HOST = "127.0.0.1"
WAIT = 10.0
MAX_PDU = 4096


def pdata(index: int, size: int = MAX_PDU - 6) -> bytes:
    """A P-DATA-TF PDU whose data bytes all equal ``index % 256``."""
    return pdu.encode_pdata(1, 0x00, bytes([index % 256]) * size)




@pytest.fixture
async def connect() -> AsyncIterator[Callable[[State], asyncio.Task[tuple[Channel, asyncio.StreamWriter]]]]:
    """A server channel (ours) and a client stream writer (the peer) on loopback."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[PduProtocol] = asyncio.Queue()
    server = await loop.create_server(
        lambda: PduProtocol(receive_capacity(MAX_PDU), accepted.put_nowait), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    writers: list[asyncio.StreamWriter] = []

    async def pair(state: State) -> tuple[Channel, asyncio.StreamWriter]:
        _, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
        async with asyncio.timeout(WAIT):
            protocol = await accepted.get()
        return Channel(protocol, max_pdu=MAX_PDU, state=state), writer

    yield lambda state: asyncio.ensure_future(pair(state))
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_lent_body_survives_while_the_next_pdus_arrive_and_reading_pauses(
    connect: Callable[[State], asyncio.Task[tuple[Channel, asyncio.StreamWriter]]],
) -> None:
    channel, peer = await connect(State.STA6)
    count = 3 * receive_capacity(MAX_PDU) // MAX_PDU  # three buffers' worth
    peer.write(b"".join(pdata(i) for i in range(count)))

    _, first, action = await channel.read_pdu(WAIT)
    kept = first  # still lent: the protocol must neither move nor overwrite it
    protocol = channel.protocol
    async with asyncio.timeout(WAIT):
        while not protocol._reading_paused:  # event-driven: each wait returns when bytes arrive
            await protocol.wait_for_data()
    assert action is Action.DELIVER_DATA
    assert bytes(kept[6:]) == bytes([0]) * (MAX_PDU - 6)
    assert protocol.buffered <= receive_capacity(MAX_PDU)  # back-pressure bounded the buffer

    for index in range(1, count):
        _, body, _ = await channel.read_pdu(WAIT)
        ((context, control, fragment),) = pdu.iter_pdvs(body)
        assert (context, control, len(fragment)) == (1, 0, MAX_PDU - 6)
        assert fragment[0] == fragment[-1] == index % 256
    assert protocol.buffered == 0 and not protocol._reading_paused


async def test_an_association_pdu_larger_than_the_buffer_grows_it(
    connect: Callable[[State], asyncio.Task[tuple[Channel, asyncio.StreamWriter]]],
) -> None:
    channel, peer = await connect(State.STA2)
    size = 2 * receive_capacity(MAX_PDU)  # within MAX_ASSOCIATION_PDU, beyond the buffer
    payload = bytes(range(256)) * (size // 256)
    peer.write(pdu.HEADER.pack(pdu.ASSOCIATE_RQ, len(payload)) + payload)

    pdu_type, body, action = await channel.read_pdu(WAIT)

    assert (pdu_type, action) == (pdu.ASSOCIATE_RQ, Action.EVALUATE_RQ)
    assert bytes(body) == payload


async def test_a_buffered_pdu_is_read_at_once_and_a_partial_one_waits_until_its_timeout(
    connect: Callable[[State], asyncio.Task[tuple[Channel, asyncio.StreamWriter]]],
) -> None:
    channel, peer = await connect(State.STA6)
    second = pdata(2)
    peer.write(pdata(1) + pdata(3) + second[:100])
    await peer.drain()

    _, body, _ = await channel.read_pdu(WAIT)
    assert body[-1] == 1
    async with asyncio.timeout(WAIT):  # event-driven: each wait returns when bytes arrive
        while channel.protocol.buffered < len(pdata(3)) + 100:
            await channel.protocol.wait_for_data()
    _, body, _ = await channel.read_pdu(0)  # all of it is here: no wait, so no timeout either
    assert body[-1] == 3
    with pytest.raises(PeerTimeout, match="no PDU from"):
        await channel.read_pdu(0.2)  # the peer stopped mid-PDU

    peer.write(second[100:])  # the rest arrives late: the PDU is whole again
    _, body, action = await channel.read_pdu(WAIT)
    assert action is Action.DELIVER_DATA
    assert bytes(body) == second[6:]


async def test_a_connection_closed_mid_pdu_is_an_abort(
    connect: Callable[[State], asyncio.Task[tuple[Channel, asyncio.StreamWriter]]],
) -> None:
    channel, peer = await connect(State.STA6)
    peer.write(pdata(7)[:100])
    await peer.drain()
    peer.close()

    with pytest.raises(AssociationAborted):
        await channel.read_pdu(WAIT)


async def test_a_connection_that_only_associates_keeps_a_small_buffer(
    connect: Callable[[State], asyncio.Task[tuple[Channel, asyncio.StreamWriter]]],
) -> None:
    channel, peer = await connect(State.STA2)
    peer.write(pdu.HEADER.pack(pdu.ASSOCIATE_RQ, 300) + bytes(300))
    await channel.read_pdu(WAIT)

    assert len(channel.protocol._buffer) == INITIAL_BUFFER  # not the capacity it may grow to
