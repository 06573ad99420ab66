"""The access policy: which calling AE titles and source addresses may associate (pure)."""

from __future__ import annotations

from gateway.access import AccessPolicy
from gateway.settings import Modality


def test_empty_list_is_open() -> None:
    policy = AccessPolicy([])
    assert policy.open
    assert policy.check("ANYONE", "192.0.2.1") is None


def test_unknown_calling_ae_is_rejected_1_1_3() -> None:
    policy = AccessPolicy([Modality(ae_title="US_ROOM3")])
    rejection = policy.check("CT_ROOM1", "127.0.0.1")
    assert rejection is not None
    assert (rejection.result, rejection.source, rejection.reason) == (1, 1, 3)
    assert rejection.label == "calling_ae"
    assert policy.check("US_ROOM3", "203.0.113.9") is None  # no addresses listed: any address


def test_known_ae_from_the_wrong_address_is_rejected() -> None:
    policy = AccessPolicy([Modality(ae_title="US_ROOM3", addresses=["10.20.0.0/16", "127.0.0.1"])])
    assert policy.check("US_ROOM3", "10.20.4.5") is None
    assert policy.check("US_ROOM3", "127.0.0.1") is None
    assert policy.check("US_ROOM3", "::ffff:10.20.4.5") is None
    wrong = policy.check("US_ROOM3", "10.21.0.1")
    assert wrong is not None and wrong.label == "source_ip"
    assert (wrong.result, wrong.source, wrong.reason) == (1, 1, 3)
    garbage = policy.check("US_ROOM3", "not-an-address")
    assert garbage is not None and garbage.label == "source_ip"


def test_titles_are_case_sensitive_and_trailing_spaces_ignored() -> None:
    policy = AccessPolicy([Modality(ae_title="US_ROOM3")])
    assert policy.check("US_ROOM3  ", "127.0.0.1") is None
    assert policy.check("us_room3", "127.0.0.1") is not None


def test_same_title_listed_twice_merges_addresses() -> None:
    policy = AccessPolicy([Modality(ae_title="US", addresses=["10.0.0.1"]),
                           Modality(ae_title="US", addresses=["10.0.0.2"])])
    assert policy.check("US", "10.0.0.1") is None
    assert policy.check("US", "10.0.0.2") is None
    assert policy.check("US", "10.0.0.3") is not None
