"""Framing outgoing DIMSE messages into P-DATA-TF PDUs sized for the peer.

A message goes to the transport in one write: with TCP_NODELAY every write is a segment of its own,
and a C-STORE response sent as a 12-byte header and then its command set would wake the peer twice
for one answer.
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.dicom import pdu
from gateway.dicom.channel import Channel

UNLIMITED_PDU = 1 << 20


def fragment_size(peer_max_pdu: int) -> int:
    """Largest PDV payload for one P-DATA-TF PDU that the peer accepts (0 = no limit)."""
    if peer_max_pdu <= 0:
        return UNLIMITED_PDU - 6
    return max(peer_max_pdu - 6, 1)


def encode_message(context_id: int, command: bytes, dataset: bytes | None,
                   peer_max_pdu: int) -> bytes:
    """A command (and its dataset, if any) as P-DATA-TF PDUs, in one piece."""
    size = fragment_size(peer_max_pdu)
    parts = list(_fragments(context_id, memoryview(command), size, is_command=True))
    if dataset is not None:
        parts += _fragments(context_id, memoryview(dataset), size, is_command=False)
    return b"".join(parts)


def send_message(channel: Channel, context_id: int, command: bytes, dataset: bytes | None,
                 peer_max_pdu: int) -> None:
    """Queue a command (and its dataset, if any) on the channel, in one write."""
    channel.send(encode_message(context_id, command, dataset, peer_max_pdu))


def _fragments(context_id: int, data: memoryview, size: int, *,
               is_command: bool) -> Iterator[bytes | memoryview]:
    base = 0x01 if is_command else 0x00
    total = len(data)
    offset = 0
    while True:
        chunk = data[offset : offset + size]
        offset += len(chunk)
        last = offset >= total
        yield pdu.pdata_header(context_id, base | (0x02 if last else 0), len(chunk))
        yield chunk
        if last:
            return
