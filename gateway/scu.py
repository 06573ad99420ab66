"""Calling peers: presentation contexts from what is queued, C-ECHO checks, and failure translation.

Shared by the forwarders, ``dicom-gateway echo`` and ``doctor``. The decisions (which contexts to
propose, how an exception maps to a failure kind) are pure; ``echo_peer`` does the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.dicom.negotiation import UNCOMPRESSED, VERIFICATION
from gateway.dicom.pdu import ContextProposal
from gateway.dicom.requestor import RequestorAssociation, RequestorConfig
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    GatewayError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
)
from gateway.explain import explain_failure
from gateway.retry import FailureKind
from gateway.settings import Peer
from gateway.tls import peer_ssl

MAX_CONTEXTS = 128


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure to talk to a peer, translated from the exception that reported it."""

    kind: FailureKind
    rj: tuple[int, int, int] | None = None
    detail: str = ""


def failure_of(exc: BaseException) -> Failure:
    """Translate an upper-layer exception into a failure kind (pure)."""
    if isinstance(exc, PeerUnreachable):
        return Failure(exc.kind, detail=str(exc))  # type: ignore[arg-type]
    if isinstance(exc, AssociationRejected):
        return Failure("association_rejected", (exc.result, exc.source, exc.reason))
    if isinstance(exc, AssociationAborted):
        return Failure("aborted", detail=str(exc))
    if isinstance(exc, PeerTimeout):
        return Failure("dimse_timeout", detail=str(exc))
    if isinstance(exc, ProtocolError):
        return Failure("protocol_error", detail=str(exc))
    if isinstance(exc, OSError):
        return Failure("local_error", detail=exc.strerror or str(exc))
    return Failure("protocol_error", detail=str(exc))


def build_proposals(pairs: Iterable[tuple[str, str]]) -> tuple[list[ContextProposal],
                                                              set[tuple[str, str]]]:
    """Contexts for (SOP class, transfer syntax) pairs in queue order, at most 128.

    Each pair gets a context with its own syntax (so the object is sent as it was received);
    a SOP class with uncompressed objects also gets one uncompressed fallback context. Returns the
    proposals and the pairs they cover.
    """
    proposals: list[ContextProposal] = []
    covered: set[tuple[str, str]] = set()
    with_fallback: set[str] = set()
    for sop_class, syntax in dict.fromkeys(pairs):
        needed = 1 + (syntax in UNCOMPRESSED and sop_class not in with_fallback)
        if len(proposals) + needed > MAX_CONTEXTS:
            break
        proposals.append(ContextProposal(2 * len(proposals) + 1, sop_class, (syntax,)))
        if needed == 2:
            proposals.append(ContextProposal(2 * len(proposals) + 1, sop_class, UNCOMPRESSED))
            with_fallback.add(sop_class)
        covered.add((sop_class, syntax))
    return proposals, covered


@dataclass(frozen=True, slots=True)
class EchoResult:
    ok: bool
    message: str
    seconds: float


async def echo_peer(name: str, peer: Peer, calling_ae: str, *,
                    config_key: str | None = None) -> EchoResult:
    """C-ECHO ``peer``; the message explains a failure in words a PACS administrator acts on."""
    started = time.perf_counter()
    config = RequestorConfig(calling_ae, connect_timeout=peer.connect_timeout,
                             dimse_timeout=peer.dimse_timeout, ssl=peer_ssl(peer))
    proposal = ContextProposal(1, VERIFICATION, ("1.2.840.10008.1.2",))
    try:
        association = await RequestorAssociation.open(peer.host, peer.port, peer.ae_title,
                                                      [proposal], config)
        try:
            status = await association.echo()
        finally:
            await association.release()
    except (GatewayError, OSError) as exc:
        failure = failure_of(exc)
        return EchoResult(False, explain_peer(name, peer, calling_ae, failure, config_key),
                          time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if status != 0:
        text = explain_failure("dimse_status", peer_name=name, host=peer.host, port=peer.port,
                               called_ae=peer.ae_title, calling_ae=calling_ae, status=status,
                               config_key=config_key)
        return EchoResult(False, text, seconds)
    return EchoResult(True, f"{name}: C-ECHO to {peer.ae_title} at {peer.host}:{peer.port} "
                            f"succeeded in {seconds * 1000:.0f} ms", seconds)


SELF_EXPLAINED: frozenset[FailureKind] = frozenset({"connection_refused", "connection_reset"})
"""Failure kinds whose explanation already says everything their exception message says."""


def explain_peer(name: str, peer: Peer, calling_ae: str, failure: Failure,
                 config_key: str | None = None, **extra: str) -> str:
    redundant = failure.rj is not None or failure.kind in SELF_EXPLAINED
    return explain_failure(failure.kind, peer_name=name, host=peer.host, port=peer.port,
                           called_ae=peer.ae_title, calling_ae=calling_ae, rj=failure.rj,
                           detail="" if redundant else failure.detail, config_key=config_key,
                           **extra)  # type: ignore[arg-type]
