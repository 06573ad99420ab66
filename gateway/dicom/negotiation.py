"""Acceptor-side presentation context negotiation (PS3.8 section 9.3.3.2). Pure.

Policy: accept every proposed context whose abstract syntax we serve and, within a context, the
*requestor's* first-listed transfer syntax that we support, so a modality can always send its images
in their own syntax and is never forced to transcode them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import sop_class

from gateway.dicom.pdu import ContextProposal, ContextResult

VERIFICATION = "1.2.840.10008.1.1"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"

ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
STORAGE_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes)


class Service:
    ECHO = "echo"
    STORE = "store"
    FIND = "find"


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    id: int
    abstract_syntax: str
    transfer_syntax: str
    service: str


@cache
def _known_non_storage() -> frozenset[str]:
    """SOP classes pynetdicom knows that are not storage: refused rather than treated as storage."""
    storage = set(sop_class._STORAGE_CLASSES.values())
    found: set[str] = set()
    for name in dir(sop_class):
        table = getattr(sop_class, name)
        if not (name.startswith("_") and name.endswith("_CLASSES") and isinstance(table, dict)):
            continue
        for uid in table.values():
            if isinstance(uid, str) and uid not in storage and not _is_storage_name(UID(uid).name):
                found.add(uid)
    return frozenset(found - {VERIFICATION, MODALITY_WORKLIST_FIND})


def _is_storage_name(name: str) -> bool:
    """Non-patient storage classes (Hanging Protocol Storage, Color Palette Storage...) sit in
    pynetdicom's other tables; their names end in "Storage". Storage Commitment does not."""
    return name.endswith("Storage")


def service_for(abstract_syntax: str, *, worklist_enabled: bool) -> str | None:
    """Which of our services an abstract syntax maps to, or None when we do not serve it.

    Unknown UIDs are treated as storage: private and new storage SOP classes must get through.
    """
    if abstract_syntax == VERIFICATION:
        return Service.ECHO
    if abstract_syntax == MODALITY_WORKLIST_FIND:
        return Service.FIND if worklist_enabled else None
    if not abstract_syntax or abstract_syntax in _known_non_storage():
        return None
    return Service.STORE


def _syntaxes_for(service: str) -> frozenset[str]:
    return STORAGE_SYNTAXES if service == Service.STORE else frozenset(UNCOMPRESSED)


def negotiate(
    proposals: Sequence[ContextProposal], *, worklist_enabled: bool
) -> tuple[list[ContextResult], dict[int, AcceptedContext]]:
    """Results for an A-ASSOCIATE-AC, and the accepted contexts by id."""
    results: list[ContextResult] = []
    accepted: dict[int, AcceptedContext] = {}
    for proposal in proposals:
        service = service_for(proposal.abstract_syntax, worklist_enabled=worklist_enabled)
        if service is None:
            results.append(ContextResult(proposal.id, ABSTRACT_SYNTAX_NOT_SUPPORTED))
            continue
        supported = _syntaxes_for(service)
        chosen = next((ts for ts in proposal.transfer_syntaxes if ts in supported), None)
        if chosen is None:
            results.append(ContextResult(proposal.id, TRANSFER_SYNTAXES_NOT_SUPPORTED))
            continue
        results.append(ContextResult(proposal.id, ACCEPTANCE, chosen))
        accepted[proposal.id] = AcceptedContext(proposal.id, proposal.abstract_syntax, chosen, service)
    return results, accepted
