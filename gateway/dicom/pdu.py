"""PDU encoding and decoding (PS3.8 section 9.3). Pure: bytes in, values out.

A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP and A-ABORT. P-DATA-TF payloads are walked with
memoryviews so dataset fragments reach the spool without being copied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.errors import ProtocolError

ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07
PDU_TYPES = frozenset(range(1, 8))

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")

# A-ABORT source / reason (PS3.8 table 9-26)
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_REASON_UNRECOGNIZED_PDU = 1
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_UNRECOGNIZED_PARAMETER = 4
ABORT_REASON_UNEXPECTED_PARAMETER = 5
ABORT_REASON_INVALID_PARAMETER = 6


@dataclass(frozen=True, slots=True)
class ContextProposal:
    """One proposed presentation context of an A-ASSOCIATE-RQ."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ContextResult:
    """One presentation context result of an A-ASSOCIATE-AC (0 = acceptance)."""

    id: int
    result: int
    transfer_syntax: str = ""


@dataclass(frozen=True, slots=True)
class RoleSelection:
    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True, slots=True)
class UserInfo:
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: tuple[RoleSelection, ...] = ()


@dataclass(frozen=True, slots=True)
class AssociateRQ:
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ContextProposal, ...]
    user_info: UserInfo = field(default_factory=UserInfo)
    protocol_version: int = 1


@dataclass(frozen=True, slots=True)
class AssociateAC:
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ContextResult, ...]
    user_info: UserInfo = field(default_factory=UserInfo)


@dataclass(frozen=True, slots=True)
class AssociateRJ:
    result: int
    source: int
    reason: int


# ---------------------------------------------------------------------------------------- encode


def _item(item_type: int, payload: bytes) -> bytes:
    return bytes((item_type, 0)) + _U16.pack(len(payload)) + payload


def _pdu(pdu_type: int, payload: bytes) -> bytes:
    return HEADER.pack(pdu_type, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def _uid(value: str) -> bytes:
    return value.encode("ascii", "replace")


def _user_info(info: UserInfo) -> bytes:
    parts = [_item(0x51, _U32.pack(info.max_pdu))]
    if info.implementation_class_uid:
        parts.append(_item(0x52, _uid(info.implementation_class_uid)))
    for role in info.roles:
        uid = _uid(role.sop_class_uid)
        parts.append(_item(0x54, _U16.pack(len(uid)) + uid + bytes((role.scu_role, role.scp_role))))
    if info.implementation_version:
        parts.append(_item(0x55, info.implementation_version.encode("ascii", "replace")[:16]))
    return _item(0x50, b"".join(parts))


def _association_header(called: str, calling: str, version: int = 1) -> bytes:
    return _U16.pack(version) + b"\0\0" + _ae(called) + _ae(calling) + bytes(32)


def encode_associate_rq(rq: AssociateRQ) -> bytes:
    items = [_item(0x10, _uid(rq.application_context))]
    for ctx in rq.contexts:
        sub = [_item(0x30, _uid(ctx.abstract_syntax))]
        sub += [_item(0x40, _uid(ts)) for ts in ctx.transfer_syntaxes]
        items.append(_item(0x20, bytes((ctx.id, 0, 0, 0)) + b"".join(sub)))
    items.append(_user_info(rq.user_info))
    body = _association_header(rq.called_ae, rq.calling_ae, rq.protocol_version) + b"".join(items)
    return _pdu(ASSOCIATE_RQ, body)


def encode_associate_ac(ac: AssociateAC) -> bytes:
    items = [_item(0x10, _uid(ac.application_context))]
    for ctx in ac.contexts:
        # a rejected context still carries one (insignificant) transfer syntax sub-item
        ts = _item(0x40, _uid(ctx.transfer_syntax or "1.2.840.10008.1.2"))
        items.append(_item(0x21, bytes((ctx.id, 0, ctx.result, 0)) + ts))
    items.append(_user_info(ac.user_info))
    return _pdu(ASSOCIATE_AC, _association_header(ac.called_ae, ac.calling_ae) + b"".join(items))


def encode_associate_rj(rj: AssociateRJ) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes((0, rj.result, rj.source, rj.reason)))


def encode_release_rq() -> bytes:
    return _pdu(RELEASE_RQ, bytes(4))


def encode_release_rp() -> bytes:
    return _pdu(RELEASE_RP, bytes(4))


