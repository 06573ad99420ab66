"""The DICOM Part-10 file header the spool writes in front of every received dataset.

A Part-10 file is a 128-byte preamble, the magic ``DICM``, the file meta information group (group 0002,
always explicit VR little endian), then the dataset in the transfer syntax named by (0002,0010). The
spool stores the dataset bytes exactly as received, so this module only has to encode the header. It is
on the ingest hot path: hand-written with ``struct``, no pydicom objects, no UID validation.

Values are stored as given, never truncated or checked (a hostile SOP Instance UID such as ``../../x``
is just a value; file names never come from it). Strings are encoded as UTF-8 with ``surrogateescape``,
so ASCII is byte-identical and undecodable bytes a peer sent round-trip. A value too long for the
16-bit length of a short-form explicit VR element (over 65,534 bytes) raises ``ValueError``.
"""

from __future__ import annotations

import struct

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.0.1"
IMPLEMENTATION_VERSION_NAME = "DICOMGW_010"
FILE_META_VERSION = b"\x00\x01"
PREAMBLE = bytes(128) + b"DICM"
MAX_SHORT_VALUE = 0xFFFE

_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xI")  # group, element, VR, reserved, 32-bit length


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Return preamble + ``DICM`` + the file meta group; the dataset bytes follow directly."""
    body = b"".join(
        (
            _long(0x0001, b"OB", FILE_META_VERSION),
            _short(0x0002, b"UI", _pad(sop_class_uid, b"\x00")),
            _short(0x0003, b"UI", _pad(sop_instance_uid, b"\x00")),
            _short(0x0010, b"UI", _pad(transfer_syntax, b"\x00")),
            _short(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _short(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
            _short(0x0016, b"AE", _pad(source_ae, b" ")),
        )
    )
    group_length = _short(0x0000, b"UL", struct.pack("<I", len(body)))
    return PREAMBLE + group_length + body


def _pad(value: str, padding: bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    return raw + padding if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) > MAX_SHORT_VALUE:
        raise ValueError(
            f"file meta element (0002,{element:04X}) is {len(value)} bytes; at most "
            f"{MAX_SHORT_VALUE} fit in explicit VR little endian"
        )
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def _long(element: int, vr: bytes, value: bytes) -> bytes:
    return _LONG.pack(0x0002, element, vr, len(value)) + value
