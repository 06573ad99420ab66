"""The acceptor: listens, negotiates, and turns P-DATA into service calls.

One asyncio task per association, no threads, no polling. ``Acceptor.serve`` runs the listener;
``AcceptorAssociation`` drives one association through the state machine (``fsm.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from ssl import SSLContext

import anyio
from anyio.abc import TaskStatus

from gateway.dicom import dimse, pdu
from gateway.dicom.channel import Channel, PduProtocol, receive_capacity
from gateway.dicom.events import (
    AssociationInfo,
    DatasetSink,
    FindRequest,
    Rejection,
    Services,
    StoreRequest,
)
from gateway.dicom.fsm import Action, Event, State
from gateway.dicom.negotiation import AcceptedContext, Service, negotiate
from gateway.dicom.sending import send_message
from gateway.errors import AssociationAborted, GatewayError, PeerTimeout, ProtocolError

log = logging.getLogger("gateway.dicom")

MAX_COMMAND = 64 * 1024
MAX_IDENTIFIER = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AcceptorConfig:
    ae_title: str
    max_associations: int = 32
    max_pdu: int = 262144
    artim_timeout: float = 30.0
    network_timeout: float = 60.0
    worklist_enabled: bool = False
    max_association_seconds: float = 0.0  # 0: no time budget
    max_association_bytes: int = 0  # 0: no size budget
    implementation_class_uid: str = "1.2.826.0.1.3680043.8.498.1.0.1"
    implementation_version: str = "DICOMGW_010"


class BudgetExceeded(GatewayError):
    """An association used more time or bytes than its budget allows."""


class Acceptor:
    """The listening side of the gateway's AE."""

    def __init__(self, config: AcceptorConfig, services: Services) -> None:
        self.config = config
        self.services = services
        self.active = 0
        self._connections: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._closing = asyncio.Event()
        self._idle.set()

    async def serve(self, host: str, port: int, *, ssl: SSLContext | None = None,
                    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until ``stop_accepting`` or cancellation (with DICOM TLS when ``ssl`` is given);
        reports the bound port through ``task_status``. Several listeners share one association
        limit. Returning normally on ``stop_accepting`` matters: a listener that raised
        CancelledError would cancel its task group and with it the drain of associations in flight."""
        server = await asyncio.get_running_loop().create_server(
            self._protocol, host, port, reuse_address=True, backlog=128, ssl=ssl,
            ssl_handshake_timeout=self.config.artim_timeout if ssl is not None else None)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        log.info("listening for DICOM%s on %s:%d as %s", " TLS" if ssl else "", host, bound,
                 self.config.ae_title)
        task_status.started(bound)
        try:
            await self._closing.wait()  # the server accepts on its own (start_serving)
        finally:
            server.close()

    def stop_accepting(self) -> None:
        """Close every listener; associations in flight carry on."""
        self._closing.set()
        for server in self._servers:
            server.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let associations in flight finish for ``timeout`` s, then abort them."""
        self.stop_accepting()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)

    def _protocol(self) -> PduProtocol:
        return PduProtocol(receive_capacity(self.config.max_pdu), self._accept)

    def _accept(self, protocol: PduProtocol) -> None:
        """A connection was made (TLS: after the handshake): one task per association."""
        task = asyncio.get_running_loop().create_task(self._on_connection(protocol))
        self._connections.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not self._connections:
            self._idle.set()

    async def _on_connection(self, protocol: PduProtocol) -> None:
        association = AcceptorAssociation(self, protocol)
        try:
            await association.run()
        except asyncio.CancelledError:
            # drain() gave up on this association: tell the peer, and end the task normally
            association.channel.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_NOT_SPECIFIED)
        except Exception:  # the one catch-all of the acceptor: an association never kills the server
            log.exception("internal error on an inbound association; it was aborted")
            association.channel.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_NOT_SPECIFIED)

    def evaluate(self, rq: pdu.AssociateRQ, peer_ip: str) -> Rejection | None:
        """Decide A-ASSOCIATE-AC or -RJ (result, source, reason per PS3.8 table 9-21)."""
        if not rq.protocol_version & 1:
            return Rejection(1, 2, 2, "protocol")
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            return Rejection(1, 1, 2, "context")
        if rq.called_ae != self.config.ae_title:
            return Rejection(1, 1, 7, "called_ae")
        rejection = self.services.check_calling(rq.calling_ae, peer_ip)
        if rejection is not None:
            return rejection
        if self.active >= self.config.max_associations:
            return Rejection(2, 3, 2, "limit")
        return None


