"""The requestor: we call a PACS or the RIS, on the same upper layer as the acceptor.

``RequestorAssociation.open`` connects and negotiates; then ``echo``, ``store_file`` (streams a
spooled file's dataset bytes as they are, PDV by PDV, never holding the object in memory) and ``find``
(an async iterator of responses) run on it; ``release``/``abort`` end it. An association is used by one
task at a time, except ``send_cancel`` which may be called while ``find`` is iterating.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.dicom import dimse, pdu
from gateway.dicom.channel import Channel, PduProtocol, receive_capacity
from gateway.dicom.fsm import Action, Event, State
from gateway.dicom.sending import encode_message, fragment_size, send_message
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
)

MAX_RESPONSE_DATASET = 64 * 1024 * 1024
SEND_BLOCK = 256 * 1024  # dataset bytes framed and handed to the transport at once
MAX_SLOTS = 1024  # PDVs per block at most (IOV_MAX on Linux: the slots of one readv)


@dataclass(frozen=True, slots=True)
class RequestorConfig:
    calling_ae: str
    max_pdu: int = 262144
    connect_timeout: float = 10.0
    dimse_timeout: float = 60.0
    implementation_class_uid: str = "1.2.826.0.1.3680043.8.498.1.0.1"
    implementation_version: str = "DICOMGW_010"
    ssl: ssl.SSLContext | None = None  # DICOM TLS when set


@dataclass(frozen=True, slots=True)
class NegotiatedContext:
    id: int
    abstract_syntax: str
    transfer_syntax: str


class RequestorAssociation:
    def __init__(self, channel: Channel, config: RequestorConfig,
                 contexts: dict[int, NegotiatedContext], peer_max_pdu: int) -> None:
        self.channel = channel
        self.config = config
        self.contexts = contexts
        self.peer_max_pdu = peer_max_pdu
        self._message_id = 0
        self._inbox: collections.deque[tuple[dimse.Command, bytes | None]] = collections.deque()
        self._command = bytearray()
        self._dataset: bytearray | None = None
        self._current: dimse.Command | None = None

    @classmethod
    async def open(cls, host: str, port: int, called_ae: str,
                   proposals: Sequence[pdu.ContextProposal],
                   config: RequestorConfig) -> RequestorAssociation:
        protocol = await _connect(host, port, config)
        channel = Channel(protocol, max_pdu=config.max_pdu, state=State.STA4)
        try:
            return await cls._negotiate(channel, called_ae, proposals, config)
        except BaseException:
            channel.close()
            raise

    @classmethod
    async def _negotiate(cls, channel: Channel, called_ae: str,
                         proposals: Sequence[pdu.ContextProposal],
                         config: RequestorConfig) -> RequestorAssociation:
        channel.fire(Event.CONNECTED)
        channel.send(pdu.encode_associate_rq(pdu.AssociateRQ(
            called_ae, config.calling_ae, pdu.APPLICATION_CONTEXT, tuple(proposals),
            pdu.UserInfo(config.max_pdu, config.implementation_class_uid,
                         config.implementation_version))))
        await channel.drain(config.connect_timeout)
        _, body, action = await channel.read_pdu(config.connect_timeout)
        if action is Action.REJECTED:
            rj = pdu.decode_associate_rj(body)
            channel.close()
            raise AssociationRejected(rj.result, rj.source, rj.reason)
        if action is Action.ABORT_INDICATION:
            channel.close()
            raise AssociationAborted("the peer aborted during association negotiation")
        ac = pdu.decode_associate_ac(body)
        by_id = {p.id: p for p in proposals}
        contexts = {r.id: NegotiatedContext(r.id, by_id[r.id].abstract_syntax, r.transfer_syntax)
                    for r in ac.contexts if r.result == 0 and r.id in by_id}
        return cls(channel, config, contexts, ac.user_info.max_pdu)

    def context_for(self, abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> NegotiatedContext | None:
        """The accepted context for this SOP class whose syntax comes first in ``transfer_syntaxes``."""
        for syntax in transfer_syntaxes:
            for context in self.contexts.values():
                if context.abstract_syntax == abstract_syntax and context.transfer_syntax == syntax:
                    return context
        return None

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    async def echo(self) -> int:
        context = next((c for c in self.contexts.values()
                        if c.abstract_syntax == "1.2.840.10008.1.1"), None)
        if context is None:
            raise ProtocolError("the peer did not accept the Verification SOP class")
        message_id = self._next_id()
        self._send(context.id, dimse.echo_rq(message_id), None)
        await self.channel.drain(self.config.dimse_timeout)
        response, _ = await self._response(message_id)
        return response.status if response.status is not None else dimse.UNABLE_TO_PROCESS

    async def store_file(self, context: NegotiatedContext, sop_class: str, sop_instance: str,
                         path: Path, offset: int) -> dimse.Command:
        """Send the dataset bytes of ``path`` from ``offset`` on, as they are; return the response."""
        message_id = self._next_id()
        command = encode_message(context.id, dimse.store_rq(message_id, sop_class, sop_instance),
                                 None, self.peer_max_pdu)
        size = fragment_size(self.peer_max_pdu)
        with open(path, "rb", buffering=0) as handle:
            remaining = os.fstat(handle.fileno()).st_size - offset
            handle.seek(offset)
            self.channel.fire(Event.LOCAL_DATA)
            last = False
            while not last:  # the command travels in the first block's write
                block, remaining, last = read_pdus(handle.fileno(), context.id, size, remaining,
                                                   prefix=command)
                command = b""
                self.channel.send(block)
                await self.channel.drain(self.config.dimse_timeout)
        response, _ = await self._response(message_id)
        return response

    async def store_bytes(self, context: NegotiatedContext, sop_class: str, sop_instance: str,
                          dataset: bytes) -> dimse.Command:
        """Send a dataset held in memory (used only for the rare uncompressed conversion)."""
        message_id = self._next_id()
        self._send(context.id, dimse.store_rq(message_id, sop_class, sop_instance), dataset)
        await self.channel.drain(self.config.dimse_timeout)
        response, _ = await self._response(message_id)
        return response

    async def find(self, context: NegotiatedContext, identifier: bytes,
                   message_id: int | None = None) -> AsyncIterator[tuple[dimse.Command, bytes | None]]:
        """Send a C-FIND-RQ and yield each response until the final one."""
        message_id = message_id or self._next_id()
        self._send(context.id, dimse.find_rq(message_id, context.abstract_syntax), identifier)
        await self.channel.drain(self.config.dimse_timeout)
        while True:
            response, dataset = await self._response(message_id)
            yield response, dataset
            if response.status not in (dimse.PENDING, dimse.PENDING_WARNING):
                return

    def next_message_id(self) -> int:
        return self._next_id()

    def send_cancel(self, context: NegotiatedContext, message_id: int) -> None:
        self._send(context.id, dimse.cancel_rq(message_id), None)

    def _send(self, context_id: int, command: bytes, dataset: bytes | None) -> None:
        self.channel.fire(Event.LOCAL_DATA)
        send_message(self.channel, context_id, command, dataset, self.peer_max_pdu)

    async def _response(self, message_id: int) -> tuple[dimse.Command, bytes | None]:
        while not self._inbox:
            await self._read_more(self.config.dimse_timeout)
        response, dataset = self._inbox.popleft()
        if response.responded_id != message_id:
            raise ProtocolError(f"response to message {response.responded_id}, "
                                f"expected {message_id}")
        return response, dataset

    async def _read_more(self, timeout: float) -> None:
        _, body, action = await self.channel.read_pdu(timeout)
        if action in (Action.DELIVER_DATA, Action.DELIVER_DATA_RELEASING):
            self._take_pdvs(memoryview(body))
        elif action is Action.ABORT_INDICATION:
            source, reason = pdu.decode_abort(body)
            self.channel.close()
            raise AssociationAborted(f"the peer aborted the association (source {source}, "
                                     f"reason {reason})")
        else:
            self.channel.abort()
            raise ProtocolError(f"unexpected {action.value} while awaiting a response")

    def _take_pdvs(self, body: memoryview) -> None:
        for _, control, fragment in pdu.iter_pdvs(body):
            if control & 1:
                self._command += fragment
                if control & 2:
                    command = dimse.decode_command(bytes(self._command))
                    self._command.clear()
                    if command.has_dataset:
                        self._current, self._dataset = command, bytearray()
                    else:
                        self._inbox.append((command, None))
            elif self._dataset is not None and self._current is not None:
                self._dataset += fragment
                if len(self._dataset) > MAX_RESPONSE_DATASET:
                    raise ProtocolError("response dataset larger than 64 MiB")
                if control & 2:
                    self._inbox.append((self._current, bytes(self._dataset)))
                    self._current, self._dataset = None, None
            else:
                raise ProtocolError("dataset fragment without a command")

    async def release(self) -> None:
        """A-RELEASE, handling a release collision; aborts if the peer does not answer."""
        channel = self.channel
        try:
            channel.fire(Event.LOCAL_RELEASE)
            channel.send(pdu.encode_release_rq())
            await channel.drain(self.config.dimse_timeout)
            while True:
                _, _, action = await channel.read_pdu(self.config.dimse_timeout)
                if action is Action.COLLISION:
                    channel.fire(Event.LOCAL_RELEASE_RESPONSE)
                    channel.send(pdu.encode_release_rp())
                elif action in (Action.RELEASED, Action.ABORT_INDICATION):
                    break
        except (PeerTimeout, ProtocolError, AssociationAborted):
            channel.abort()
        finally:
            channel.close()

    def abort(self) -> None:
        self.channel.abort()


def read_pdus(fd: int, context_id: int, size: int, remaining: int,
              prefix: bytes = b"") -> tuple[bytearray, int, bool]:
    """Read up to ``SEND_BLOCK`` dataset bytes from ``fd`` (at its position) straight into P-DATA-TF
    PDUs of one PDV of at most ``size`` bytes each, built in one buffer: one scatter read
    (``readv`` into the data slots between the headers), one transport write per block, no copy of
    the data in Python, and one system call (one release of the GIL) where a read per PDV made 16
    with 16 KiB PDUs. Returns (PDUs, bytes left, whether the last PDV is in this block). An empty
    dataset is one empty last PDV; a file shorter than announced ends early. ``prefix`` (PDUs
    already framed, such as the command) goes first in the same buffer, hence the same write."""
    header = pdu.PDATA_HEADER_BYTES
    count = max(1, min(SEND_BLOCK // size, MAX_SLOTS, -(-remaining // size)))
    wants = [max(0, min(size, remaining - i * size)) for i in range(count)]
    buffer = bytearray(len(prefix) + count * header + sum(wants))
    buffer[: len(prefix)] = prefix
    view = memoryview(buffer)
    slots, position = [], len(prefix) + header
    for want in wants:
        slots.append(view[position : position + want])
        position += want + header
    got = os.readv(fd, slots) if remaining > 0 else 0
    position, last = len(prefix), False
    for want in wants:
        filled = min(want, got)
        got -= filled
        remaining -= filled
        last = remaining <= 0 or filled < want  # a short file ends the dataset here
        view[position : position + header] = pdu.pdata_header(context_id, 0x02 if last else 0x00,
                                                             filled)
        position += header + filled
        if last:
            break
    for slot in slots:
        slot.release()
    view.release()
    del buffer[position:]  # what a short file or the last PDV left unfilled
    return buffer, remaining, last


async def _connect(host: str, port: int, config: RequestorConfig) -> PduProtocol:
    context, timeout = config.ssl, config.connect_timeout
    hostname = host if context is not None and context.check_hostname else None
    capacity = receive_capacity(config.max_pdu)
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await asyncio.get_running_loop().create_connection(
                lambda: PduProtocol(capacity), host, port, ssl=context, server_hostname=hostname)
            return protocol
    except ssl.SSLError as exc:
        raise PeerUnreachable(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}",
                              "tls_error") from None
    except TimeoutError:
        raise PeerUnreachable(f"no answer from {host}:{port} within {timeout:g} s",
                              "connect_timeout") from None
    except ConnectionRefusedError:
        raise PeerUnreachable(f"nothing listens at {host}:{port}", "connection_refused") from None
    except ConnectionResetError:
        raise PeerUnreachable(f"{host}:{port} reset the connection", "connection_reset") from None
    except OSError as exc:  # a name that does not resolve; every address of a name failing
        raise PeerUnreachable(f"cannot connect to {host}:{port}: {exc.strerror or exc}",
                              "connect_timeout") from None
