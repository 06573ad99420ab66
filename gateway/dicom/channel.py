"""One DICOM connection: PDU framing over asyncio streams, timeouts, and the state machine.

Both the acceptor and the requestor drive a ``Channel``. It never allocates what a peer merely
claims: a declared PDU length above the cap aborts the association before anything is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from gateway.dicom import pdu
from gateway.dicom.fsm import TRANSITIONS, Action, Event, State, StateMachine
from gateway.errors import AssociationAborted, PeerTimeout, ProtocolError

# association PDUs (RQ/AC/RJ) carry at most 128 contexts with a few syntaxes each
MAX_ASSOCIATION_PDU = 1 << 20
# some peers count the PDV header in their PDU size; tolerate that much slack
PDU_SLACK = 64

_RECEIVED = {
    pdu.ASSOCIATE_RQ: Event.RQ_RECEIVED,
    pdu.ASSOCIATE_AC: Event.AC_RECEIVED,
    pdu.ASSOCIATE_RJ: Event.RJ_RECEIVED,
    pdu.P_DATA_TF: Event.DATA_RECEIVED,
    pdu.RELEASE_RQ: Event.RELEASE_RQ_RECEIVED,
    pdu.RELEASE_RP: Event.RELEASE_RP_RECEIVED,
    pdu.ABORT: Event.ABORT_RECEIVED,
}


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Channel:
    """PDU-level I/O for one association. Not shared between tasks except for ``send``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_pdu: int,
        state: State,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_pdu = max_pdu
        self.fsm = StateMachine(state)
        self.peer = _peer(writer)
        set_nodelay(writer)

    async def read_pdu(self, timeout: float | None) -> tuple[int, bytes, Action]:
        """Read one PDU; returns (type, body, action the state machine asks for)."""
        try:
            async with asyncio.timeout(timeout):
                header = await self.reader.readexactly(6)
                pdu_type, length = pdu.HEADER.unpack(header)
                self._check_length(pdu_type, length)
                body = await self.reader.readexactly(length)
        except TimeoutError:
            raise PeerTimeout(f"no PDU from {self.peer} within {timeout:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if (self.fsm.state, Event.TRANSPORT_CLOSED) in TRANSITIONS:
                self.fsm.fire(Event.TRANSPORT_CLOSED)
            raise AssociationAborted(f"connection from {self.peer} closed: {exc!s}") from None
        return pdu_type, body, self._fire_received(pdu_type)

    def _check_length(self, pdu_type: int, length: int) -> None:
        if pdu_type not in pdu.PDU_TYPES:
            raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02x}")
        cap = self.max_pdu + PDU_SLACK if pdu_type == pdu.P_DATA_TF else MAX_ASSOCIATION_PDU
        if length > cap:
            raise ProtocolError(f"PDU length {length} exceeds the limit of {cap} bytes")

    def _fire_received(self, pdu_type: int) -> Action:
        return self.fsm.fire(_RECEIVED[pdu_type])

    def fire(self, event: Event) -> Action:
        return self.fsm.fire(event)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)

    async def drain(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            raise PeerTimeout(f"{self.peer} did not read what we sent within {timeout:g} s") from None
        except ConnectionError as exc:
            raise AssociationAborted(f"connection to {self.peer} lost: {exc!s}") from None

    def abort(self, source: int = pdu.ABORT_SOURCE_USER,
              reason: int = pdu.ABORT_REASON_NOT_SPECIFIED) -> None:
        """Send A-ABORT (best effort) and close."""
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
                self.writer.write(pdu.encode_abort(source, reason))
        self.close()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def wait_closed(self, timeout: float) -> None:
        """Sta13: wait for the peer to close (ARTIM), reading and discarding whatever comes."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        self.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unknown peer"
