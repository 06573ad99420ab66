"""Acceptor-side presentation context negotiation (gateway.dicom.negotiation): pure policy."""

from __future__ import annotations

import pytest

from gateway.dicom.negotiation import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    AcceptedContext,
    Service,
    negotiate,
    service_for,
)
from gateway.dicom.pdu import ContextProposal, ContextResult

VERIFICATION = "1.2.840.10008.1.1"
MWL = "1.2.840.10008.5.1.4.31"
CT = "1.2.840.10008.5.1.4.1.1.2"
US = "1.2.840.10008.5.1.4.1.1.6.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
MPPS = "1.2.840.10008.3.1.2.3.3"
HANGING_PROTOCOL = "1.2.840.10008.5.1.4.38.1"
COLOR_PALETTE = "1.2.840.10008.5.1.4.39.1"
PRIVATE = "1.2.826.0.1.3680043.9.9999.42.1"  # a vendor's private storage class

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
UNKNOWN_SYNTAX = "1.2.3.4.5.6.7"


def one(abstract: str, *syntaxes: str, worklist: bool = False) -> ContextResult:
    results, _ = negotiate([ContextProposal(1, abstract, syntaxes)], worklist_enabled=worklist)
    (result,) = results
    return result


@pytest.mark.parametrize(
    ("syntaxes", "chosen"),
    [
        ((JPEG_BASELINE, EXPLICIT, IMPLICIT), JPEG_BASELINE),
        ((IMPLICIT, EXPLICIT), IMPLICIT),
        ((EXPLICIT, IMPLICIT), EXPLICIT),
        ((UNKNOWN_SYNTAX, RLE, EXPLICIT), RLE),
        ((BIG_ENDIAN,), BIG_ENDIAN),
        ((DEFLATED, EXPLICIT), DEFLATED),
        ((JPEG_2000,), JPEG_2000),
    ],
)
def test_the_requestors_first_supported_syntax_wins(syntaxes: tuple[str, ...], chosen: str) -> None:
    assert one(US, *syntaxes) == ContextResult(1, ACCEPTANCE, chosen)


def test_an_unknown_or_private_sop_class_is_treated_as_storage() -> None:
    assert service_for(PRIVATE, worklist_enabled=False) == Service.STORE
    assert one(PRIVATE, EXPLICIT) == ContextResult(1, ACCEPTANCE, EXPLICIT)


def test_known_storage_classes_are_storage() -> None:
    assert service_for(CT, worklist_enabled=False) == Service.STORE
    assert service_for(US, worklist_enabled=True) == Service.STORE
    # non-patient objects are stored with C-STORE too, although pynetdicom files them elsewhere
    assert service_for(HANGING_PROTOCOL, worklist_enabled=False) == Service.STORE
    assert service_for(COLOR_PALETTE, worklist_enabled=False) == Service.STORE


@pytest.mark.parametrize("abstract", [PATIENT_ROOT_FIND, STUDY_ROOT_MOVE, STORAGE_COMMITMENT, MPPS, ""])
def test_known_non_storage_classes_are_rejected_with_result_3(abstract: str) -> None:
    assert service_for(abstract, worklist_enabled=True) is None
    assert one(abstract, IMPLICIT, worklist=True).result == ABSTRACT_SYNTAX_NOT_SUPPORTED


def test_no_supported_transfer_syntax_is_result_4() -> None:
    assert one(US, UNKNOWN_SYNTAX).result == TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert one(US).result == TRANSFER_SYNTAXES_NOT_SUPPORTED  # no syntax proposed at all


def test_verification_is_accepted_uncompressed_only() -> None:
    assert one(VERIFICATION, JPEG_BASELINE, IMPLICIT) == ContextResult(1, ACCEPTANCE, IMPLICIT)
    assert one(VERIFICATION, JPEG_BASELINE).result == TRANSFER_SYNTAXES_NOT_SUPPORTED


def test_worklist_find_only_when_enabled() -> None:
    assert one(MWL, IMPLICIT, worklist=False).result == ABSTRACT_SYNTAX_NOT_SUPPORTED
    assert one(MWL, IMPLICIT, worklist=True) == ContextResult(1, ACCEPTANCE, IMPLICIT)
    assert service_for(MWL, worklist_enabled=True) == Service.FIND
    assert service_for(MWL, worklist_enabled=False) is None


def test_results_keep_the_proposal_order_and_ids_and_accepted_maps_by_id() -> None:
    proposals = [
        ContextProposal(1, VERIFICATION, (IMPLICIT,)),
        ContextProposal(3, PATIENT_ROOT_FIND, (IMPLICIT,)),
        ContextProposal(5, US, (JPEG_BASELINE, EXPLICIT)),
        ContextProposal(7, CT, (UNKNOWN_SYNTAX,)),
        ContextProposal(9, MWL, (EXPLICIT, IMPLICIT)),
    ]
    results, accepted = negotiate(proposals, worklist_enabled=True)
    assert [(r.id, r.result) for r in results] == [(1, 0), (3, 3), (5, 0), (7, 4), (9, 0)]
    assert accepted == {
        1: AcceptedContext(1, VERIFICATION, IMPLICIT, Service.ECHO),
        5: AcceptedContext(5, US, JPEG_BASELINE, Service.STORE),
        9: AcceptedContext(9, MWL, EXPLICIT, Service.FIND),
    }


def test_the_same_class_in_several_contexts_gets_each_its_own_syntax() -> None:
    proposals = [ContextProposal(1, US, (JPEG_BASELINE,)), ContextProposal(3, US, (EXPLICIT,))]
    _, accepted = negotiate(proposals, worklist_enabled=False)
    assert {c.id: c.transfer_syntax for c in accepted.values()} == {1: JPEG_BASELINE, 3: EXPLICIT}
