"""One DICOM connection: PDU framing over an asyncio transport, timeouts, and the state machine.

Both the acceptor and the requestor drive a ``Channel``. It never allocates what a peer merely
claims: a declared PDU length above the cap aborts the association before anything is read.

Receiving is the hot path of a gateway that takes in gigabytes, so ``PduProtocol`` is an
``asyncio.BufferedProtocol``: the kernel copies received bytes straight into one buffer and
``read_pdu`` returns each PDU body as a ``memoryview`` of it. No copy is made in Python (a stream
reader would make three: receive, append, slice). The body is **lent until the next ``read_pdu``**:
callers that keep bytes (a command, an identifier) copy them, the spool writes them to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from gateway.dicom import pdu
from gateway.dicom.fsm import TRANSITIONS, Action, Event, State, StateMachine
from gateway.errors import AssociationAborted, PeerTimeout, ProtocolError

# association PDUs (RQ/AC/RJ) carry at most 128 contexts with a few syntaxes each
MAX_ASSOCIATION_PDU = 1 << 20
# some peers count the PDV header in their PDU size; tolerate that much slack
PDU_SLACK = 64
# the kernel is offered at least this much room per receive (half the buffer while it is smaller)
MIN_RECEIVE = 256 * 1024
# a connection starts with this much buffer and grows it (doubling, up to its capacity) only as
# the PDUs it receives require: an echo, a rejected or a silent connection never holds more
INITIAL_BUFFER = 64 * 1024

_RECEIVED = {
    pdu.ASSOCIATE_RQ: Event.RQ_RECEIVED,
    pdu.ASSOCIATE_AC: Event.AC_RECEIVED,
    pdu.ASSOCIATE_RJ: Event.RJ_RECEIVED,
    pdu.P_DATA_TF: Event.DATA_RECEIVED,
    pdu.RELEASE_RQ: Event.RELEASE_RQ_RECEIVED,
    pdu.RELEASE_RP: Event.RELEASE_RP_RECEIVED,
    pdu.ABORT: Event.ABORT_RECEIVED,
}


class PduProtocol(asyncio.BufferedProtocol):
    """Receives into one buffer, reads it as PDUs, and applies flow control both ways.

    Buffer invariant: ``[_start, _end)`` holds received bytes not yet returned by ``read_pdu``.
    While a body is lent, bytes before ``_start`` may still be in use, so the buffer is never
    moved then: new bytes go after ``_end``; when that space runs low a bigger fresh buffer is
    started (the lent one stays alive with its view) until ``capacity`` is reached, and from then on
    reading pauses instead. ``read_pdu`` takes the loan back, then compacts and resumes.
    """

    def __init__(self, capacity: int,
                 on_connected: Callable[[PduProtocol], object] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._capacity = capacity  # the size the buffer grows to (a PDU bigger than it: more)
        self._buffer = bytearray(min(INITIAL_BUFFER, capacity))
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._lent = False
        self._reading_paused = False
        self._data = asyncio.Event()  # set when bytes arrive or the connection ends
        self._closed = asyncio.Event()  # connection_lost
        self._eof = False
        self._error: BaseException | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.discarding = False  # Sta13: drop whatever arrives

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.discarding and not self._lent:
            self._start = self._end = 0
        room = self._min_room()
        if len(self._buffer) - self._end < room:
            if not self._lent:
                self._make_room(room)
            elif len(self._buffer) < self._capacity:
                self._regrow(min(2 * len(self._buffer), self._capacity))
            elif self._end == len(self._buffer):  # paused at capacity, yet asked (TLS may)
                self._regrow(len(self._buffer) + room)
        return self._view[self._end :]

    def _min_room(self) -> int:
        return min(MIN_RECEIVE, len(self._buffer) // 2)

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._data.set()
        if (self._lent and not self._reading_paused and self.transport is not None
                and len(self._buffer) - self._end < self._min_room()
                and len(self._buffer) >= self._capacity):
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._data.set()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._data.set()
        self._writable.set()
        self._closed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- reading ---------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def take_back(self) -> None:
        """The caller is done with the last body: the buffer may move again."""
        self._lent = False
        if self._reading_paused and self.transport is not None:
            self._make_room(self._min_room())
            self._reading_paused = False
            self.transport.resume_reading()

    def peek_header(self) -> tuple[int, int] | None:
        if self._end - self._start < 6:
            return None
        pdu_type, length = pdu.HEADER.unpack_from(self._buffer, self._start)
        return pdu_type, length

    def take(self, length: int) -> memoryview | None:
        """The next ``length`` bytes, lent until ``take_back``; None until they have all arrived
        (room for them is made: ``length`` was checked against the cap by the caller)."""
        if self._end - self._start < length:
            if len(self._buffer) - self._start < length:
                self._make_room(length)
            return None
        body = self._view[self._start : self._start + length]
        self._start += length
        self._lent = True
        return body

    async def wait_for_data(self) -> None:
        """Until more bytes arrive; raises ConnectionError once the connection has ended."""
        if self._eof:
            raise ConnectionResetError(str(self._error) if self._error else "end of stream")
        self._data.clear()
        await self._data.wait()

    def _make_room(self, needed: int) -> None:
        """Make ``needed`` bytes of room after the unread bytes (which move to the front): in
        place when nothing is lent and it fits, else in a fresh buffer, twice as big up to the
        capacity (or as big as needed)."""
        unread = self._end - self._start
        if not self._lent and len(self._buffer) >= unread + needed:
            self._buffer[:unread] = self._view[self._start : self._end]
            self._start, self._end = 0, unread
        else:  # grow, or a body is lent: never overwrite it
            self._regrow(max(unread + needed, min(2 * len(self._buffer), self._capacity)))

    def _regrow(self, size: int) -> None:
        """Start a fresh buffer of ``size`` bytes (at least one free) holding the unread bytes;
        the old one lives on while a lent body still refers to it."""
        unread = self._end - self._start
        fresh = bytearray(max(size, unread + 1))
        fresh[:unread] = self._view[self._start : self._end]
        self._buffer, self._view = fresh, memoryview(fresh)
        self._start, self._end = 0, unread

    # -- writing ---------------------------------------------------------------------------

    async def wait_writable(self) -> None:
        if self._error is not None and self._closed.is_set():
            raise ConnectionResetError(str(self._error))
        await self._writable.wait()
        if self._closed.is_set():
            raise ConnectionResetError("the connection was closed")

    async def wait_closed(self) -> None:
        await self._closed.wait()


class Channel:
    """PDU-level I/O for one association. Not shared between tasks except for ``send``."""

    def __init__(self, protocol: PduProtocol, *, max_pdu: int, state: State) -> None:
        assert protocol.transport is not None
        self.protocol = protocol
        self.transport = protocol.transport
        self.max_pdu = max_pdu
        self.fsm = StateMachine(state)
        self.peer = _peer(self.transport)

    async def read_pdu(self, timeout: float | None) -> tuple[int, memoryview, Action]:
        """Read one PDU; returns (type, body, action the state machine asks for). The body is lent:
        it is valid until the next ``read_pdu``."""
        self.protocol.take_back()
        frame = self._take_pdu()
        if frame is None:  # not all here yet: only then is a timer armed (one per wait, not per PDU)
            frame = await self._await_pdu(timeout)
        pdu_type = frame[0]
        return pdu_type, frame[6:], self._fire_received(pdu_type)

    def _take_pdu(self) -> memoryview | None:
        """The next whole PDU (header included) if it has all arrived, else None."""
        header = self.protocol.peek_header()
        if header is None:
            return None
        pdu_type, length = header
        self._check_length(pdu_type, length)
        return self.protocol.take(6 + length)

    async def _await_pdu(self, timeout: float | None) -> memoryview:
        try:
            async with asyncio.timeout(timeout):
                while (frame := self._take_pdu()) is None:
                    await self.protocol.wait_for_data()
        except TimeoutError:
            raise PeerTimeout(f"no PDU from {self.peer} within {timeout:g} s") from None
        except ConnectionError as exc:
            if (self.fsm.state, Event.TRANSPORT_CLOSED) in TRANSITIONS:
                self.fsm.fire(Event.TRANSPORT_CLOSED)
            raise AssociationAborted(f"connection from {self.peer} closed: {exc!s}") from None
        return frame

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
        self.transport.write(data)

    async def drain(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.protocol.wait_writable()
        except TimeoutError:
            raise PeerTimeout(f"{self.peer} did not read what we sent within {timeout:g} s") from None
        except ConnectionError as exc:
            raise AssociationAborted(f"connection to {self.peer} lost: {exc!s}") from None

    def abort(self, source: int = pdu.ABORT_SOURCE_USER,
              reason: int = pdu.ABORT_REASON_NOT_SPECIFIED) -> None:
        """Send A-ABORT (best effort) and close."""
        if not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(pdu.encode_abort(source, reason))
        self.close()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    async def wait_closed(self, timeout: float) -> None:
        """Sta13: wait for the peer to close (ARTIM), discarding whatever comes."""
        self.protocol.take_back()
        self.protocol.discarding = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.protocol.wait_closed()
        self.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.protocol.wait_closed()


def receive_capacity(max_pdu: int) -> int:
    """What the buffer of a connection that accepts P-DATA PDUs up to ``max_pdu`` bytes may grow
    to: two whole PDUs plus room for a receive, so one can arrive while the other is handled."""
    return 2 * (max_pdu + PDU_SLACK + 6) + MIN_RECEIVE


def _peer(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unknown peer"
