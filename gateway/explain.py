"""Plain-words explanations of forwarding failures, for the PACS administrator who must act.

Used by ``dicom-gateway echo NAME`` / ``doctor`` and for dead-letter reasons. Every message is one
line that begins with the peer's name, names what was seen (host:port, AE titles, raw codes) and
says what to check. Status names come from pynetdicom's tables, SOP class and transfer syntax names
from pydicom's UID dictionary. Pure: no I/O. ``detail`` is shown as given: keep patient data out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from pydicom.uid import UID
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from gateway.retry import (
    NO_REASON_GIVEN,
    RJ_PERMANENT,
    FailureKind,
    Outcome,
    OverrideOutcome,
    classify_status,
)

Problem = FailureKind | Literal["dimse_status"]
"""What :func:`explain_failure` explains: a failure kind, or a DIMSE response's failure status."""

_NO_OVERRIDES: Mapping[str, OverrideOutcome] = MappingProxyType({})

_CONSEQUENCE: Mapping[Outcome, str] = MappingProxyType(
    {
        "delivered": "delivered",
        "warning": "warning: counts as delivered",
        "transient": "transient: will retry",
        "permanent": "permanent: not retried",
    }
)


@dataclass(frozen=True, slots=True)
class Peer:
    """What the messages may say about the peer and about us."""

    name: str
    host: str
    port: int
    called_ae: str
    calling_ae: str
    config_key: str

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def explain_failure(
    kind: Problem,
    *,
    peer_name: str,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    rj: tuple[int, int, int] | None = None,
    status: int | None = None,
    detail: str = "",
    abort: tuple[int, int] | None = None,
    sop_class_uid: str | None = None,
    transfer_syntax_uid: str | None = None,
    status_overrides: Mapping[str, OverrideOutcome] = _NO_OVERRIDES,
    config_key: str | None = None,
) -> str:
    """One line that says what went wrong with ``peer_name`` and what to do about it.

    ``rj`` is the A-ASSOCIATE-RJ (result, source, reason); ``abort`` the A-ABORT (source, reason);
    ``config_key`` the peer's place in the config (default ``destinations.<peer_name>``).
    """
    peer = Peer(
        peer_name, host, port, called_ae, calling_ae, config_key or f"destinations.{peer_name}"
    )
    text = _explain(
        kind, peer, rj, status, abort, sop_class_uid, transfer_syntax_uid, status_overrides
    )
    extra = one_line(detail)
    if extra:
        text = f"{text} ({extra})"
    return f"{one_line(peer_name)}: {text}"


