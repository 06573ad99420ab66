"""What the upper layer hands to the rest of the gateway, and what it expects back.

The gateway's services (``gateway.scp``) implement ``Services``; they never see PDUs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.dicom.negotiation import AcceptedContext


@dataclass(frozen=True, slots=True)
class AssociationInfo:
    calling_ae: str
    called_ae: str
    peer_ip: str
    peer_port: int
    contexts: Mapping[int, AcceptedContext]
    peer_max_pdu: int
    implementation_class_uid: str = ""


@dataclass(frozen=True, slots=True)
class StoreRequest:
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class FindRequest:
    message_id: int
    sop_class_uid: str
    transfer_syntax: str
    identifier: bytes
    cancelled: asyncio.Event
    priority: int = 0


@dataclass(frozen=True, slots=True)
class FindResponse:
    status: int
    identifier: bytes | None = None
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Rejection:
    result: int
    source: int
    reason: int
    label: str  # metrics/log reason: called_ae, calling_ae, source_ip, limit, context, protocol


class DatasetSink(Protocol):
    """Receives one C-STORE dataset as it arrives, fragment by fragment."""

    def write(self, data: memoryview) -> None: ...

    async def finish(self) -> tuple[int, str]:
        """All fragments arrived: make it durable; return (DIMSE status, error comment)."""
        ...

    def abort(self) -> None:
        """The association ended before the dataset was complete."""
        ...


class Services(Protocol):
    def check_calling(self, calling_ae: str, peer_ip: str) -> Rejection | None: ...

    def association_started(self, info: AssociationInfo) -> None: ...

    def association_ended(self, info: AssociationInfo, aborted: bool) -> None: ...

    def association_rejected(self, rejection: Rejection, calling_ae: str, peer_ip: str,
                             called_ae: str) -> None: ...

    def echo(self, info: AssociationInfo) -> int: ...

    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink: ...

    def find(self, info: AssociationInfo, request: FindRequest) -> AsyncIterator[FindResponse]: ...
