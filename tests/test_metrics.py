"""gateway.metrics: helpers update the right samples, labels stay bounded, state read at scrape."""

from __future__ import annotations

import subprocess

import pytest
from peers import require_tool
from prometheus_client import CollectorRegistry, generate_latest

from gateway.metrics import (
    DestinationState,
    GatewayState,
    Metrics,
    StateCollector,
    metric_names,
    status_class,
)

AES = ("CT01", "US_ROOM2")
DESTS = ("pacs_prod", "pacs_test")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, known_calling_aes=AES, destinations=DESTS, version="9.9.9")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def promtool() -> str:
    return require_tool("promtool")


# --- status classes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, "success"),
        (0x0001, "warning"),
        (0x0107, "warning"),
        (0x0116, "warning"),
        (0xB000, "warning"),
        (0xB007, "warning"),
        (0xBFFF, "warning"),
        (0xFE00, "cancel"),
        (0xA700, "failure"),
        (0xA900, "failure"),
        (0xC000, "failure"),
        (0xC211, "failure"),
        (0x0110, "failure"),
        (0x0122, "failure"),
        (0xFF00, "failure"),
    ],
)
def test_status_class(status: int, expected: str) -> None:
    assert status_class(status) == expected
    assert Metrics.status_class(status) == expected


# --- pre-initialised series --------------------------------------------------------------------


def test_configured_series_exist_at_zero(registry: CollectorRegistry, metrics: Metrics) -> None:
    for dest in DESTS:
        for outcome in ("delivered", "warning", "transient", "permanent"):
            got = value(registry, "dicomgw_forward_attempts_total", destination=dest,
                        outcome=outcome)
            assert got == 0.0
        assert value(registry, "dicomgw_forward_duration_seconds_count", destination=dest) == 0.0
        assert value(registry, "dicomgw_forwarded_bytes_total", destination=dest) == 0.0
        assert value(registry, "dicomgw_destination_up", destination=dest) == 0.0
    for reason in ("called_ae", "calling_ae", "source_ip", "limit", "context", "protocol"):
        assert value(registry, "dicomgw_association_rejects_total", reason=reason) == 0.0
    for ae in (*AES, "other"):
        assert value(registry, "dicomgw_received_bytes_total", calling_ae=ae) == 0.0
        got = value(registry, "dicomgw_dimse_requests_total", service="store", calling_ae=ae,
                    status_class="failure")
        assert got == 0.0
        assert value(registry, "dicomgw_mwl_queries_total", calling_ae=ae, outcome="success") == 0
    assert value(registry, "dicomgw_associations_total", direction="out", peer="worklist",
                 result="accepted") == 0.0
    assert value(registry, "dicomgw_associations_active", direction="in") == 0.0
    assert value(registry, "dicomgw_rules_reloads_total", result="failure") == 0.0
    assert value(registry, "dicomgw_build_info", version="9.9.9") == 1.0


def test_nothing_is_registered_globally() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Metrics(first)
    Metrics(second)  # would raise "Duplicated timeseries" if anything were shared
    assert value(first, "dicomgw_duplicates_total") == 0.0


# --- helpers -----------------------------------------------------------------------------------


