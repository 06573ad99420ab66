"""Framing outgoing DIMSE messages into P-DATA-TF PDUs sized for the peer."""

from __future__ import annotations

from gateway.dicom import pdu
from gateway.dicom.channel import Channel

UNLIMITED_PDU = 1 << 20


def fragment_size(peer_max_pdu: int) -> int:
    """Largest PDV payload for one P-DATA-TF PDU that the peer accepts (0 = no limit)."""
    if peer_max_pdu <= 0:
        return UNLIMITED_PDU - 6
    return max(peer_max_pdu - 6, 1)


def send_message(channel: Channel, context_id: int, command: bytes, dataset: bytes | None,
                 peer_max_pdu: int) -> None:
    """Queue a command (and its dataset, if any) on the channel as P-DATA-TF PDUs."""
    size = fragment_size(peer_max_pdu)
    _send_fragments(channel, context_id, memoryview(command), size, is_command=True)
    if dataset is not None:
        _send_fragments(channel, context_id, memoryview(dataset), size, is_command=False)


def _send_fragments(channel: Channel, context_id: int, data: memoryview, size: int, *,
                    is_command: bool) -> None:
    base = 0x01 if is_command else 0x00
    total = len(data)
    offset = 0
    while True:
        chunk = data[offset : offset + size]
        offset += len(chunk)
        last = offset >= total
        channel.send(pdu.pdata_header(context_id, base | (0x02 if last else 0), len(chunk)))
        channel.send(chunk)
        if last:
            return
