"""The pure routing decision: operators, evaluation order, explanations, and its properties."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.header import Header
from gateway.routing import (
    INDEX_LIMIT,
    Condition,
    Decision,
    Equals,
    Exists,
    Glob,
    InNetwork,
    IPNetwork,
    Matcher,
    Not,
    OneOf,
    Rule,
    RuleSet,
    SourceAddress,
    decide,
    explain,
    field_values,
    route,
)
from gateway.rules import RuleFile, compile_rules

DESTINATIONS = ("PACS_TEST", "PACS_PROD", "ARCHIVE")


def ruleset(text: str) -> RuleSet:
    return compile_rules([RuleFile(Path("t.yaml"), text.encode())], DESTINATIONS)


def header(
    calling_ae: str = "US1",
    called_ae: str = "DICOMGW",
    source_ip: str = "10.20.1.2",
    **attributes: tuple[str, ...],
) -> Header:
    return Header(calling_ae, called_ae, source_ip, attributes)


def matches(condition: str, h: Header) -> bool:
    """Whether a one-rule set with ``match: {condition}`` sends ``h`` anywhere."""
    rules = ruleset(f"rules:\n  - name: r\n    match:\n      {condition}\n    destinations: [PACS_TEST]\n")
    return route(h, rules).destinations == ("PACS_TEST",)


MISSING = None  # the attribute is absent from the header


@pytest.mark.parametrize(
    ("condition", "values", "expected"),
    [
        # plain value: exact, case-sensitive, any of a multi-valued attribute
        ("Modality: US", ("US",), True),
        ("Modality: US", ("CT",), False),
        ("Modality: US", ("us",), False),
        ("Modality: US", ("US ",), False),
        ("Modality: US", (), False),
        ("Modality: US", MISSING, False),
        ("ImageType: DERIVED", ("ORIGINAL", "PRIMARY"), False),
        ("ImageType: DERIVED", ("DERIVED", "SECONDARY"), True),
        # regex: re.search, anywhere in the value unless anchored
        ('StudyDescription: {regex: "(?i)phantom|qa"}', ("Daily QA check",), True),
        ('StudyDescription: {regex: "(?i)phantom|qa"}', ("Abdomen",), False),
        ('StudyDescription: {regex: "(?i)phantom|qa"}', MISSING, False),
        ('StudyDescription: {regex: "^CT$"}', ("CTA",), False),
        ('StudyDescription: {regex: "^CT$"}', ("MR", "CT"), True),
        # glob: fnmatchcase, the whole value, case-sensitive
        ('PatientName: {glob: "TEST^*"}', ("TEST^Phantom",), True),
        ('PatientName: {glob: "TEST^*"}', ("test^phantom",), False),
        ('PatientName: {glob: "TEST^*"}', ("XTEST^A",), False),
        ('PatientName: {glob: "TEST^*"}', MISSING, False),
        ('StationName: {glob: "US?"}', ("US1",), True),
        ('StationName: {glob: "US[12]"}', ("US3",), False),
        # PN is compared as the stored string
        ('PatientName: "Doe^John"', ("Doe^John",), True),
        ('PatientName: "Doe^John"', ("Doe^John^^^",), False),
        # in
        ("SOPClassUID: {in: ['1.2.3', '1.2.4']}", ("1.2.4",), True),
        ("SOPClassUID: {in: ['1.2.3', '1.2.4']}", ("1.2.5",), False),
        ("SOPClassUID: {in: ['1.2.3', '1.2.4']}", MISSING, False),
        ("ImageType: {in: [DERIVED, LOCALIZER]}", ("ORIGINAL", "LOCALIZER"), True),
        # exists: present with at least one non-empty value
        ("AccessionNumber: {exists: true}", ("A1",), True),
        ("AccessionNumber: {exists: true}", ("",), False),
        ("AccessionNumber: {exists: true}", ("  ",), False),
        ("AccessionNumber: {exists: true}", (), False),
        ("AccessionNumber: {exists: true}", MISSING, False),
        ("AccessionNumber: {exists: true}", ("", "A1"), True),
        ("AccessionNumber: {exists: false}", ("A1",), False),
        ("AccessionNumber: {exists: false}", ("",), True),
        ("AccessionNumber: {exists: false}", (), True),
        ("AccessionNumber: {exists: false}", MISSING, True),
        # not inverts the inner result, also for a missing attribute
        ('InstitutionName: {not: {glob: "*Clinic*"}}', ("City Clinic",), False),
        ('InstitutionName: {not: {glob: "*Clinic*"}}', ("General Hospital",), True),
        ('InstitutionName: {not: {glob: "*Clinic*"}}', MISSING, True),
        ("Modality: {not: US}", ("US",), False),
        ("Modality: {not: US}", ("CT",), True),
        ("Modality: {not: {exists: true}}", MISSING, True),
        ("Modality: {not: {exists: false}}", MISSING, False),
        ("Modality: {not: {not: US}}", ("US",), True),
    ],
)
def test_operator(condition: str, values: tuple[str, ...] | None, expected: bool) -> None:
    field = condition.split(":", 1)[0]
    attributes = {} if values is None else {field: values}
    h = Header("US1", "DICOMGW", "10.20.1.2", attributes)
    assert matches(condition, h) is expected


@pytest.mark.parametrize(
    ("condition", "source_ip", "expected"),
    [
        ("source_ip: {cidr: 10.20.0.0/16}", "10.20.5.5", True),
        ("source_ip: {cidr: 10.20.0.0/16}", "10.21.0.1", False),
        ("source_ip: {cidr: 10.20.0.0/16}", "::ffff:10.20.1.1", True),
        ("source_ip: {cidr: 10.20.0.0/16}", "not an address", False),
        ("source_ip: {cidr: 10.20.0.0/16}", "", False),
        ("source_ip: {cidr: 'fd00::/8'}", "fd00::1", True),
        ("source_ip: {cidr: 'fd00::/8'}", "fe80::1%eth0", False),
        ("source_ip: {cidr: 'fe80::/10'}", "fe80::1%eth0", True),
        ("source_ip: {cidr: 'fd00::/8'}", "10.20.1.1", False),
        ("source_ip: {cidr: [192.168.0.0/24, 10.20.0.0/16]}", "10.20.0.9", True),
        ("source_ip: {cidr: [192.168.0.0/24, 10.20.0.0/16]}", "172.16.0.1", False),
        ("source_ip: {not: {cidr: 10.0.0.0/8}}", "192.168.1.1", True),
        ("source_ip: 10.20.1.2", "10.20.1.2", True),
        ("source_ip: 10.20.1.2", "::ffff:10.20.1.2", True),
        ("source_ip: 10.20.1.2", "10.20.1.3", False),
        ('source_ip: {glob: "10.20.*"}', "10.20.1.3", True),
    ],
)
def test_source_ip(condition: str, source_ip: str, expected: bool) -> None:
    assert matches(condition, header(source_ip=source_ip)) is expected


def test_calling_and_called_ae() -> None:
    assert matches("calling_ae: US_ROOM3", header(calling_ae="US_ROOM3"))
    assert matches("calling_ae: US_ROOM3", header(calling_ae="US_ROOM3   "))  # padding ignored
    assert not matches("calling_ae: US_ROOM3", header(calling_ae="US_ROOM4"))
    assert matches("called_ae: GW_TEST", header(called_ae="GW_TEST"))
    assert not matches("called_ae: GW_TEST", header(called_ae="DICOMGW"))
    assert matches('calling_ae: {glob: "US_*"}', header(calling_ae="US_ROOM9"))


def test_every_condition_must_hold() -> None:
    rules = ruleset(
        "rules:\n  - name: r\n    match: {calling_ae: US1, Modality: US}\n"
        "    destinations: [PACS_TEST]\n"
    )
    assert route(header(Modality=("US",)), rules).matched == ("r",)
    assert route(header(Modality=("CT",)), rules).matched == ()
    assert route(header(calling_ae="CT1", Modality=("US",)), rules).matched == ()


FANOUT = """
rules:
  - name: a
    match: {Modality: US}
    destinations: [PACS_TEST]
  - name: b
    destinations: [PACS_PROD, PACS_TEST]
  - name: stop-ct
    match: {Modality: CT}
    destinations: [ARCHIVE]
    stop: true
  - name: after
    destinations: [ARCHIVE, PACS_PROD]