class AcceptorAssociation:
    """One inbound association, from transport open to close."""

    def __init__(self, acceptor: Acceptor, protocol: PduProtocol) -> None:
        self.acceptor = acceptor
        self.config = acceptor.config
        self.services = acceptor.services
        self.channel = Channel(protocol, max_pdu=self.config.max_pdu, state=State.STA1)
        peer = self.channel.transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        self.info: AssociationInfo | None = None
        self._command = bytearray()
        self._sink: DatasetSink | None = None
        self._identifier: bytearray | None = None
        self._pending: tuple[AcceptedContext, dimse.Command] | None = None
        self._finds: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}

    async def run(self) -> None:
        channel = self.channel
        channel.fire(Event.TRANSPORT_INDICATION)
        try:
            rq = await self._receive_rq()
        except PeerTimeout:
            log.info("ARTIM expired: %s connected and sent no A-ASSOCIATE-RQ", channel.peer)
            channel.fire(Event.ARTIM_EXPIRED)
            channel.close()
            return
        except (ProtocolError, AssociationAborted) as exc:
            log.info("association request from %s dropped: %s", channel.peer, exc)
            channel.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_UNEXPECTED_PDU)
            return
        if rq is None:
            return
        if not await self._associate(rq):
            return
        assert self.info is not None
        aborted = True
        self.acceptor.active += 1
        self.services.association_started(self.info)
        try:
            await self._established()
            aborted = False
        except (PeerTimeout, BudgetExceeded) as exc:
            log.warning("aborting association with %s: %s", self.info.calling_ae, exc)
            channel.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_NOT_SPECIFIED)
        except ProtocolError as exc:
            log.warning("aborting association with %s: protocol error: %s",
                        self.info.calling_ae, exc)
            channel.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_INVALID_PARAMETER)
        except AssociationAborted as exc:
            log.info("association with %s aborted: %s", self.info.calling_ae, exc)
            channel.close()
        finally:
            self._cleanup()
            self.acceptor.active -= 1
            self.services.association_ended(self.info, aborted)

    async def _receive_rq(self) -> pdu.AssociateRQ | None:
        _, body, action = await self.channel.read_pdu(self.config.artim_timeout)
        if action is not Action.EVALUATE_RQ:  # A-ABORT or close before associating
            self.channel.close()
            return None
        return pdu.decode_associate_rq(body)

    async def _associate(self, rq: pdu.AssociateRQ) -> bool:
        channel = self.channel
        rejection = self.acceptor.evaluate(rq, self.peer_ip)
        if rejection is not None:
            # counted before the peer can see the answer: a scrape after the RJ always shows it
            self.services.association_rejected(rejection, rq.calling_ae, self.peer_ip, rq.called_ae)
            channel.fire(Event.LOCAL_REJECT)
            channel.send(pdu.encode_associate_rj(
                pdu.AssociateRJ(rejection.result, rejection.source, rejection.reason)))
            log.debug("A-ASSOCIATE-RJ %d,%d,%d to %s (%s) calling %s", rejection.result,
                      rejection.source, rejection.reason, rq.calling_ae, self.peer_ip, rq.called_ae)
            await channel.wait_closed(self.config.artim_timeout)
            return False
        results, accepted = negotiate(rq.contexts, worklist_enabled=self.config.worklist_enabled)
        channel.fire(Event.LOCAL_ACCEPT)
        channel.send(pdu.encode_associate_ac(pdu.AssociateAC(
            rq.called_ae, rq.calling_ae, pdu.APPLICATION_CONTEXT, tuple(results),
            pdu.UserInfo(self.config.max_pdu, self.config.implementation_class_uid,
                         self.config.implementation_version, _role_replies(rq, accepted)))))
        self.info = AssociationInfo(rq.calling_ae, rq.called_ae, self.peer_ip, self.peer_port,
                                    accepted, rq.user_info.max_pdu,
                                    rq.user_info.implementation_class_uid)
        return True

    async def _established(self) -> None:
        budget = self.config.max_association_seconds
        try:
            async with asyncio.timeout(budget or None):
                await self._serve_pdus()
        except TimeoutError:
            raise BudgetExceeded(f"the association exceeded its time budget of {budget:g} s "
                                 "(max_association_seconds)") from None

    async def _serve_pdus(self) -> None:
        channel = self.channel
        limit, received = self.config.max_association_bytes, 0
        while True:
            _, body, action = await channel.read_pdu(self.config.network_timeout)
            received += len(body)
            if limit and received > limit:
                raise BudgetExceeded(f"the association exceeded its size budget of {limit} bytes "
                                     "(max_association_bytes)")
            if action is Action.DELIVER_DATA:
                await self._on_pdata(memoryview(body))
            elif action is Action.RELEASE_INDICATION:
                await self._release()
                return
            elif action is Action.ABORT_INDICATION:
                source, reason = pdu.decode_abort(body)
                raise AssociationAborted(f"A-ABORT received (source {source}, reason {reason})")

    async def _release(self) -> None:
        for task, _ in list(self._finds.values()):
            task.cancel()
        self.channel.fire(Event.LOCAL_RELEASE_RESPONSE)
        self.channel.send(pdu.encode_release_rp())
        await self.channel.wait_closed(self.config.artim_timeout)

    async def _on_pdata(self, body: memoryview) -> None:
        for context_id, control, fragment in pdu.iter_pdvs(body):
            if control & 1:
                await self._on_command_fragment(context_id, control, fragment)
            else:
                await self._on_data_fragment(context_id, control, fragment)

    async def _on_command_fragment(self, context_id: int, control: int,
                                   fragment: memoryview) -> None:
        if self._pending is not None:
            raise ProtocolError("a command fragment arrived while a dataset was expected")
        self._command += fragment
        if len(self._command) > MAX_COMMAND:
            raise ProtocolError("command set larger than 64 KiB")
        if control & 2:
            command = dimse.decode_command(bytes(self._command))
            self._command.clear()
            await self._on_command(self._context(context_id), command)

    async def _on_data_fragment(self, context_id: int, control: int,
                                fragment: memoryview) -> None:
        pending = self._pending
        if pending is None or pending[0].id != context_id:
            raise ProtocolError("a dataset fragment arrived without its command")
        if self._sink is not None:
            self._sink.write(fragment)
        elif self._identifier is not None:
            self._identifier += fragment
            if len(self._identifier) > MAX_IDENTIFIER:
                raise ProtocolError("C-FIND identifier larger than 1 MiB")
        if control & 2:
            self._pending = None
            await self._on_dataset(*pending)

    def _context(self, context_id: int) -> AcceptedContext:
        assert self.info is not None
        context = self.info.contexts.get(context_id)
        if context is None:
            raise ProtocolError(f"message on presentation context {context_id}, "
                                "which was not accepted")
        return context

    async def _on_command(self, context: AcceptedContext, command: dimse.Command) -> None:
        assert self.info is not None
        field = command.command_field
        if field in (dimse.C_STORE_RQ, dimse.C_FIND_RQ) and not command.has_dataset:
            raise ProtocolError("C-STORE/C-FIND request without a dataset")  # before any spool file
        if field == dimse.C_ECHO_RQ and context.service == Service.ECHO:
            status = self.services.echo(self.info)
            await self._send(context, dimse.echo_rsp(command, status))
        elif field == dimse.C_STORE_RQ and context.service == Service.STORE:
            self._begin_store(context, command)
        elif field == dimse.C_FIND_RQ and context.service == Service.FIND:
            self._identifier = bytearray()
            self._pending = (context, command)
        elif field == dimse.C_CANCEL_RQ:
            entry = self._finds.get(command.responded_id or -1)
            if entry is not None:
                entry[1].set()
        else:
            raise ProtocolError(f"command 0x{field:04x} is not supported on a "
                                f"{context.service} context")

    def _begin_store(self, context: AcceptedContext, command: dimse.Command) -> None:
        assert self.info is not None
        request = StoreRequest(command.message_id, command.sop_class_uid or context.abstract_syntax,
                               command.sop_instance_uid, context.transfer_syntax, command.priority)
        self._sink = self.services.begin_store(self.info, request)
        self._pending = (context, command)

    async def _on_dataset(self, context: AcceptedContext, command: dimse.Command) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            try:
                status, comment = await sink.finish()
            except GatewayError as exc:
                status, comment = dimse.OUT_OF_RESOURCES, str(exc)
            except BaseException:
                sink.abort()  # never leave its partial file behind (a no-op once committing)
                raise
            await self._send(context, dimse.store_rsp(command, status, comment))
        elif self._identifier is not None:
            identifier, self._identifier = bytes(self._identifier), None
            self._start_find(context, command, identifier)

    def _start_find(self, context: AcceptedContext, command: dimse.Command,
                    identifier: bytes) -> None:
        cancelled = asyncio.Event()
        request = FindRequest(command.message_id, command.sop_class_uid or context.abstract_syntax,
                              context.transfer_syntax, identifier, cancelled, command.priority)
        task = asyncio.create_task(self._run_find(context, command, request))
        self._finds[command.message_id] = (task, cancelled)

    async def _run_find(self, context: AcceptedContext, command: dimse.Command,
                        request: FindRequest) -> None:
        assert self.info is not None
        try:
            async for response in self.services.find(self.info, request):
                has_identifier = response.identifier is not None
                await self._send(context, dimse.find_rsp(command, response.status, has_identifier,
                                                         response.comment), response.identifier)
        except (AssociationAborted, PeerTimeout, ConnectionError):
            self.channel.close()
        finally:
            self._finds.pop(command.message_id, None)

    async def _send(self, context: AcceptedContext, command: bytes,
                    dataset: bytes | None = None) -> None:
        assert self.info is not None
        self.channel.fire(Event.LOCAL_DATA)
        send_message(self.channel, context.id, command, dataset, self.info.peer_max_pdu)
        await self.channel.drain(self.config.network_timeout)

    def _cleanup(self) -> None:
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
        for task, _ in list(self._finds.values()):
            task.cancel()


def _role_replies(rq: pdu.AssociateRQ,
                  accepted: dict[int, AcceptedContext]) -> tuple[pdu.RoleSelection, ...]:
    """Answer SCP/SCU role selection for accepted abstract syntaxes: we are only ever the SCP."""
    ours = {c.abstract_syntax for c in accepted.values()}
    return tuple(pdu.RoleSelection(r.sop_class_uid, r.scu_role, False)
                 for r in rq.user_info.roles if r.sop_class_uid in ours)