def test_observe_store(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_store("CT01", 0x0000, 0.02, 1000)
    metrics.observe_store("CT01", 0xB000, 0.5, 500)
    metrics.observe_store("CT01", 0xA700, 0.001, 0)
    assert value(registry, "dicomgw_dimse_requests_total", service="store", calling_ae="CT01",
                 status_class="success") == 1.0
    assert value(registry, "dicomgw_dimse_requests_total", service="store", calling_ae="CT01",
                 status_class="warning") == 1.0
    assert value(registry, "dicomgw_dimse_requests_total", service="store", calling_ae="CT01",
                 status_class="failure") == 1.0
    assert value(registry, "dicomgw_received_bytes_total", calling_ae="CT01") == 1500.0
    assert value(registry, "dicomgw_dimse_request_duration_seconds_count", service="store") == 3
    assert value(registry, "dicomgw_dimse_request_duration_seconds_sum",
                 service="store") == pytest.approx(0.521)
    assert value(registry, "dicomgw_dimse_request_duration_seconds_bucket", service="store",
                 le="0.025") == 2.0


def test_unknown_calling_ae_becomes_other(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_store("PATIENT^JOHN", 0x0000, 0.01, 10)
    metrics.observe_request("echo", "ROGUE", 0x0000, 0.001)
    metrics.mwl_query("ROGUE2", "success", 0.2, 3)
    metrics.association_opened("in", "ROGUE3")
    metrics.association_rejected("calling_ae", calling_ae="ROGUE4")
    assert metrics.calling_ae_label("ROGUE") == "other"
    assert metrics.calling_ae_label("US_ROOM2") == "US_ROOM2"
    assert value(registry, "dicomgw_received_bytes_total", calling_ae="other") == 10.0
    assert value(registry, "dicomgw_dimse_requests_total", service="echo", calling_ae="other",
                 status_class="success") == 1.0
    assert value(registry, "dicomgw_mwl_queries_total", calling_ae="other", outcome="success") == 1
    assert value(registry, "dicomgw_associations_total", direction="in", peer="other",
                 result="accepted") == 1.0
    assert value(registry, "dicomgw_associations_total", direction="in", peer="other",
                 result="rejected") == 1.0
    exposition = generate_latest(registry).decode()
    for rogue in ("PATIENT", "ROGUE"):
        assert rogue not in exposition


def test_associations(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.association_opened("in", "CT01")
    metrics.association_opened("in", "CT01")
    metrics.association_opened("out", "pacs_prod")
    metrics.association_opened("out", "worklist")
    metrics.association_closed("in")
    metrics.association_aborted("out", "pacs_prod")
    metrics.association_closed("out")
    metrics.association_refused("pacs_test")
    metrics.association_rejected("limit", calling_ae="CT01")
    assert value(registry, "dicomgw_associations_active", direction="in") == 1.0
    assert value(registry, "dicomgw_associations_active", direction="out") == 1.0
    assert value(registry, "dicomgw_associations_total", direction="in", peer="CT01",
                 result="accepted") == 2.0
    assert value(registry, "dicomgw_associations_total", direction="in", peer="CT01",
                 result="rejected") == 1.0
    assert value(registry, "dicomgw_associations_total", direction="out", peer="pacs_prod",
                 result="aborted") == 1.0
    assert value(registry, "dicomgw_associations_total", direction="out", peer="worklist",
                 result="accepted") == 1.0
    assert value(registry, "dicomgw_associations_total", direction="out", peer="pacs_test",
                 result="rejected") == 1.0
    assert value(registry, "dicomgw_association_rejects_total", reason="limit") == 1.0


def test_unknown_fixed_label_values_are_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="reject reason"):
        metrics.association_rejected("because")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forward outcome"):
        metrics.forward_attempt("pacs_prod", "lost", 1.0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="worklist outcome"):
        metrics.mwl_query("CT01", "meh", None, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="service"):
        metrics.observe_request("move", "CT01", 0, 0.1)  # type: ignore[arg-type]


def test_forward_attempts(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.forward_attempt("pacs_prod", "delivered", 0.1, 100)
    metrics.forward_attempt("pacs_prod", "warning", 0.2, 50)
    metrics.forward_attempt("pacs_prod", "transient", 3.0, 70)
    metrics.forward_attempt("pacs_prod", "permanent", 0.1, 70)
    metrics.forward_attempt("elsewhere", "delivered", 0.1, 9)
    for outcome in ("delivered", "warning", "transient", "permanent"):
        assert value(registry, "dicomgw_forward_attempts_total", destination="pacs_prod",
                     outcome=outcome) == 1.0
    assert value(registry, "dicomgw_forwarded_bytes_total", destination="pacs_prod") == 150.0
    assert value(registry, "dicomgw_forward_duration_seconds_count", destination="pacs_prod") == 4
    assert value(registry, "dicomgw_forward_attempts_total", destination="other",
                 outcome="delivered") == 1.0
    assert value(registry, "dicomgw_forward_attempts_total", destination="pacs_test",
                 outcome="delivered") == 0.0


def test_routing(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.routed(["ct_to_prod", "all_to_test"], ["pacs_prod", "pacs_test"])
    metrics.routed(["ct_to_prod"], ["pacs_prod"])
    metrics.routed([], ["pacs_test"])
    metrics.routed(["nothing"], [])
    metrics.routed([], [])
    assert value(registry, "dicomgw_routing_decisions_total", rule="ct_to_prod",
                 destination="pacs_prod") == 2.0
    assert value(registry, "dicomgw_routing_decisions_total", rule="all_to_test",
                 destination="pacs_test") == 1.0
    assert value(registry, "dicomgw_routing_decisions_total", rule="(default)",
                 destination="pacs_test") == 1.0
    assert value(registry, "dicomgw_routing_unmatched_total") == 2.0


def test_ingest_side_counters(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_spool_write(0.003)
    metrics.duplicate_received()
    metrics.duplicate_received()
    assert value(registry, "dicomgw_spool_write_duration_seconds_count") == 1.0
    assert value(registry, "dicomgw_spool_write_duration_seconds_bucket", le="0.0025") == 0.0
    assert value(registry, "dicomgw_spool_write_duration_seconds_bucket", le="0.005") == 1.0
    assert value(registry, "dicomgw_duplicates_total") == 2.0


def test_mwl_query(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.mwl_query("US_ROOM2", "success", 0.4, 12)
    metrics.mwl_query("US_ROOM2", "upstream_failure", None, 0)
    metrics.mwl_query("US_ROOM2", "cancelled", 0.1, 2)
    assert value(registry, "dicomgw_mwl_queries_total", calling_ae="US_ROOM2",
                 outcome="success") == 1.0
    assert value(registry, "dicomgw_mwl_queries_total", calling_ae="US_ROOM2",
                 outcome="upstream_failure") == 1.0
    assert value(registry, "dicomgw_mwl_upstream_duration_seconds_count") == 2.0
    assert value(registry, "dicomgw_mwl_upstream_duration_seconds_sum") == pytest.approx(0.5)
    assert value(registry, "dicomgw_mwl_results_total") == 14.0


def test_rules_and_destination_up(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.rules_reloaded(True, 7)
    metrics.rules_reloaded(False, 0)
    assert value(registry, "dicomgw_rules_loaded") == 7.0  # the last good set stays active
    assert value(registry, "dicomgw_rules_reloads_total", result="success") == 1.0
    assert value(registry, "dicomgw_rules_reloads_total", result="failure") == 1.0
    metrics.set_destination_up("pacs_prod", True)
    assert value(registry, "dicomgw_destination_up", destination="pacs_prod") == 1.0
    metrics.set_destination_up("pacs_prod", False)
    assert value(registry, "dicomgw_destination_up", destination="pacs_prod") == 0.0


# --- scrape-time state -------------------------------------------------------------------------


def test_state_collector_reads_provider_at_scrape(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    calls: list[int] = []
    current = {"queued": 3}

    def provider() -> GatewayState:
        calls.append(1)
        dest = DestinationState(queued=current["queued"], capacity=1000,
                                oldest_age_seconds=42.5, dead=2)
        return GatewayState(destinations={"pacs_prod": dest}, held=4, spool_free_bytes=900,
                            spool_used_bytes=100, spool_capacity_bytes=5000)

    metrics.attach_state(provider)
    assert calls == []  # registering does not call the provider (describe() is static)
    assert value(registry, "dicomgw_queue_items", destination="pacs_prod") == 3.0
    current["queued"] = 8
    assert value(registry, "dicomgw_queue_items", destination="pacs_prod") == 8.0
    assert value(registry, "dicomgw_queue_capacity_items", destination="pacs_prod") == 1000.0
    assert value(registry, "dicomgw_queue_oldest_age_seconds", destination="pacs_prod") == 42.5
    assert value(registry, "dicomgw_dead_letter_items", destination="pacs_prod") == 2.0
    assert value(registry, "dicomgw_held_items") == 4.0
    assert value(registry, "dicomgw_spool_free_bytes") == 900.0
    assert value(registry, "dicomgw_spool_used_bytes") == 100.0
    assert value(registry, "dicomgw_spool_capacity_bytes") == 5000.0
    assert len(calls) >= 2


def test_state_collector_standalone() -> None:
    registry = CollectorRegistry()
    registry.register(StateCollector(GatewayState))
    assert value(registry, "dicomgw_held_items") == 0.0
    assert value(registry, "dicomgw_spool_capacity_bytes") == 0.0
    assert value(registry, "dicomgw_queue_items", destination="pacs_prod") is None


def test_metric_names_cover_every_family(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.attach_state(GatewayState)
    names = metric_names(registry)
    expected = {
        "dicomgw_build_info", "dicomgw_associations_total", "dicomgw_associations_active",
        "dicomgw_association_rejects_total", "dicomgw_dimse_requests_total",
        "dicomgw_dimse_request_duration_seconds_bucket", "dicomgw_received_bytes_total",
        "dicomgw_spool_write_duration_seconds_sum", "dicomgw_duplicates_total",
        "dicomgw_forward_attempts_total", "dicomgw_forward_duration_seconds_count",
        "dicomgw_forwarded_bytes_total", "dicomgw_routing_decisions_total",
        "dicomgw_routing_unmatched_total", "dicomgw_mwl_queries_total",
        "dicomgw_mwl_upstream_duration_seconds_bucket", "dicomgw_mwl_results_total",
        "dicomgw_rules_loaded", "dicomgw_rules_reloads_total", "dicomgw_destination_up",
        "dicomgw_queue_items", "dicomgw_queue_capacity_items", "dicomgw_queue_oldest_age_seconds",
        "dicomgw_dead_letter_items", "dicomgw_held_items", "dicomgw_spool_free_bytes",
        "dicomgw_spool_used_bytes", "dicomgw_spool_capacity_bytes",
    }
    assert expected <= names
    assert "dicomgw_duplicates" not in names  # a counter is only ever exposed with _total


# --- exposition lint ---------------------------------------------------------------------------


def test_exposition_passes_promtool(registry: CollectorRegistry, metrics: Metrics) -> None:
    tool = promtool()
    metrics.attach_state(
        lambda: GatewayState(
            destinations={d: DestinationState(1, 10, 2.0, 0) for d in DESTS},
            held=1, spool_free_bytes=10, spool_used_bytes=5, spool_capacity_bytes=0,
        )
    )
    metrics.observe_store("CT01", 0, 0.1, 10)
    metrics.routed(["r1"], ["pacs_prod"])
    metrics.mwl_query("CT01", "success", 0.1, 1)
    result = subprocess.run([tool, "check", "metrics"], input=generate_latest(registry),
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