def explain_status(status: int, overrides: Mapping[str, OverrideOutcome] = _NO_OVERRIDES) -> str:
    """``0xA700 Refused: Out of Resources (transient: will retry)``."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (code_to_category(status), ""))
    if category == "Unknown":
        meaning = "unknown status"
    consequence = _CONSEQUENCE[classify_status(status, overrides)]
    return f"0x{status:04X} {meaning or category} ({consequence})"


def uid_name(uid: str) -> str:
    """``'Ultrasound Image Storage' (1.2.840.10008.5.1.4.1.1.6.1)``, or the bare UID if unknown."""
    name = UID(uid).name
    return uid if name == uid else f"{name!r} ({uid})"


# --- the cases -----------------------------------------------------------------------------------


def _explain(  # noqa: PLR0917 - private, called once with everything explain_failure got
    kind: Problem,
    peer: Peer,
    rj: tuple[int, int, int] | None,
    status: int | None,
    abort: tuple[int, int] | None,
    sop_class_uid: str | None,
    transfer_syntax_uid: str | None,
    overrides: Mapping[str, OverrideOutcome],
) -> str:
    if kind == "association_rejected":
        return _rejected(rj, peer)
    if kind == "aborted":
        return _aborted(abort)
    if kind == "no_presentation_context":
        return _no_context(sop_class_uid, transfer_syntax_uid)
    if kind == "dimse_status":
        return _status(status, overrides)
    return _SIMPLE[kind].format(p=peer)


_SIMPLE: Mapping[str, str] = MappingProxyType(
    {
        "connection_refused": (
            "nothing listens at {p.address}: check that the PACS is running and the port is right "
            "({p.config_key}.port)"
        ),
        "connect_timeout": (
            "no answer from {p.address}: a firewall drops the connection or the IP is wrong "
            "({p.config_key}.host)"
        ),
        "tls_error": (
            "the TLS handshake with {p.address} failed: check that the PACS speaks TLS on this port, "
            "that its certificate is signed by {p.config_key}.tls.ca_bundle and names the host, and "
            "that it trusts our client certificate"
        ),
        "connection_reset": (
            "the connection to {p.address} was reset: the PACS or a firewall closed it; check the "
            "PACS log and any firewall idle timeout"
        ),
        "dimse_timeout": (
            "the peer accepted the association but did not answer in time "
            "({p.config_key}.dimse_timeout): it may be overloaded or stuck; check its log, or "
            "raise the timeout if it is merely slow"
        ),
        "protocol_error": (
            "the peer at {p.address} broke the DICOM protocol and the association was aborted: "
            "check the PACS log"
        ),
        "local_error": (
            "the gateway could not read the spooled object: check the spool disk and the "
            "gateway log"
        ),
    }
)

_RJ_ADVICE: Mapping[tuple[int, int], str] = MappingProxyType(
    {
        (1, 1): "rejected without a reason: check the peer's log and its list of known AEs",
        (1, 2): (
            "the peer does not support the DICOM application context: check that {p.address} is a "
            "DICOM port"
        ),
        (1, 3): (
            "the peer does not know our calling AE title {p.calling_ae}: register {p.calling_ae} "
            "with this host's address on the PACS"
        ),
        (1, 7): (
            "the peer does not know the called AE title {p.called_ae}: check the AE title "
            "configured on the PACS and in the gateway's config ({p.config_key}.ae_title)"
        ),
        (2, 1): (
            "the peer's association service rejected us without a reason: check the peer's log"
        ),
        (2, 2): (
            "the peer does not support DICOM upper-layer protocol version 1: check that "
            "{p.address} is a DICOM port"
        ),
        (3, 1): (
            "the peer is temporarily overloaded (congestion): usually clears by itself; if it "
            "persists check its load"
        ),
        (3, 2): (
            "the peer is temporarily overloaded (its association limit is reached): raise its "
            "limit or lower {p.config_key}.associations"
        ),
    }
)

_RJ_TRANSIENT_NO_REASON = (
    "the peer is temporarily overloaded (busy, no reason given): usually clears by itself; if it "
    "persists check the peer's log"
)


def _rejected(rj: tuple[int, int, int] | None, peer: Peer) -> str:
    if rj is None:
        return "the peer rejected the association: check the peer's log"
    result, source, reason = rj
    kind = "rejected-permanent" if result == RJ_PERMANENT else "rejected-transient"
    if result != RJ_PERMANENT and (source, reason) in NO_REASON_GIVEN:
        advice = _RJ_TRANSIENT_NO_REASON
    else:
        advice = _RJ_ADVICE.get(
            (source, reason), "the peer rejected the association for an unknown reason"
        )
    return f"{advice.format(p=peer)} [A-ASSOCIATE-RJ {result},{source},{reason} {kind}]"


_ABORT_SOURCE: Mapping[int, str] = MappingProxyType(
    {
        0: "the peer application",
        1: "unspecified",
        2: "the peer's DICOM protocol layer",
    }
)
_ABORT_REASON: Mapping[int, str] = MappingProxyType(
    {
        0: "reason not specified",
        1: "unrecognized PDU",
        2: "unexpected PDU",
        4: "unrecognized PDU parameter",
        5: "unexpected PDU parameter",
        6: "invalid PDU parameter value",
    }
)


def _aborted(abort: tuple[int, int] | None) -> str:
    text = "the peer aborted the association"
    if abort is not None:
        source, reason = abort
        who = _ABORT_SOURCE.get(source, f"source {source}")
        why = _ABORT_REASON.get(reason, f"reason {reason}")
        text += f" (A-ABORT from {who}, {why})"
    return f"{text}: check the PACS log for why it dropped the transfer"


def _no_context(sop_class_uid: str | None, transfer_syntax_uid: str | None) -> str:
    sop = f"SOP class {uid_name(sop_class_uid)}" if sop_class_uid else "this SOP class"
    syntax = (
        uid_name(transfer_syntax_uid) if transfer_syntax_uid else "in an unknown transfer syntax"
    )
    return (
        f"the peer accepts no transfer syntax we can send {sop} in: the object is {syntax}; "
        "configure the PACS to accept it"
    )


_STATUS_ADVICE: Mapping[Outcome, str] = MappingProxyType(
    {
        "delivered": "",
        "warning": ": the PACS holds the object; check its log if the warning matters",
        "transient": ": check the PACS log if it persists",
        "permanent": ": fix the cause on the PACS (see its log), then requeue the dead letter",
    }
)


def _status(status: int | None, overrides: Mapping[str, OverrideOutcome]) -> str:
    if status is None:
        return "the peer answered with a failure status: check the PACS log"
    advice = _STATUS_ADVICE[classify_status(status, overrides)]
    return f"the peer answered {explain_status(status, overrides)}{advice}"


def one_line(text: str) -> str:
    """``text`` on one line of printable characters (peer-supplied text before it is stored)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())
