"""DIMSE command sets (PS3.7 section 9.3 / 6.3) for the messages the gateway speaks.

Command sets are always Implicit VR Little Endian, group 0x0000. Encoding and decoding are hand
written (struct, no pydicom objects) because they sit on the per-image hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.errors import ProtocolError

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF

NO_DATASET = 0x0101
HAS_DATASET = 0x0001  # any value other than 0x0101 means a dataset follows

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000
STORE_CANNOT_UNDERSTAND = 0xC000

_TAG = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")

# element number -> kind; every element here is in group 0x0000
_UI = "ui"
_USV = "us"
_TEXT = "text"
_KINDS: dict[int, str] = {
    0x0002: _UI,  # Affected SOP Class UID
    0x0003: _UI,  # Requested SOP Class UID
    0x0100: _USV,  # Command Field
    0x0110: _USV,  # Message ID
    0x0120: _USV,  # Message ID Being Responded To
    0x0600: _TEXT,  # Move Destination (AE)
    0x0700: _USV,  # Priority
    0x0800: _USV,  # Command Data Set Type
    0x0900: _USV,  # Status
    0x0902: _TEXT,  # Error Comment (LO)
    0x0903: _USV,  # Error ID
    0x1000: _UI,  # Affected SOP Instance UID
    0x1001: _UI,  # Requested SOP Instance UID
    0x1030: _TEXT,  # Move Originator AE Title
    0x1031: _USV,  # Move Originator Message ID
}


@dataclass(slots=True)
class Command:
    """A decoded command set. Absent elements are None / empty."""

    command_field: int
    message_id: int = 0
    responded_id: int | None = None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    has_dataset: bool = False
    status: int | None = None
    priority: int = 0
    error_comment: str = ""
    move_originator_ae: str = ""
    move_originator_id: int | None = None


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set."""
    values: dict[int, int | str] = {}
    offset, end = 0, len(data)
    while offset + 8 <= end:
        group, element, length = _TAG.unpack_from(data, offset)
        offset += 8
        if offset + length > end:
            raise ProtocolError("command set element overruns the command")
        if group == 0 and element in _KINDS:
            raw = data[offset : offset + length]
            values[element] = _decode_value(_KINDS[element], raw)
        offset += length
    if offset != end:
        raise ProtocolError("trailing bytes after the command set")
    field = values.get(0x0100)
    if not isinstance(field, int):
        raise ProtocolError("command set has no Command Field")
    return Command(
        command_field=field,
        message_id=_int(values.get(0x0110)) or 0,
        responded_id=_int(values.get(0x0120)),
        sop_class_uid=_str(values.get(0x0002) or values.get(0x0003)),
        sop_instance_uid=_str(values.get(0x1000) or values.get(0x1001)),
        has_dataset=values.get(0x0800, NO_DATASET) != NO_DATASET,
        status=_int(values.get(0x0900)),
        priority=_int(values.get(0x0700)) or 0,
        error_comment=_str(values.get(0x0902)),
        move_originator_ae=_str(values.get(0x1030)),
        move_originator_id=_int(values.get(0x1031)),
    )


def _decode_value(kind: str, raw: bytes) -> int | str:
    if kind == _USV:
        if len(raw) != 2:
            raise ProtocolError("a US command element must have 2 bytes")
        return int(_US.unpack(raw)[0])
    return raw.decode("ascii", "replace").rstrip(" \0")


def _int(value: int | str | None) -> int | None:
    return value if isinstance(value, int) else None


def _str(value: int | str | None) -> str:
    return value if isinstance(value, str) else ""


def _element(element: int, value: int | str) -> bytes:
    if isinstance(value, int):
        raw = _US.pack(value)
    else:
        raw = value.encode("ascii", "replace")
        if len(raw) % 2:
            raw += b"\0" if _KINDS[element] == _UI else b" "
    return _TAG.pack(0, element, len(raw)) + raw


def encode_command(elements: dict[int, int | str]) -> bytes:
    """Encode a command set from {element number: value}; group length is added here."""
    body = b"".join(_element(e, v) for e, v in sorted(elements.items()))
    return _TAG.pack(0, 0x0000, 4) + _UL.pack(len(body)) + body


def echo_rq(message_id: int) -> bytes:
    return encode_command({0x0002: "1.2.840.10008.1.1", 0x0100: C_ECHO_RQ,
                           0x0110: message_id, 0x0800: NO_DATASET})


def echo_rsp(request: Command, status: int = SUCCESS) -> bytes:
    return encode_command({0x0002: request.sop_class_uid or "1.2.840.10008.1.1",
                           0x0100: C_ECHO_RSP, 0x0120: request.message_id,
                           0x0800: NO_DATASET, 0x0900: status})


def store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    return encode_command({0x0002: sop_class, 0x0100: C_STORE_RQ, 0x0110: message_id,
                           0x0700: priority, 0x0800: HAS_DATASET, 0x1000: sop_instance})


def store_rsp(request: Command, status: int, comment: str = "") -> bytes:
    elements: dict[int, int | str] = {
        0x0002: request.sop_class_uid, 0x0100: C_STORE_RSP, 0x0120: request.message_id,
        0x0800: NO_DATASET, 0x0900: status, 0x1000: request.sop_instance_uid,
    }
    if comment:
        elements[0x0902] = comment[:64]
    return encode_command(elements)


def find_rq(message_id: int, sop_class: str, priority: int = 0) -> bytes:
    return encode_command({0x0002: sop_class, 0x0100: C_FIND_RQ, 0x0110: message_id,
                           0x0700: priority, 0x0800: HAS_DATASET})


def find_rsp(request: Command, status: int, has_identifier: bool, comment: str = "") -> bytes:
    elements: dict[int, int | str] = {
        0x0002: request.sop_class_uid, 0x0100: C_FIND_RSP, 0x0120: request.message_id,
        0x0800: HAS_DATASET if has_identifier else NO_DATASET, 0x0900: status,
    }
    if comment:
        elements[0x0902] = comment[:64]
    return encode_command(elements)


def cancel_rq(message_id: int) -> bytes:
    return encode_command({0x0100: C_CANCEL_RQ, 0x0120: message_id, 0x0800: NO_DATASET})