def encode_abort(source: int = ABORT_SOURCE_USER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return _pdu(ABORT, bytes((0, 0, source, reason)))


PDATA_HEADER_BYTES = 12  # PDU header (6) + PDV item length (4), context id, control header


def pdata_header(context_id: int, control: int, length: int) -> bytes:
    """Header of a P-DATA-TF PDU holding exactly one PDV of ``length`` data bytes."""
    return HEADER.pack(P_DATA_TF, length + 6) + PDV_HEADER.pack(length + 2, context_id, control)


def encode_pdata(context_id: int, control: int, data: bytes) -> bytes:
    return pdata_header(context_id, control, len(data)) + data


# ---------------------------------------------------------------------------------------- decode


def _items(data: memoryview, what: str) -> Iterator[tuple[int, memoryview]]:
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError(f"truncated item in {what}")
        item_type = data[offset]
        (length,) = _U16.unpack_from(data, offset + 2)
        end = offset + 4 + length
        if end > len(data):
            raise ProtocolError(f"item 0x{item_type:02x} in {what} overruns its PDU")
        yield item_type, data[offset + 4 : end]
        offset = end


def _text(data: memoryview) -> str:
    return bytes(data).decode("ascii", "replace").strip(" \0")


def _parse_user_info(data: memoryview) -> UserInfo:
    max_pdu, impl_uid, impl_version = 0, "", ""
    roles: list[RoleSelection] = []
    for sub_type, sub in _items(data, "user information"):
        if sub_type == 0x51 and len(sub) == 4:
            (max_pdu,) = _U32.unpack(sub)
        elif sub_type == 0x52:
            impl_uid = _text(sub)
        elif sub_type == 0x55:
            impl_version = _text(sub)
        elif sub_type == 0x54 and len(sub) >= 4:
            (uid_len,) = _U16.unpack_from(sub, 0)
            if len(sub) >= uid_len + 4:
                uid = _text(sub[2 : 2 + uid_len])
                roles.append(RoleSelection(uid, bool(sub[2 + uid_len]), bool(sub[3 + uid_len])))
    return UserInfo(max_pdu, impl_uid, impl_version, tuple(roles))


def _parse_header(body: memoryview, what: str) -> tuple[int, str, str]:
    if len(body) < 68:
        raise ProtocolError(f"{what} is shorter than its fixed fields")
    (version,) = _U16.unpack_from(body, 0)
    return version, _text(body[4:20]), _text(body[20:36])


def decode_associate_rq(body: bytes | memoryview) -> AssociateRQ:
    view = memoryview(body)
    version, called, calling = _parse_header(view, "A-ASSOCIATE-RQ")
    app_context = ""
    contexts: list[ContextProposal] = []
    info = UserInfo()
    for item_type, item in _items(view[68:], "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            app_context = _text(item)
        elif item_type == 0x20:
            contexts.append(_parse_proposal(item))
        elif item_type == 0x50:
            info = _parse_user_info(item)
    return AssociateRQ(called, calling, app_context, tuple(contexts), info, version)


def _parse_proposal(item: memoryview) -> ContextProposal:
    if len(item) < 4:
        raise ProtocolError("truncated presentation context item")
    abstract, syntaxes = "", []
    for sub_type, sub in _items(item[4:], "presentation context"):
        if sub_type == 0x30:
            abstract = _text(sub)
        elif sub_type == 0x40:
            syntaxes.append(_text(sub))
    return ContextProposal(item[0], abstract, tuple(syntaxes))


def decode_associate_ac(body: bytes | memoryview) -> AssociateAC:
    view = memoryview(body)
    _, called, calling = _parse_header(view, "A-ASSOCIATE-AC")
    app_context = ""
    results: list[ContextResult] = []
    info = UserInfo()
    for item_type, item in _items(view[68:], "A-ASSOCIATE-AC"):
        if item_type == 0x10:
            app_context = _text(item)
        elif item_type == 0x21 and len(item) >= 4:
            syntax = ""
            for sub_type, sub in _items(item[4:], "presentation context result"):
                if sub_type == 0x40:
                    syntax = _text(sub)
            results.append(ContextResult(item[0], item[2], syntax))
        elif item_type == 0x50:
            info = _parse_user_info(item)
    return AssociateAC(called, calling, app_context, tuple(results), info)


def decode_associate_rj(body: bytes | memoryview) -> AssociateRJ:
    if len(body) < 4:
        raise ProtocolError("A-ASSOCIATE-RJ is shorter than 4 bytes")
    return AssociateRJ(body[1], body[2], body[3])


def decode_abort(body: bytes | memoryview) -> tuple[int, int]:
    """(source, reason) of an A-ABORT."""
    if len(body) < 4:
        return ABORT_SOURCE_USER, ABORT_REASON_NOT_SPECIFIED
    return body[2], body[3]


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Walk a P-DATA-TF body: yields (context id, message control header, fragment)."""
    offset = 0
    end = len(body)
    while offset < end:
        if offset + 6 > end:
            raise ProtocolError("truncated PDV item")
        (length,) = _U32.unpack_from(body, offset)
        stop = offset + 4 + length
        if length < 2 or stop > end:
            raise ProtocolError("PDV item length does not fit its PDU")
        yield body[offset + 4], body[offset + 5], body[offset + 6 : stop]
        offset = stop
