"""Pure decisions of gateway.scu: presentation contexts from the queue, and failure translation."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dicom.negotiation import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, UNCOMPRESSED
from gateway.dicom.pdu import ContextProposal
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    GatewayError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
)
from gateway.retry import FAILURE_KINDS, classify_failure
from gateway.scu import MAX_CONTEXTS, Failure, build_proposals, explain_peer, failure_of
from gateway.settings import Destination

US = "1.2.840.10008.5.1.4.1.1.6.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"


def _contexts_for(proposals: list[ContextProposal], sop_class: str) -> list[tuple[str, ...]]:
    return [p.transfer_syntaxes for p in proposals if p.abstract_syntax == sop_class]


# ------------------------------------------------------------------------------ build_proposals


def test_no_pairs_propose_nothing() -> None:
    assert build_proposals([]) == ([], set())


def test_an_uncompressed_object_gets_its_own_syntax_first_then_one_uncompressed_fallback() -> None:
    proposals, covered = build_proposals([(US, EXPLICIT_LE)])

    assert proposals == [
        ContextProposal(1, US, (EXPLICIT_LE,)),
        ContextProposal(3, US, UNCOMPRESSED),
    ]
    assert covered == {(US, EXPLICIT_LE)}


def test_a_compressed_object_gets_only_its_own_syntax() -> None:
    proposals, covered = build_proposals([(US, JPEG_BASELINE)])

    assert proposals == [ContextProposal(1, US, (JPEG_BASELINE,))]
    assert covered == {(US, JPEG_BASELINE)}


def test_the_fallback_is_proposed_once_per_sop_class() -> None:
    pairs = [(US, EXPLICIT_LE), (US, IMPLICIT_LE), (US, EXPLICIT_BE), (CT, IMPLICIT_LE), (US, JPEG_BASELINE)]

    proposals, covered = build_proposals(pairs)

    assert _contexts_for(proposals, US) == [
        (EXPLICIT_LE,),
        UNCOMPRESSED,
        (IMPLICIT_LE,),
        (EXPLICIT_BE,),
        (JPEG_BASELINE,),
    ]
    assert _contexts_for(proposals, CT) == [(IMPLICIT_LE,), UNCOMPRESSED]
    assert covered == set(pairs)


def test_repeated_pairs_are_proposed_once_in_queue_order() -> None:
    pairs = [(CT, J2K), (US, JPEG_BASELINE), (CT, J2K), (US, JPEG_BASELINE), (MR, RLE)]

    proposals, covered = build_proposals(pairs)

    assert [(p.abstract_syntax, p.transfer_syntaxes) for p in proposals] == [
        (CT, (J2K,)),
        (US, (JPEG_BASELINE,)),
        (MR, (RLE,)),
    ]
    assert covered == {(CT, J2K), (US, JPEG_BASELINE), (MR, RLE)}


def test_at_most_128_contexts_and_what_did_not_fit_is_not_covered() -> None:
    compressed = [(f"1.2.3.{i}", JPEG_BASELINE) for i in range(200)]

    proposals, covered = build_proposals(compressed)

    assert len(proposals) == MAX_CONTEXTS
    assert covered == set(compressed[:MAX_CONTEXTS])


def test_an_uncompressed_pair_that_needs_two_contexts_is_not_split_at_the_limit() -> None:
    pairs = [*((f"1.2.3.{i}", JPEG_BASELINE) for i in range(MAX_CONTEXTS - 1)), (US, EXPLICIT_LE)]

    proposals, covered = build_proposals(pairs)

    assert len(proposals) == MAX_CONTEXTS - 1
    assert (US, EXPLICIT_LE) not in covered
    assert all(p.abstract_syntax != US for p in proposals)


def test_uncompressed_pairs_fill_the_limit_two_contexts_each() -> None:
    pairs = [(f"1.2.3.{i}", EXPLICIT_LE) for i in range(100)]

    proposals, covered = build_proposals(pairs)

    assert len(proposals) == MAX_CONTEXTS
    assert covered == set(pairs[: MAX_CONTEXTS // 2])


SOP_CLASSES = st.sampled_from([US, CT, MR, *(f"1.2.3.{i}" for i in range(150))])
SYNTAXES = st.sampled_from([*UNCOMPRESSED, JPEG_BASELINE, J2K, RLE])


@given(st.lists(st.tuples(SOP_CLASSES, SYNTAXES), max_size=400))
def test_proposals_invariants(pairs: list[tuple[str, str]]) -> None:
    proposals, covered = build_proposals(pairs)

    assert len(proposals) <= MAX_CONTEXTS
    ids = [p.id for p in proposals]
    assert ids == sorted(set(ids)) and all(i % 2 == 1 and 1 <= i <= 255 for i in ids)
    distinct = list(dict.fromkeys(pairs))
    assert covered == set(distinct[: len(covered)]), "covered pairs are a prefix of the queue order"
    if pairs:
        assert pairs[0] in covered, "the object at hand is always covered"
    for sop_class, syntax in covered:
        own = [p for p in proposals if p.abstract_syntax == sop_class and p.transfer_syntaxes == (syntax,)]
        assert len(own) == 1
    for sop_class in {sop_class for sop_class, _ in covered}:
        mine = [p.transfer_syntaxes for p in proposals if p.abstract_syntax == sop_class]
        has_uncompressed = any((sop_class, s) in covered for s in UNCOMPRESSED)
        assert mine.count(UNCOMPRESSED) == (1 if has_uncompressed else 0)
        if has_uncompressed:
            first = next(i for i, syntaxes in enumerate(mine) if syntaxes[0] in UNCOMPRESSED)
            assert mine[first + 1] == UNCOMPRESSED, "the fallback follows the first original syntax"
    own_syntax = {
        (p.abstract_syntax, p.transfer_syntaxes[0]) for p in proposals if p.transfer_syntaxes != UNCOMPRESSED
    }
    assert own_syntax == covered


# ------------------------------------------------------------------------------ failure_of


@pytest.mark.parametrize("kind", ["connection_refused", "connect_timeout", "connection_reset"])
def test_unreachable_keeps_its_kind(kind: str) -> None:
    failure = failure_of(PeerUnreachable("nothing listens at 127.0.0.1:1", kind))

    assert failure == Failure(kind, None, "nothing listens at 127.0.0.1:1")  # type: ignore[arg-type]
    assert failure.kind in FAILURE_KINDS


def test_rejection_carries_result_source_reason() -> None:
    assert failure_of(AssociationRejected(1, 1, 3)) == Failure("association_rejected", (1, 1, 3))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (AssociationAborted("the peer aborted the association"), "aborted"),
        (PeerTimeout("no PDU within 1 s"), "dimse_timeout"),
        (ProtocolError("unexpected PDU"), "protocol_error"),
        (GatewayError("something else"), "protocol_error"),
        (ValueError("foreign"), "protocol_error"),
    ],
)
def test_other_errors_map_to_their_kind_with_the_message_as_detail(exc: BaseException, kind: str) -> None:
    failure = failure_of(exc)

    assert failure.kind == kind
    assert failure.rj is None
    assert failure.detail == str(exc)


def test_an_oserror_is_a_local_error_described_by_its_strerror() -> None:
    failure = failure_of(FileNotFoundError(errno.ENOENT, "No such file or directory", "/spool/x.dcm"))

    assert failure == Failure("local_error", None, "No such file or directory")


# --------------------------------------------------- failure_of + classify_failure, as the forwarder does


def failure_of_outcome(exc: BaseException) -> str:
    failure = failure_of(exc)
    return classify_failure(failure.kind, rj=failure.rj)


@pytest.mark.parametrize(
    ("rj", "outcome"),
    [
        ((1, 1, 3), "permanent"),  # calling AE not recognized: needs the PACS administrator
        ((1, 1, 7), "permanent"),  # called AE not recognized: needs our configuration fixed
        ((1, 1, 2), "permanent"),  # application context not supported
        ((1, 2, 2), "permanent"),  # protocol version not supported
        ((1, 1, 1), "transient"),  # rejected-permanent without a reason: storescp --refuse
        ((1, 2, 1), "transient"),
        ((2, 1, 1), "transient"),
        ((2, 3, 2), "transient"),  # local limit exceeded
        ((2, 3, 1), "transient"),  # congestion
    ],
)
def test_rejections_are_permanent_only_when_they_name_a_cause(rj: tuple[int, int, int], outcome: str) -> None:
    assert failure_of_outcome(AssociationRejected(*rj)) == outcome


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [
        ("connection_refused", "transient"),
        ("connect_timeout", "transient"),
        ("connection_reset", "transient"),
        ("dimse_timeout", "transient"),
        ("aborted", "transient"),
        ("protocol_error", "transient"),
        ("no_presentation_context", "permanent"),
        ("local_error", "permanent"),
    ],
)
def test_failures_without_a_rejection_follow_the_retry_table(kind: str, outcome: str) -> None:
    assert classify_failure(Failure(kind).kind) == outcome  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ explain_peer


def test_explanations_name_the_peer_its_address_and_the_ae_titles() -> None:
    pacs = Destination(ae_title="PRODPACS", host="10.1.2.3", port=104)

    unreachable = PeerUnreachable("nothing listens at 10.1.2.3:104", "connection_refused")
    refused = explain_peer("PACS_PROD", pacs, "DICOMGW", failure_of(unreachable))
    timeout = PeerUnreachable("no answer from 10.1.2.3:104 within 10 s", "connect_timeout")
    silent = explain_peer("PACS_PROD", pacs, "DICOMGW", failure_of(timeout))
    calling = explain_peer("PACS_PROD", pacs, "DICOMGW", failure_of(AssociationRejected(1, 1, 3)))
    called = explain_peer("PACS_PROD", pacs, "DICOMGW", failure_of(AssociationRejected(1, 1, 7)))

    assert refused == (
        "PACS_PROD: nothing listens at 10.1.2.3:104: check that the PACS is running and the port "
        "is right (destinations.PACS_PROD.port)"
    ), "the exception message would only repeat the explanation"
    assert silent.endswith("(no answer from 10.1.2.3:104 within 10 s)"), "the timeout is worth saying"
    assert "calling AE title DICOMGW" in calling and "1,1,3" in calling
    assert "called AE title PRODPACS" in called and "destinations.PACS_PROD.ae_title" in called
