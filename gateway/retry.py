"""Pure forwarding decisions: how long to wait, what a result means, and what to do next.

Theory of operation. Every forwarding attempt ends in one of four :data:`Outcome` values:

* ``delivered`` / ``warning``: the PACS holds the object (a warning still counts as delivered);
* ``transient``: it may work later, so the attempt is retried after :func:`backoff`;
* ``permanent``: trying again will not help, so the object goes to the dead letters at once.

A C-STORE response status is mapped by :func:`classify_status` through a table of
``(pattern, outcome)`` entries (:data:`DEFAULT_STATUS_PATTERNS`) that the operator can override per
destination (``destinations.NAME.retry.status_overrides``). A failure without a status (refused
connection, A-ASSOCIATE-RJ, timeout, ...) is mapped by :func:`classify_failure`. :func:`next_step`
turns an outcome, the attempt count and the object's age into a :class:`Step`. Nothing here does
I/O, reads a clock or draws random numbers: the caller passes ``now`` and a uniform ``u`` in
``[0, 1)``. See docs/forwarding.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from gateway.settings import RetryPolicy

Outcome = Literal["delivered", "warning", "transient", "permanent"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
DONE_OUTCOMES: frozenset[Outcome] = frozenset({"delivered", "warning"})
"""The outcomes that finish a delivery (the PACS has the object)."""

OverrideOutcome = Literal["delivered", "transient", "permanent"]
"""What an operator may map a status to (``status_overrides`` values)."""

FailureKind = Literal[
    "connection_refused",
    "connection_reset",
    "connect_timeout",
    "tls_error",
    "dimse_timeout",
    "aborted",
    "association_rejected",
    "no_presentation_context",
    "protocol_error",
    "local_error",
]
FAILURE_KINDS: tuple[FailureKind, ...] = get_args(FailureKind)

_NO_OVERRIDES: Mapping[str, OverrideOutcome] = MappingProxyType({})


# --- backoff -------------------------------------------------------------------------------------


def backoff(attempt: int, policy: RetryPolicy, u: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): exponential, full jitter.

    ``u * min(max_delay, base_delay * 2 ** (attempt - 1))``; ``u`` is a uniform draw in ``[0, 1)``.
    Any attempt number is safe: the ceiling saturates at ``max_delay`` without huge powers.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more (got {attempt})")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1) (got {u!r})")
    return u * backoff_ceiling(attempt, policy)


def backoff_ceiling(attempt: int, policy: RetryPolicy) -> float:
    """The largest delay :func:`backoff` can return for ``attempt``: non-decreasing, capped."""
    exponent = attempt - 1
    # base * 2**exponent >= max  <=>  exponent >= log2(max) - log2(base); neither log can overflow.
    if exponent >= math.log2(policy.max_delay) - math.log2(policy.base_delay):
        return policy.max_delay
    return min(policy.max_delay, math.ldexp(policy.base_delay, exponent))


# --- status classification -----------------------------------------------------------------------

_PATTERN = re.compile(r"[0-9A-Fa-fXx]{4}")


@dataclass(frozen=True, slots=True)
class StatusRule:
    """``status & mask == value`` selects ``outcome``; more fixed hex digits is more specific."""

    value: int
    mask: int
    outcome: Outcome
    pattern: str

    def matches(self, status: int) -> bool:
        return status & self.mask == self.value

    @property
    def specificity(self) -> tuple[int, int]:
        """Sort key: more fixed hex digits first; on a tie, the longer fixed prefix."""
        return (self.mask.bit_count(), self.mask)


def parse_status_pattern(key: str) -> tuple[int, int]:
    """``"A700"`` -> ``(0xA700, 0xFFFF)``, ``"C0xx"`` -> ``(0xC000, 0xFF00)`` as (value, mask).

    Raises ``ValueError`` with a message that says how to write one.
    """
    if isinstance(key, str) and key[:2] in ("0x", "0X"):
        raise ValueError(
            f"status pattern {key!r}: write the 4 hex digits without a '0x' prefix "
            f"(e.g. '{key[2:].upper():0>4}'); 'x' means any digit"
        )
    if not isinstance(key, str) or not _PATTERN.fullmatch(key):
        raise ValueError(
            f"status pattern {key!r}: write 4 hex digits, 'x' for any digit "
            "(e.g. 'A700', 'C0xx', 'Axxx'); quote it in YAML so it stays a string"
        )
    value = mask = 0
    for char in key:
        wildcard = char in "xX"
        value = value << 4 | (0 if wildcard else int(char, 16))
        mask = mask << 4 | (0x0 if wildcard else 0xF)
    return value, mask


def status_rule(pattern: str, outcome: Outcome) -> StatusRule:
    value, mask = parse_status_pattern(pattern)
    return StatusRule(value, mask, outcome, pattern.upper().replace("X", "x"))


def compile_overrides(overrides: Mapping[str, OverrideOutcome]) -> tuple[StatusRule, ...]:
    """Validate ``status_overrides``: every key a pattern, every value an outcome, no pattern twice.

    Raises ``ValueError`` naming the offending key (settings validation calls this).
    """
    rules: dict[tuple[int, int], StatusRule] = {}
    for key, outcome in overrides.items():
        if outcome not in get_args(OverrideOutcome):
            raise ValueError(
                f"status override {key!r}: outcome {outcome!r} is not one of "
                f"{', '.join(get_args(OverrideOutcome))}"
            )
        rule = status_rule(key, outcome)
        previous = rules.get((rule.value, rule.mask))
        if previous is not None:
            raise ValueError(
                f"status overrides {previous.pattern!r} and {key!r} are the same pattern: keep one"
            )
        rules[(rule.value, rule.mask)] = rule
    return tuple(rules.values())


DEFAULT_STATUS_PATTERNS: tuple[tuple[str, Outcome], ...] = (
    # success and warnings (PS3.4 B.2.3, PS3.7 C): the PACS holds the object
    ("0000", "delivered"),
    ("0001", "warning"),  # requested optional attributes not supported
    ("0107", "warning"),  # attribute list error
    ("0116", "warning"),  # attribute value out of range
    ("Bxxx", "warning"),  # B000 coercion, B006 element discarded, B007 data set mismatch, ...
    ("0111", "warning"),  # duplicate SOP instance: the PACS already holds this UID (a resend)
    # conditions that can clear by themselves
    ("A7xx", "transient"),  # refused: out of resources
    ("0110", "transient"),  # processing failure: usually a passing fault at the PACS
    ("0213", "transient"),  # resource limitation
    ("0210", "transient"),  # duplicate invocation: a fresh message ID on the next try
    # the same object will be refused again until someone changes something
    ("A9xx", "permanent"),  # data set does not match SOP class
    ("Cxxx", "permanent"),  # cannot understand
    ("0122", "permanent"),  # refused: SOP class not supported
    ("0124", "permanent"),  # refused: not authorised
    ("0211", "permanent"),  # unrecognised operation: the peer does not do C-STORE
    ("0117", "permanent"),  # invalid object instance
    ("0212", "permanent"),  # mistyped argument
    ("0105", "permanent"),  # no such attribute
    ("0106", "permanent"),  # invalid attribute value
    ("0118", "permanent"),  # no such SOP class
    ("0119", "permanent"),  # class-instance conflict
    ("0120", "permanent"),  # missing attribute
    ("0121", "permanent"),  # missing attribute value
)
"""The built-in C-STORE status table (data). A status that matches no entry is ``transient``."""

DEFAULT_STATUS_TABLE: tuple[StatusRule, ...] = tuple(
    status_rule(pattern, outcome) for pattern, outcome in DEFAULT_STATUS_PATTERNS
)

UNKNOWN_STATUS_OUTCOME: Outcome = "transient"


def classify_status(status: int, overrides: Mapping[str, OverrideOutcome] = _NO_OVERRIDES) -> Outcome:
    """The outcome of a C-STORE response status.

    The most specific matching override wins (fewest ``x``); otherwise the most specific entry of
    :data:`DEFAULT_STATUS_TABLE`; otherwise ``transient``. An override always beats the defaults.
    """
    if not 0 <= status <= 0xFFFF:
        raise ValueError(f"a DIMSE status is 16 bits (got {status!r})")
    for table in (compile_overrides(overrides), DEFAULT_STATUS_TABLE):
        rule = most_specific(table, status)
        if rule is not None:
            return rule.outcome
    return UNKNOWN_STATUS_OUTCOME


def most_specific(table: tuple[StatusRule, ...], status: int) -> StatusRule | None:
    matching = [rule for rule in table if rule.matches(status)]
    return max(matching, key=lambda rule: rule.specificity, default=None)


# --- failures without a status -------------------------------------------------------------------

FAILURE_OUTCOMES: Mapping[FailureKind, Outcome] = MappingProxyType(
    {
        "connection_refused": "transient",
        "connection_reset": "transient",
        "connect_timeout": "transient",
        "tls_error": "transient",  # often a certificate being renewed: retry, visibly
        "dimse_timeout": "transient",
        "aborted": "transient",
        "association_rejected": "transient",  # refined by the A-ASSOCIATE-RJ result
        "no_presentation_context": "permanent",
        "protocol_error": "transient",
        "local_error": "permanent",
    }
)

RJ_PERMANENT = 1
NO_REASON_GIVEN = frozenset({(1, 1), (2, 1)})
"""A-ASSOCIATE-RJ (source, reason) pairs that say nothing about why the peer refused."""


def classify_failure(kind: FailureKind, *, rj: tuple[int, int, int] | None = None) -> Outcome:
    """The outcome of a failure that has no DIMSE status.

    ``association_rejected`` follows the A-ASSOCIATE-RJ ``rj`` (result, source, reason): result 1
    (rejected-permanent) is permanent when it names a cause (calling AE 1,1,3, called AE 1,1,7,
    application context, protocol version). Without a reason (source 1 or 2, reason 1) it is
    transient: PACS send that to refuse associations for a while (DCMTK's ``storescp --refuse``,
    maintenance modes), and dead-lettering it would turn a short refusal into one dead letter per
    queued object. Result 2 (rejected-transient) or an unknown rejection is transient.
    """
    if kind == "association_rejected" and rj is not None and rj[0] == RJ_PERMANENT:
        return "transient" if rj[1:] in NO_REASON_GIVEN else "permanent"
    return FAILURE_OUTCOMES[kind]


# --- what to do next -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """The decision after one attempt: exactly one of ``done``, ``dead``, ``retry_at``."""

    done: bool
    retry_at: float | None
    dead: bool
    reason: str


def next_step(  # noqa: PLR0917 - the positional signature is the forwarder's contract
    attempt: int,
    received_at: float,
    now: float,
    outcome: Outcome,
    policy: RetryPolicy,
    u: float,
) -> Step:
    """Decide after attempt number ``attempt`` (1-based) of an object received at ``received_at``.

    ``now`` and ``received_at`` are on one clock (seconds); ``u`` is a uniform draw in ``[0, 1)``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more (got {attempt})")
    if outcome == "delivered":
        return Step(done=True, retry_at=None, dead=False, reason="delivered")
    if outcome == "warning":
        return Step(done=True, retry_at=None, dead=False, reason="delivered with a warning")
    if outcome == "permanent":
        return _dead("permanent failure, not retried")
    if attempt >= policy.max_attempts:
        return _dead(f"gave up after {attempt} attempts")
    age = now - received_at
    if age >= policy.max_age:
        return _dead(f"older than max_age ({age:.0f} s >= {policy.max_age:g} s)")
    delay = backoff(attempt, policy, u)
    return Step(
        done=False,
        retry_at=now + delay,
        dead=False,
        reason=(f"transient failure, attempt {attempt} of {policy.max_attempts}: retry in {delay:.1f} s"),
    )


def _dead(reason: str) -> Step:
    return Step(done=False, retry_at=None, dead=True, reason=reason)
