"""The routing decision: which destinations one instance goes to. Pure: no I/O, no logging.

Theory of operation. A ``RuleSet`` is an ordered tuple of compiled ``Rule`` objects
(``gateway.rules`` builds it from ``rules/*.yaml``; the language is in ``docs/rules.md``).
``route`` walks the rules in order; every rule whose conditions all hold adds its destinations
(the union, in first-seen order) until a matching rule has ``stop``. An instance that no rule sends
anywhere is *held*: its decision has no destinations.

A condition tests one *field*: ``calling_ae``, ``called_ae``, ``source_ip`` or a DICOM keyword.
The values of a field are a tuple of strings as DICOM presents them (multi-valued attributes keep
every value), or ``None`` when the attribute is missing. A test matches when ANY value matches and
fails on a missing attribute, except ``Exists(False)`` and ``Not`` (which inverts its inner test).
Everything a test needs (regexes, globs, networks) is compiled when the rules are loaded.

Two shortcuts keep ``route`` fast without changing a decision: ``source_ip`` reaches the tests as a
``SourceAddress`` (a ``str`` parsed once per decision for the ``cidr`` tests), and ``route`` walks
only ``RuleSet.candidates(calling_ae)``, skipping the rules whose ``Equals``/``OneOf`` conditions on
``calling_ae`` exclude the sender's title (such a rule cannot match, so it cannot add a destination
or stop). ``explain`` walks every rule.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.header import Header

Values = tuple[str, ...] | None
"""The values of one field in one header; ``None`` when the attribute is missing."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PEER_FIELDS = frozenset({"calling_ae", "called_ae", "source_ip"})
"""Fields that describe the association, not the dataset; every other field is a DICOM keyword."""


class Matcher(Protocol):
    """One operator of the rule language, compiled."""

    def __call__(self, values: Values) -> bool: ...

    def expectation(self) -> str:
        """What a matching value looks like, in words (for ``explain``)."""
        ...


@dataclass(frozen=True, slots=True)
class Equals:
    value: str

    def __call__(self, values: Values) -> bool:
        return values is not None and self.value in values

    def expectation(self) -> str:
        return repr(self.value)


@dataclass(frozen=True, slots=True)
class OneOf:
    choices: tuple[str, ...]
    _set: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", frozenset(self.choices))

    def __call__(self, values: Values) -> bool:
        return values is not None and not self._set.isdisjoint(values)

    def expectation(self) -> str:
        return f"one of {list(self.choices)!r}"


@dataclass(frozen=True, slots=True)
class Regex:
    """``re.search`` semantics: the pattern may match anywhere; anchor it with ``^...$``."""

    pattern: re.Pattern[str]

    def __call__(self, values: Values) -> bool:
        search = self.pattern.search
        return values is not None and any(search(v) is not None for v in values)

    def expectation(self) -> str:
        return f"a match for regex {self.pattern.pattern!r}"


@dataclass(frozen=True, slots=True)
class Glob:
    """``fnmatch.fnmatchcase`` semantics (whole value, case-sensitive), compiled to a regex."""

    glob: str
    pattern: re.Pattern[str]

    def __call__(self, values: Values) -> bool:
        match = self.pattern.match
        return values is not None and any(match(v) is not None for v in values)

    def expectation(self) -> str:
        return f"a match for glob {self.glob!r}"


@dataclass(frozen=True, slots=True)
class Exists:
    """``Exists(True)``: present with at least one value that is not empty or all spaces."""

    expected: bool

    def __call__(self, values: Values) -> bool:
        present = values is not None and any(v.strip() for v in values)
        return present is self.expected

    def expectation(self) -> str:
        return "present with a value" if self.expected else "missing or empty"


@dataclass(frozen=True, slots=True)
class Not:
    inner: Matcher

    def __call__(self, values: Values) -> bool:
        return not self.inner(values)

    def expectation(self) -> str:
        return f"not {self.inner.expectation()}"