"""


def test_union_in_first_seen_order_until_stop() -> None:
    rules = ruleset(FANOUT)
    us = route(header(Modality=("US",)), rules)
    assert us == Decision(("PACS_TEST", "PACS_PROD", "ARCHIVE"), ("a", "b", "after"))
    ct = route(header(Modality=("CT",)), rules)
    assert ct == Decision(("PACS_PROD", "PACS_TEST", "ARCHIVE"), ("b", "stop-ct"))


def test_no_rule_or_no_match_means_held() -> None:
    decision = route(header(), RuleSet())
    assert decision == Decision((), ()) and decision.held
    only_ct = ruleset("rules:\n  - name: ct\n    match: {Modality: CT}\n    destinations: [ARCHIVE]\n")
    assert route(header(Modality=("US",)), only_ct).held
    assert not route(header(Modality=("CT",)), only_ct).held


def test_a_matching_rule_with_no_destinations_holds_and_can_stop() -> None:
    rules = ruleset(
        "rules:\n  - name: hold-qa\n    match: {StudyDescription: {regex: QA}}\n"
        "    destinations: []\n    stop: true\n"
        "  - name: rest\n    destinations: [PACS_PROD]\n"
    )
    qa = route(header(StudyDescription=("QA",)), rules)
    assert qa == Decision((), ("hold-qa",)) and qa.held
    assert route(header(), rules).destinations == ("PACS_PROD",)


def test_keywords_are_the_dicom_keywords_rules_read() -> None:
    rules = ruleset(FANOUT + "  - name: z\n    match: {calling_ae: X, source_ip: {cidr: 10.0.0.0/8},"
                    " PatientName: {not: {exists: true}}}\n    destinations: []\n")
    assert rules.keywords == frozenset({"Modality", "PatientName"})
    assert rules.destinations == ("PACS_TEST", "PACS_PROD", "ARCHIVE")


def test_explain_names_the_first_failing_condition() -> None:
    rules = ruleset(
        "rules:\n"
        "  - name: us\n    match: {Modality: US, AccessionNumber: A1}\n    destinations: [PACS_TEST]\n"
        "  - name: acc\n    match: {Modality: CT, AccessionNumber: A1}\n    destinations: [PACS_TEST]\n"
        "  - name: multi\n    match: {ImageType: {in: [LOCALIZER]}}\n    destinations: [ARCHIVE]\n"
        "  - name: near\n    match: {source_ip: {cidr: 10.9.0.0/16}}\n    destinations: [ARCHIVE]\n"
        "  - name: stop\n    destinations: [PACS_PROD]\n    stop: true\n"
        "  - name: later\n    destinations: [ARCHIVE]\n"
    )
    h = header(Modality=("CT",), ImageType=("ORIGINAL", "PRIMARY"))
    traces = {t.rule: t for t in explain(h, rules)}
    assert [t.rule for t in explain(h, rules)] == ["us", "acc", "multi", "near", "stop", "later"]
    assert traces["us"].failure == "Modality is 'CT', expected 'US'"
    assert traces["acc"].failure == "AccessionNumber is missing, expected 'A1'"
    assert traces["multi"].failure == (
        "ImageType is ['ORIGINAL', 'PRIMARY'], expected one of ['LOCALIZER']"
    )
    assert traces["near"].failure == "source_ip is '10.20.1.2', expected an address in 10.9.0.0/16"
    assert traces["stop"].matched and traces["stop"].applied and traces["stop"].failure is None
    later = traces["later"]
    assert later.matched and not later.applied and later.stopped_by == "stop"


@pytest.mark.parametrize(
    ("condition", "attributes", "failure"),
    [
        ("AccessionNumber: {exists: true}", {"AccessionNumber": ()}, "AccessionNumber is empty, "
         "expected present with a value"),
        ("AccessionNumber: {exists: false}", {"AccessionNumber": ("A",)}, "AccessionNumber is 'A', "
         "expected missing or empty"),
        ('PatientName: {glob: "TEST^*"}', {}, "PatientName is missing, expected a match for glob "
         "'TEST^*'"),
        ('StudyDescription: {regex: "qa"}', {"StudyDescription": ("x",)}, "StudyDescription is "
         "'x', expected a match for regex 'qa'"),
        ('InstitutionName: {not: {glob: "*Clinic*"}}', {"InstitutionName": ("A Clinic",)},
         "InstitutionName is 'A Clinic', expected not a match for glob '*Clinic*'"),
    ],
)
def test_explain_wording(condition: str, attributes: dict[str, tuple[str, ...]], failure: str) -> None:
    rules = ruleset(f"rules:\n  - name: r\n    match:\n      {condition}\n    destinations: []\n")
    (trace,) = explain(Header("US1", "GW", "127.0.0.1", attributes), rules)
    assert not trace.matched and trace.failure == failure


# --- properties -------------------------------------------------------------------------------

FIELDS = ("calling_ae", "Modality", "BodyPartExamined")
VALUES = ("A", "B", "C")

matchers: st.SearchStrategy[Matcher] = st.one_of(
    st.builds(Equals, st.sampled_from(VALUES)),
    st.builds(OneOf, st.lists(st.sampled_from(VALUES), min_size=1, max_size=2).map(tuple)),
    st.builds(Exists, st.booleans()),
    st.builds(Not, st.builds(Equals, st.sampled_from(VALUES))),
)
conditions = st.lists(
    st.tuples(st.sampled_from(FIELDS), matchers), max_size=2, unique_by=lambda c: c[0]
).map(lambda cs: tuple(Condition(f, m) for f, m in cs))
rule_specs = st.tuples(
    conditions, st.lists(st.sampled_from(DESTINATIONS), max_size=3, unique=True), st.booleans()
)


def build(specs: list[tuple[tuple[Condition, ...], list[str], bool]], prefix: str = "r") -> RuleSet:
    return RuleSet(
        tuple(Rule(f"{prefix}{i}", c, tuple(d), stop) for i, (c, d, stop) in enumerate(specs))
    )


rulesets = st.lists(rule_specs, max_size=8).map(build)
headers = st.builds(
    lambda ae, attributes: Header(ae, "GW", "127.0.0.1", attributes),
    st.sampled_from(VALUES),
    st.dictionaries(
        st.sampled_from(FIELDS[1:]), st.lists(st.sampled_from((*VALUES, "")), max_size=2).map(tuple)
    ),
)


def reference(h: Header, rules: RuleSet) -> Decision:
    """The documented semantics, from one-rule decisions: union in order until a matching stop."""
    matched: list[Rule] = []
    for rule in rules.rules:
        if route(h, RuleSet((rule,))).matched:
            matched.append(rule)
            if rule.stop:
                break
    destinations = dict.fromkeys(d for rule in matched for d in rule.destinations)
    return Decision(tuple(destinations), tuple(rule.name for rule in matched))


@given(headers, rulesets)
def test_route_is_deterministic_and_stays_within_the_rules_destinations(
    h: Header, rules: RuleSet
) -> None:
    decision = route(h, rules)
    assert route(h, rules) == decision
    assert set(decision.destinations) <= set(rules.destinations)
    assert len(set(decision.destinations)) == len(decision.destinations)


@given(headers, rulesets)
def test_route_is_the_union_in_first_seen_order_until_a_stop(h: Header, rules: RuleSet) -> None:
    assert route(h, rules) == reference(h, rules)


@given(headers, rulesets, st.lists(rule_specs, max_size=4))
def test_nothing_after_the_first_matching_stop_contributes(
    h: Header, rules: RuleSet, extra: list[tuple[tuple[Condition, ...], list[str], bool]]
) -> None:
    decision = route(h, rules)
    stopped = any(r.stop and r.name == decision.matched[-1] for r in rules.rules if decision.matched)
    longer = RuleSet(rules.rules + build(extra, prefix="x").rules)
    if stopped:
        assert route(h, longer) == decision
    else:
        assert route(h, longer).matched[: len(decision.matched)] == decision.matched


@given(headers, rulesets, st.lists(st.sampled_from(DESTINATIONS), min_size=1, unique=True))
def test_a_rule_without_match_matches_everything(
    h: Header, rules: RuleSet, destinations: list[str]
) -> None:
    catch_all = Rule("all", (), tuple(destinations))
    assert route(h, RuleSet((catch_all,))) == Decision(tuple(destinations), ("all",))
    decision = route(h, RuleSet((*rules.rules, catch_all)))
    stopped_before = any(r.stop for r in rules.rules if r.name in route(h, rules).matched)
    assert ("all" in decision.matched) is not stopped_before
    if not stopped_before:
        assert set(destinations) <= set(decision.destinations)


@given(headers, rulesets)
def test_explain_agrees_with_route(h: Header, rules: RuleSet) -> None:
    traces = explain(h, rules)
    decision = route(h, rules)
    assert tuple(t.rule for t in traces if t.applied) == decision.matched
    assert [t.rule for t in traces] == [r.name for r in rules.rules]
    for trace, rule in zip(traces, rules.rules, strict=True):
        assert trace.matched == bool(route(h, RuleSet((rule,))).matched)
        assert (trace.failure is None) == trace.matched


# --- the fast paths agree with the plain semantics ----------------------------------------------

TITLES = ("A", "B", "C", "US_ROOM3")
title_matchers: st.SearchStrategy[Matcher] = st.one_of(
    st.builds(Equals, st.sampled_from(TITLES)),
    st.builds(OneOf, st.lists(st.sampled_from(TITLES), min_size=1, max_size=3).map(tuple)),
    st.builds(Not, st.builds(Equals, st.sampled_from(TITLES))),
    st.builds(Exists, st.booleans()),
    st.builds(Glob, st.just("US_*"), st.just(re.compile(fnmatch.translate("US_*")))),
)
title_conditions = st.lists(
    st.one_of(
        st.tuples(st.just("calling_ae"), title_matchers),
        st.tuples(st.sampled_from(FIELDS[1:]), matchers),
    ),
    max_size=3,
).map(lambda cs: tuple(Condition(f, m) for f, m in cs))
title_rulesets = st.lists(
    st.tuples(title_conditions, st.lists(st.sampled_from(DESTINATIONS), max_size=2, unique=True),
              st.booleans()),
    max_size=10,
).map(build)
padded_titles = st.tuples(st.sampled_from((*TITLES, "D")), st.sampled_from(("", " ", "  "))).map(
    lambda t: t[0] + t[1]
)
title_headers = st.builds(
    lambda ae, attributes: Header(ae, "GW", "127.0.0.1", attributes),
    padded_titles,
    st.dictionaries(
        st.sampled_from(FIELDS[1:]), st.lists(st.sampled_from((*VALUES, "")), max_size=2).map(tuple)
    ),
)


def plain_loop(h: Header, rules: RuleSet) -> Decision:
    """``route`` without the calling AE index: every rule, in order, until a matching stop."""
    return decide(field_values(h), rules.rules)


@given(title_headers, title_rulesets)
def test_the_calling_ae_index_decides_exactly_like_the_plain_loop(h: Header, rules: RuleSet) -> None:
    assert route(h, rules) == plain_loop(h, rules)
    skipped = set(rules.rules) - set(rules.candidates(h.calling_ae.strip(" ")))
    assert not any(rule.matches(field_values(h)) for rule in skipped)


def test_the_index_skips_rules_that_require_another_calling_ae() -> None:
    rules = ruleset(
        "rules:\n"
        "  - name: room3\n    match: {Modality: US, calling_ae: US_ROOM3}\n    destinations: [PACS_TEST]\n"
        "  - name: rooms\n    match: {calling_ae: {in: [US_ROOM3, CT_ROOM1]}}\n    destinations: [ARCHIVE]\n"
        "  - name: not-room3\n    match: {calling_ae: {not: US_ROOM3}}\n    destinations: [ARCHIVE]\n"
        "  - name: rest\n    destinations: [PACS_PROD]\n"
    )
    names = {ae: [r.name for r in rules.candidates(ae)] for ae in ("US_ROOM3", "CT_ROOM1", "MR_ROOM2")}
    assert names == {
        "US_ROOM3": ["room3", "rooms", "not-room3", "rest"],
        "CT_ROOM1": ["rooms", "not-room3", "rest"],
        "MR_ROOM2": ["not-room3", "rest"],
    }
    assert route(header(calling_ae="US_ROOM3 ", Modality=("US",)), rules) == Decision(
        ("PACS_TEST", "ARCHIVE", "PACS_PROD"), ("room3", "rooms", "rest")
    )


def test_a_rule_set_too_large_to_index_is_walked_whole() -> None:
    count = 1025  # 1025 titles x 1025 rules > INDEX_LIMIT
    assert count * count > INDEX_LIMIT
    specs: list[tuple[tuple[Condition, ...], list[str], bool]] = [
        ((Condition("calling_ae", Equals(f"AE{i}")),), ["ARCHIVE"], False) for i in range(count)
    ]
    rules = build(specs)
    assert rules.candidates("AE7") == rules.rules
    assert route(header(calling_ae="AE7"), rules) == Decision(("ARCHIVE",), ("r7",))


def reference_in_networks(text: str, networks: tuple[IPNetwork, ...]) -> bool:
    """The documented ``cidr`` semantics, with ``ipaddress`` objects throughout."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
