"""Pure forwarding decisions: backoff, status and failure classification, next step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pynetdicom.status import code_to_category

from gateway.retry import (
    DEFAULT_STATUS_PATTERNS,
    FAILURE_KINDS,
    OUTCOMES,
    FailureKind,
    Outcome,
    OverrideOutcome,
    Step,
    backoff,
    backoff_ceiling,
    classify_failure,
    classify_status,
    compile_overrides,
    next_step,
    parse_status_pattern,
)
from gateway.settings import RetryPolicy

POLICY = RetryPolicy(base_delay=2.0, max_delay=300.0, max_attempts=5, max_age=3600.0)
DOC = Path(__file__).resolve().parents[1] / "docs" / "forwarding.md"

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
positive = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)
policies = st.builds(RetryPolicy, base_delay=positive, max_delay=positive)
attempts = st.one_of(st.integers(1, 200), st.integers(1, 10**30))
statuses = st.integers(0, 0xFFFF)


# --- backoff -------------------------------------------------------------------------------------


@given(attempt=attempts, policy=policies, u=unit)
def test_backoff_is_within_full_jitter_bounds(attempt: int, policy: RetryPolicy, u: float) -> None:
    delay = backoff(attempt, policy, u)
    ceiling = min(policy.max_delay, backoff_ceiling(attempt, policy))
    assert 0.0 <= delay <= ceiling <= policy.max_delay
    assert delay == pytest.approx(u * ceiling)


@given(attempt=st.integers(1, 2000), policy=policies)
def test_backoff_ceiling_never_decreases(attempt: int, policy: RetryPolicy) -> None:
    assert backoff_ceiling(attempt, policy) <= backoff_ceiling(attempt + 1, policy)


@given(attempt=st.integers(1, 60), policy=policies)
def test_backoff_ceiling_is_the_capped_exponential(attempt: int, policy: RetryPolicy) -> None:
    expected = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
    assert backoff_ceiling(attempt, policy) == pytest.approx(expected)


def test_backoff_doubles_then_reaches_the_cap() -> None:
    ceilings = [backoff_ceiling(a, POLICY) for a in range(1, 11)]
    assert ceilings == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0]
    assert backoff(3, POLICY, 0.5) == 4.0
    assert backoff(1, POLICY, 0.0) == 0.0


@pytest.mark.parametrize("attempt", [1025, 10**6, 10**100, 2**20000], ids=["2^10", "1e6", "1e100", "2^20000"])
def test_backoff_huge_attempt_does_not_overflow(attempt: int) -> None:
    assert backoff(attempt, POLICY, 0.5) == 150.0


def test_backoff_extreme_policy_does_not_overflow() -> None:
    policy = RetryPolicy(base_delay=5e-324, max_delay=1.7e308, max_attempts=20, max_age=1.0)
    for attempt in (1, 1000, 2000, 2200, 10**9):
        ceiling = backoff_ceiling(attempt, policy)
        assert 0.0 < ceiling <= 1.7e308
        assert math.isfinite(backoff(attempt, policy, 0.999))


def test_backoff_base_above_cap_is_capped_from_the_first_attempt() -> None:
    policy = RetryPolicy(base_delay=50.0, max_delay=10.0, max_attempts=20, max_age=1.0)
    assert backoff_ceiling(1, policy) == 10.0


@pytest.mark.parametrize(
    ("attempt", "u"), [(0, 0.5), (-3, 0.5), (1, 1.0), (1, -0.01), (1, math.nan), (1, math.inf)]
)
def test_backoff_rejects_bad_arguments(attempt: int, u: float) -> None:
    with pytest.raises(ValueError, match=r"attempt|u must be"):
        backoff(attempt, POLICY, u)


# --- status classification -----------------------------------------------------------------------

LISTED: list[tuple[int, Outcome]] = [
    (0x0000, "delivered"),
    (0x0001, "warning"),
    (0x0107, "warning"),
    (0x0116, "warning"),
    (0xB000, "warning"),
    (0xB006, "warning"),
    (0xB007, "warning"),
    (0xB123, "warning"),
    (0x0111, "warning"),
    (0xA700, "transient"),
    (0xA7FF, "transient"),
    (0x0110, "transient"),
    (0x0213, "transient"),
    (0x0210, "transient"),
    (0x0122, "permanent"),
    (0xA900, "permanent"),
    (0xA9FF, "permanent"),
    (0xC000, "permanent"),
    (0xC211, "permanent"),
    (0xCFFF, "permanent"),
    (0x0211, "permanent"),
    (0x0124, "permanent"),
    (0x0117, "permanent"),
    (0x0212, "permanent"),
    (0x0105, "permanent"),
    (0x0106, "permanent"),
    (0x0118, "permanent"),
    (0x0119, "permanent"),
    (0x0120, "permanent"),
    (0x0121, "permanent"),
    # unknown to the table: transient
    (0x1234, "transient"),
    (0xA800, "transient"),
    (0xA000, "transient"),
    (0xFE00, "transient"),
    (0xFF00, "transient"),
    (0xFFFF, "transient"),
]


@pytest.mark.parametrize(("status", "outcome"), LISTED, ids=[f"{s:04X}" for s, _ in LISTED])
def test_default_classification(status: int, outcome: Outcome) -> None:
    assert classify_status(status) == outcome


@given(statuses)
def test_every_status_has_an_outcome_consistent_with_the_standard(status: int) -> None:
    outcome = classify_status(status)
    assert outcome in OUTCOMES
    category = code_to_category(status)
    if category == "Success":
        assert outcome == "delivered"
    if category == "Warning":
        assert outcome == "warning"
    if 0xA700 <= status <= 0xA7FF:
        assert outcome == "transient"
    if outcome in ("delivered", "warning"):
        # never a false success: only success, warnings and the duplicate-instance case
        assert category in ("Success", "Warning") or status == 0x0111


def test_default_table_is_data_and_every_entry_parses() -> None:
    assert len(DEFAULT_STATUS_PATTERNS) >= 20
    for pattern, outcome in DEFAULT_STATUS_PATTERNS:
        value, mask = parse_status_pattern(pattern)
        assert value & ~mask == 0
        assert outcome in OUTCOMES
        assert classify_status(value) == outcome


def test_docs_list_every_default_entry() -> None:
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    for pattern, outcome in DEFAULT_STATUS_PATTERNS:
        assert any(f"`{pattern}`" in row and f"`{outcome}`" in row for row in rows), pattern


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("A700", (0xA700, 0xFFFF)),
        ("C0xx", (0xC000, 0xFF00)),
        ("Axxx", (0xA000, 0xF000)),
        ("xxxx", (0x0000, 0x0000)),
        ("a7X0", (0xA700, 0xFF0F)),
        ("0110", (0x0110, 0xFFFF)),
    ],
)
def test_parse_status_pattern(key: str, expected: tuple[int, int]) -> None:
    assert parse_status_pattern(key) == expected


@pytest.mark.parametrize("key", ["", "A70", "A7000", "G700", " A70", "A7 0", "A7*0", "\uff21700"])
def test_parse_status_pattern_rejects_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match=r"4 hex digits.*'x'") as info:
        parse_status_pattern(key)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize("key", ["0xA7", "0X10", "0xA700"])
def test_parse_status_pattern_rejects_a_hex_prefix(key: str) -> None:
    with pytest.raises(ValueError, match="without a '0x' prefix"):
        parse_status_pattern(key)


def test_override_beats_the_default_and_only_matches_its_pattern() -> None:
    overrides: dict[str, OverrideOutcome] = {"A700": "permanent"}
    assert classify_status(0xA700, overrides) == "permanent"
    assert classify_status(0xA701, overrides) == "transient"


def test_wildcard_override_beats_a_more_specific_default() -> None:
    overrides: dict[str, OverrideOutcome] = {"Axxx": "permanent"}
    assert classify_status(0xA700, overrides) == "permanent"
    assert classify_status(0xA000, overrides) == "permanent"
    assert classify_status(0xC000, overrides) == "permanent"
    assert classify_status(0xB000, overrides) == "warning"


def test_most_specific_override_wins() -> None:
    overrides: dict[str, OverrideOutcome] = {
        "Cxxx": "transient",
        "C2xx": "permanent",
        "C211": "delivered",
    }
    assert classify_status(0xC000, overrides) == "transient"
    assert classify_status(0xC201, overrides) == "permanent"
    assert classify_status(0xC211, overrides) == "delivered"


@pytest.mark.parametrize(
    "overrides",
    [{"A7x0": "permanent", "A70x": "delivered"}, {"A70x": "delivered", "A7x0": "permanent"}],
)
def test_equally_specific_overrides_tie_break_on_the_longer_prefix(
    overrides: dict[str, OverrideOutcome],
) -> None:
    assert classify_status(0xA700, overrides) == "delivered"
    assert classify_status(0xA710, overrides) == "permanent"


def test_override_keys_are_case_insensitive() -> None:
    assert classify_status(0xC0AB, {"c0XX": "transient"}) == "transient"


def test_compile_overrides_rejects_invalid_keys_values_and_duplicates() -> None:
    with pytest.raises(ValueError, match="'A7'"):
        compile_overrides({"A7": "transient"})
    with pytest.raises(ValueError, match="same pattern"):
        compile_overrides({"c0xx": "transient", "C0XX": "permanent"})
    with pytest.raises(ValueError, match="'warning' is not one of"):
        compile_overrides({"A700": "warning"})  # type: ignore[dict-item]
    assert len(compile_overrides({"A700": "permanent", "Cxxx": "transient"})) == 2


@pytest.mark.parametrize("status", [-1, 0x10000])
def test_classify_status_rejects_non_16_bit_values(status: int) -> None:
    with pytest.raises(ValueError, match="16 bits"):
        classify_status(status)


# --- failures without a status -------------------------------------------------------------------

FAILURES: dict[FailureKind, Outcome] = {
    "connection_refused": "transient",
    "connection_reset": "transient",
    "connect_timeout": "transient",
    "tls_error": "transient",
    "dimse_timeout": "transient",
    "aborted": "transient",
    "association_rejected": "transient",
    "no_presentation_context": "permanent",
    "protocol_error": "transient",
    "local_error": "permanent",
}


def test_every_failure_kind_is_classified() -> None:
    assert set(FAILURES) == set(FAILURE_KINDS) == set(get_args(FailureKind))
    for kind, outcome in FAILURES.items():
        assert classify_failure(kind) == outcome


@pytest.mark.parametrize(("rj", "outcome"), [((1, 1, 7), "permanent"), ((2, 3, 2), "transient"),
                                             ((1, 1, 1), "transient"), (None, "transient")])
def test_association_rejected_follows_the_rj(rj: tuple[int, int, int] | None,
                                             outcome: Outcome) -> None:
    assert classify_failure("association_rejected", rj=rj) == outcome


def test_rj_matters_only_for_rejections() -> None:
    assert classify_failure("connection_refused", rj=(1, 1, 7)) == "transient"


# --- next step -----------------------------------------------------------------------------------

T0 = 1_000_000.0


@pytest.mark.parametrize("outcome", ["delivered", "warning"])
def test_delivered_and_warning_are_done(outcome: Outcome) -> None:
    step = next_step(5, T0, T0 + 10**6, outcome, POLICY, 0.5)
    assert step.done and not step.dead and step.retry_at is None
    assert "delivered" in step.reason


def test_permanent_is_dead_at_the_first_attempt() -> None:
    step = next_step(1, T0, T0 + 1, "permanent", POLICY, 0.5)
    assert step == Step(done=False, retry_at=None, dead=True, reason="permanent failure, not retried")


def test_transient_is_retried_after_backoff() -> None:
    step = next_step(3, T0, T0 + 60, "transient", POLICY, 0.25)
    assert not step.done and not step.dead
    assert step.retry_at == T0 + 60 + 0.25 * 8.0


def test_transient_dies_after_max_attempts() -> None:
    assert next_step(4, T0, T0 + 1, "transient", POLICY, 0.5).retry_at is not None
    step = next_step(5, T0, T0 + 1, "transient", POLICY, 0.5)
    assert step.dead and step.retry_at is None
    assert step.reason == "gave up after 5 attempts"


def test_transient_dies_when_older_than_max_age() -> None:
    assert next_step(2, T0, T0 + 3599.9, "transient", POLICY, 0.5).retry_at is not None
    step = next_step(2, T0, T0 + 3600.0, "transient", POLICY, 0.5)
    assert step.dead and step.retry_at is None
    assert step.reason.startswith("older than max_age")


def test_next_step_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        next_step(0, T0, T0, "transient", POLICY, 0.5)


@given(
    attempt=st.integers(1, 50),
    age=st.floats(0, 10_000),
    outcome=st.sampled_from(OUTCOMES),
    u=unit,
)
def test_exactly_one_decision(attempt: int, age: float, outcome: Outcome, u: float) -> None:
    step = next_step(attempt, T0, T0 + age, outcome, POLICY, u)
    assert [step.done, step.dead, step.retry_at is not None].count(True) == 1
    if step.retry_at is not None:
        assert T0 + age <= step.retry_at <= T0 + age + POLICY.max_delay
        assert attempt < POLICY.max_attempts and age < POLICY.max_age