@dataclass(frozen=True, slots=True)
class InNetwork:
    """An IP address (IPv4 or IPv6) inside any of ``networks``; IPv4-mapped IPv6 counts as IPv4."""

    networks: tuple[IPNetwork, ...]
    _ranges: tuple[tuple[int, int, int], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    """(version, netmask, network address) of each network, as integers."""

    def __post_init__(self) -> None:
        ranges = tuple((n.version, int(n.netmask), int(n.network_address)) for n in self.networks)
        object.__setattr__(self, "_ranges", ranges)

    def __call__(self, values: Values) -> bool:
        if values is None:
            return False
        for value in values:
            address = value.parsed if isinstance(value, SourceAddress) else parse_address(value)
            if address is not None and _inside(address, self._ranges):
                return True
        return False

    def expectation(self) -> str:
        shown = ", ".join(str(n) for n in self.networks)
        return f"an address in {shown}"


Address = tuple[int, int]
"""An IP address as (version, integer); IPv4-mapped IPv6 addresses are IPv4."""


@functools.lru_cache(maxsize=4096)  # one parse per peer address, not per instance (pure)
def parse_address(text: str) -> Address | None:
    """``text`` as an ``Address`` (a zone index, ``%eth0``, is ignored); ``None`` if it is not one."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.version, int(address))


def _inside(address: Address, ranges: tuple[tuple[int, int, int], ...]) -> bool:
    version, number = address
    for net_version, mask, network in ranges:  # noqa: SIM110 (a loop: this is the hot path)
        if net_version == version and number & mask == network:
            return True
    return False


class SourceAddress(str):
    """The value of the ``source_ip`` field: the text every test sees, parsed once per decision
    for the ``cidr`` tests (``parsed`` is ``None`` when the text is not an IP address)."""

    parsed: Address | None

    def __new__(cls, text: str) -> SourceAddress:
        value = super().__new__(cls, text)
        value.parsed = parse_address(text)
        return value


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    test: Matcher

    def explain_failure(self, values: Values) -> str:
        return f"{self.field} is {_shown(values)}, expected {self.test.expectation()}"


def _shown(values: Values) -> str:
    if values is None:
        return "missing"
    if not values:
        return "empty"
    if len(values) == 1:
        return repr(values[0])
    return repr(list(values))


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]
    destinations: tuple[str, ...]
    stop: bool = False
    origin: str = ""
    """Where the rule was written (``file:line``), for people reading explanations."""

    def matches(self, values: Mapping[str, tuple[str, ...]]) -> bool:
        for condition in self.conditions:  # noqa: SIM110 (a loop: this is the hot path)
            if not condition.test(values.get(condition.field)):
                return False
        return True

    def first_failure(self, values: Mapping[str, tuple[str, ...]]) -> str | None:
        for condition in self.conditions:
            if not condition.test(values.get(condition.field)):
                return condition.explain_failure(values.get(condition.field))
        return None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A validated, compiled set of rules; ``keywords`` (the DICOM keywords rules read) is derived,
    and so is an index of the rules by the calling AE titles they require (``candidates``)."""

    rules: tuple[Rule, ...] = ()
    files: tuple[Path, ...] = ()
    fingerprint: str = ""
    keywords: frozenset[str] = dataclasses.field(init=False)
    _by_calling_ae: Mapping[str, tuple[Rule, ...]] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _unlisted: tuple[Rule, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        read = {c.field for rule in self.rules for c in rule.conditions} - PEER_FIELDS
        object.__setattr__(self, "keywords", frozenset(read))
        by_title, unlisted = _index_by_calling_ae(self.rules)
        object.__setattr__(self, "_by_calling_ae", by_title)
        object.__setattr__(self, "_unlisted", unlisted)

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every destination some rule names, in first-seen order."""
        return tuple(dict.fromkeys(d for rule in self.rules for d in rule.destinations))

    def candidates(self, calling_ae: str) -> tuple[Rule, ...]:
        """The rules, in order, that can match an instance from ``calling_ae`` (the stripped title):
        every rule except those whose ``Equals``/``OneOf`` conditions on ``calling_ae`` exclude it."""
        return self._by_calling_ae.get(calling_ae, self._unlisted)


INDEX_LIMIT = 1 << 20
"""Largest index (titles x rules) built; a bigger rule set is walked whole."""


def required_calling_aes(rule: Rule) -> frozenset[str] | None:
    """The calling AE titles ``rule`` can match at all (``None``: any), from its ``Equals`` and
    ``OneOf`` conditions on ``calling_ae``. The field always has exactly one value, so a title
    outside this set fails one of those conditions."""
    allowed: frozenset[str] | None = None
    for condition in rule.conditions:
        test = condition.test
        if condition.field != "calling_ae":
            continue
        if isinstance(test, Equals):
            titles = frozenset((test.value,))
        elif isinstance(test, OneOf):
            titles = frozenset(test.choices)
        else:
            continue
        allowed = titles if allowed is None else allowed & titles
    return allowed


def _index_by_calling_ae(
    rules: tuple[Rule, ...],
) -> tuple[dict[str, tuple[Rule, ...]], tuple[Rule, ...]]:
    """(rules per title some rule requires, rules for any other title), each in rule order."""
    required = [required_calling_aes(rule) for rule in rules]
    titles = set().union(*(r for r in required if r is not None))
    if not titles or len(titles) * len(rules) > INDEX_LIMIT:
        return {}, rules
    unlisted = tuple(rule for rule, r in zip(rules, required, strict=True) if r is None)
    by_title = {
        title: tuple(rule for rule, r in zip(rules, required, strict=True) if r is None or title in r)
        for title in titles
    }
    return by_title, unlisted


@dataclass(frozen=True, slots=True)
class Decision:
    destinations: tuple[str, ...]
    matched: tuple[str, ...]

    @property
    def held(self) -> bool:
        return not self.destinations


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """How one rule fared. ``applied``: it matched and no earlier rule stopped evaluation.

    ``failure`` is the first condition that did not hold, in words (``None`` when it matched);
    ``stopped_by`` names the rule that stopped evaluation before this one, if any.
    """

    rule: str
    matched: bool
    applied: bool
    failure: str | None
    stopped_by: str | None = None


def field_values(header: Header) -> dict[str, tuple[str, ...]]:
    """Every field of ``header`` under the name rules use for it."""
    values = dict(header.attributes)
    values["calling_ae"] = (header.calling_ae.strip(" "),)
    values["called_ae"] = (header.called_ae.strip(" "),)
    values["source_ip"] = (SourceAddress(header.source_ip),)
    return values


def route(header: Header, ruleset: RuleSet) -> Decision:
    values = field_values(header)
    return decide(values, ruleset.candidates(values["calling_ae"][0]))


def decide(values: Mapping[str, tuple[str, ...]], rules: Iterable[Rule]) -> Decision:
    """Walk ``rules`` in order: every matching rule adds its destinations, until a matching rule
    with ``stop``. ``route`` passes the rules that can match the calling AE (``candidates``)."""
    destinations: dict[str, None] = {}
    matched: list[str] = []
    for rule in rules:
        if rule.matches(values):
            matched.append(rule.name)
            destinations.update(dict.fromkeys(rule.destinations))
            if rule.stop:
                break
    return Decision(tuple(destinations), tuple(matched))


def explain(header: Header, ruleset: RuleSet) -> list[RuleTrace]:
    """One trace per rule, in order; consistent with ``route``."""
    values = field_values(header)
    traces: list[RuleTrace] = []
    stopped_by: str | None = None
    for rule in ruleset.rules:
        failure = rule.first_failure(values)
        matched = failure is None
        applied = matched and stopped_by is None
        traces.append(RuleTrace(rule.name, matched, applied, failure, stopped_by))
        if matched and rule.stop and stopped_by is None:
            stopped_by = rule.name
    return traces