networks = st.one_of(
    st.tuples(ipv4, st.integers(0, 32)).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
    st.tuples(ipv6, st.integers(0, 128)).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
)
address_texts = st.one_of(
    ipv4.map(str),
    ipv6.map(str),
    ipv4.map(lambda a: f"::ffff:{a}"),
    ipv6.map(lambda a: f"{a}%eth0"),
    st.sampled_from(("", "not an address", "10.0.0", "fe80::1%", "::ffff:10.1.2.3")),
)


@given(address_texts, st.lists(networks, min_size=1, max_size=4).map(tuple))
def test_cidr_with_a_parsed_source_address_agrees_with_ipaddress(
    text: str, nets: tuple[IPNetwork, ...]
) -> None:
    expected = reference_in_networks(text, nets)
    test = InNetwork(nets)
    assert test((SourceAddress(text),)) is expected
    assert test((text,)) is expected  # a plain string (any field) is parsed on the spot
    assert route(header(source_ip=text), RuleSet((Rule("r", (Condition("source_ip", test),), ("ARCHIVE",)),))
                 ).destinations == (("ARCHIVE",) if expected else ())


def test_the_source_address_is_still_text_for_every_other_test() -> None:
    value = field_values(header(source_ip="10.20.1.2"))["source_ip"]
    assert value == ("10.20.1.2",) and isinstance(value[0], SourceAddress)
    assert repr(value[0]) == "'10.20.1.2'"
    assert matches('source_ip: {glob: "10.20.*"}', header(source_ip="10.20.1.2"))
