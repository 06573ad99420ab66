"""Failure explanations: one line, the peer's name first, the facts an administrator needs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.explain import Problem, explain_failure, explain_status, uid_name
from gateway.retry import FAILURE_KINDS

PEER: dict[str, Any] = {
    "peer_name": "PACS_PROD",
    "host": "10.1.2.3",
    "port": 104,
    "called_ae": "PRODPACS",
    "calling_ae": "DICOMGW",
}
US = "1.2.840.10008.5.1.4.1.1.6.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def explain(kind: Problem, **kwargs: Any) -> str:
    text = explain_failure(kind, **PEER, **kwargs)
    assert text.startswith("PACS_PROD: ")
    assert "\n" not in text and "\r" not in text
    return text


def test_connection_refused_names_the_address() -> None:
    text = explain("connection_refused")
    assert "nothing listens at 10.1.2.3:104" in text
    assert "PACS is running" in text and "port" in text


def test_connect_timeout_suspects_a_firewall_or_the_ip() -> None:
    text = explain("connect_timeout")
    assert "no answer from 10.1.2.3:104" in text
    assert "firewall" in text and "IP" in text


def test_tls_error_names_the_certificate_settings() -> None:
    text = explain("tls_error")
    assert "TLS handshake with 10.1.2.3:104 failed" in text
    assert "tls.ca_bundle" in text


def test_ipv6_address_is_bracketed() -> None:
    text = explain_failure("connection_refused", **{**PEER, "host": "fd00::5"})
    assert "[fd00::5]:104" in text


@pytest.mark.parametrize("rj", [(1, 1, 7), (2, 1, 7)])
def test_unknown_called_ae(rj: tuple[int, int, int]) -> None:
    text = explain("association_rejected", rj=rj)
    assert "does not know the called AE title PRODPACS" in text
    assert "destinations.PACS_PROD.ae_title" in text
    assert f"A-ASSOCIATE-RJ {rj[0]},{rj[1]},{rj[2]}" in text


def test_unknown_calling_ae() -> None:
    text = explain("association_rejected", rj=(1, 1, 3))
    assert "does not know our calling AE title DICOMGW" in text
    assert "register DICOMGW" in text


def test_config_key_can_name_the_worklist() -> None:
    text = explain("association_rejected", rj=(1, 1, 7), config_key="worklist")
    assert "(worklist.ae_title)" in text


@pytest.mark.parametrize("rj", [(1, 1, 2), (2, 1, 2)])
def test_application_context_not_supported(rj: tuple[int, int, int]) -> None:
    assert "application context" in explain("association_rejected", rj=rj)


def test_no_reason_given() -> None:
    text = explain("association_rejected", rj=(1, 1, 1))
    assert "rejected without a reason" in text
    assert "peer's log" in text and "known AEs" in text


@pytest.mark.parametrize("rj", [(2, 2, 1), (2, 1, 1), (1, 3, 1), (2, 3, 1), (2, 3, 2)])
def test_busy_or_limit_is_temporary_overload(rj: tuple[int, int, int]) -> None:
    assert "temporarily overloaded" in explain("association_rejected", rj=rj)


def test_association_limit_points_at_our_associations_setting() -> None:
    assert "destinations.PACS_PROD.associations" in explain("association_rejected", rj=(2, 3, 2))


def test_protocol_version_not_supported() -> None:
    assert "protocol version" in explain("association_rejected", rj=(2, 2, 2))


def test_rejection_without_codes_or_with_unknown_codes() -> None:
    assert "rejected the association" in explain("association_rejected")
    text = explain("association_rejected", rj=(1, 9, 9))
    assert "unknown reason" in text and "A-ASSOCIATE-RJ 1,9,9" in text


def test_dimse_timeout() -> None:
    text = explain("dimse_timeout")
    assert "accepted the association but did not answer in time" in text
    assert "destinations.PACS_PROD.dimse_timeout" in text


def test_aborted_with_and_without_source() -> None:
    assert "aborted the association" in explain("aborted")
    text = explain("aborted", abort=(2, 2))
    assert "A-ABORT" in text and "protocol layer" in text and "unexpected PDU" in text
    assert "source 7" in explain("aborted", abort=(7, 9))


def test_no_presentation_context_names_sop_class_and_transfer_syntax() -> None:
    text = explain("no_presentation_context", sop_class_uid=US, transfer_syntax_uid=JPEG_BASELINE)
    assert "accepts no transfer syntax" in text
    assert f"'Ultrasound Image Storage' ({US})" in text
    assert f"'JPEG Baseline (Process 1)' ({JPEG_BASELINE})" in text
    assert "configure the PACS to accept it" in text


def test_no_presentation_context_with_a_private_sop_class() -> None:
    text = explain("no_presentation_context", sop_class_uid="1.2.3.4.5")
    assert "SOP class 1.2.3.4.5 " in text


def test_uid_name_falls_back_to_the_uid() -> None:
    assert uid_name("1.2.3") == "1.2.3"
    assert uid_name(JPEG_BASELINE) == f"'JPEG Baseline (Process 1)' ({JPEG_BASELINE})"


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (0xA700, "0xA700 Refused: Out of Resources (transient: will retry)"),
        (0xA702, "0xA702 Refused: Out of Resources (transient: will retry)"),
        (0xC211, "0xC211 Cannot Understand (permanent: not retried)"),
        (0xA900, "0xA900 Data Set Does Not Match SOP Class (permanent: not retried)"),
        (0x0122, "0x0122 Refused: SOP Class Not Supported (permanent: not retried)"),
        (0x0110, "0x0110 Processing Failure (transient: will retry)"),
        (0xB000, "0xB000 Coercion of Data Elements (warning: counts as delivered)"),
        (0x0000, "0x0000 Success (delivered)"),
        (0x1234, "0x1234 unknown status (transient: will retry)"),
    ],
)
def test_explain_status(status: int, words: str) -> None:
    assert explain_status(status) == words


def test_explain_status_follows_overrides() -> None:
    assert explain_status(0xA700, {"A7xx": "permanent"}).endswith("(permanent: not retried)")


def test_dimse_status_failure() -> None:
    text = explain("dimse_status", status=0x0122)
    assert "0x0122 Refused: SOP Class Not Supported (permanent: not retried)" in text
    assert "requeue" in text
    assert "0xA700" in explain("dimse_status", status=0xA700)


def test_detail_is_appended_on_one_line() -> None:
    text = explain("protocol_error", detail="unexpected PDU type 0x09\r\nafter\tA-ASSOCIATE")
    assert text.endswith("(unexpected PDU type 0x09 after A-ASSOCIATE)")


@given(
    kind=st.sampled_from((*FAILURE_KINDS, "dimse_status")),
    name=st.text(min_size=1, max_size=20).filter(lambda s: s.isprintable() and s.strip() == s),
    detail=st.text(max_size=40),
    rj=st.none() | st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 10)),
    status=st.none() | st.integers(0, 0xFFFF),
)
def test_every_message_is_one_line_starting_with_the_peer_name(
    kind: Problem, name: str, detail: str, rj: tuple[int, int, int] | None, status: int | None
) -> None:
    text = explain_failure(kind, **{**PEER, "peer_name": name}, rj=rj, status=status, detail=detail)
    assert text.startswith(f"{' '.join(name.split())}: ")
    assert len(text.splitlines()) == 1
    assert text.isprintable()
