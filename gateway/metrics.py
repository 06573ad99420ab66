"""The gateway's Prometheus metrics: event counters pushed by components, state read at scrape time.

``Metrics`` owns every pushed metric, registered in an injected ``CollectorRegistry``; its helpers
are the only place that spells label names. Label values come from configuration (destination names,
the known calling AE titles, rule names) or from fixed sets; any other AE title becomes ``"other"``.
Series whose labels are known from configuration are created at zero up front, so ``rate()`` and the
dashboards work before the first event.

State that already lives elsewhere (queue depths, oldest item age, dead letters, spool space) is
not pushed: ``StateCollector`` calls a provider ``() -> GatewayState`` at every scrape. The provider
runs on the scraping task and must be cheap and must not raise: it should return cached numbers.
See docs/metrics.md for the list of metrics and their meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import gateway
from gateway.retry import DONE_OUTCOMES, OUTCOMES, Outcome

Direction = Literal["in", "out"]
RejectReason = Literal["called_ae", "calling_ae", "source_ip", "limit", "context", "protocol"]
Service = Literal["echo", "store", "find", "cancel"]
StatusClass = Literal["success", "warning", "failure", "cancel"]
MwlOutcome = Literal["success", "cancelled", "upstream_failure", "failure"]

DIRECTIONS: Final = ("in", "out")
REJECT_REASONS: Final = ("called_ae", "calling_ae", "source_ip", "limit", "context", "protocol")
ASSOCIATION_RESULTS: Final = ("accepted", "rejected", "aborted")
SERVICES: Final = ("echo", "store", "find", "cancel")
STATUS_CLASSES: Final = ("success", "warning", "failure", "cancel")
MWL_OUTCOMES: Final = ("success", "cancelled", "upstream_failure", "failure")
RELOAD_RESULTS: Final = ("success", "failure")

OTHER: Final = "other"
WORKLIST_PEER: Final = "worklist"
NO_RULE: Final = "(default)"

_DIMSE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                         10.0, 30.0, 60.0, 120.0)
_SPOOL_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_UPSTREAM_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                             60.0)
_WARNING_STATUSES: Final = frozenset({0x0001, 0x0107, 0x0116})


def status_class(status: int) -> StatusClass:
    """Classify a final DIMSE status: 0x0000 success, 0x0001/0x0107/0x0116/0xBxxx warning,
    0xFE00 cancel, anything else failure."""
    if status == 0x0000:
        return "success"
    if status in _WARNING_STATUSES or status & 0xF000 == 0xB000:
        return "warning"
    if status == 0xFE00:
        return "cancel"
    return "failure"


@dataclass(frozen=True, slots=True)
class DestinationState:
    """One destination's queue at this instant."""

    queued: int
    capacity: int
    oldest_age_seconds: float
    dead: int


@dataclass(frozen=True, slots=True)
class GatewayState:
    """What the scrape reads. ``spool_free_bytes`` is the space the spool may still use (the lesser
    of the filesystem's free space and what is left under the high-water mark);
    ``spool_capacity_bytes`` is the high-water mark, 0 when there is none."""

    destinations: Mapping[str, DestinationState] = field(default_factory=dict)
    held: int = 0
    spool_free_bytes: int = 0
    spool_used_bytes: int = 0
    spool_capacity_bytes: int = 0


class StateCollector(Collector):
    """Reports a ``GatewayState`` snapshot, taken from ``provider`` at every scrape."""

    def __init__(self, provider: Callable[[], GatewayState]) -> None:
        self._provider = provider

    def describe(self) -> Iterable[Metric]:
        return _state_families()

    def collect(self) -> Iterable[Metric]:
        state = self._provider()
        queue, capacity, oldest, dead, held, free, used, cap = _state_families()
        for name, dest in state.destinations.items():
            queue.add_metric([name], dest.queued)
            capacity.add_metric([name], dest.capacity)
            oldest.add_metric([name], dest.oldest_age_seconds)
            dead.add_metric([name], dest.dead)
        held.add_metric([], state.held)
        free.add_metric([], state.spool_free_bytes)
        used.add_metric([], state.spool_used_bytes)
        cap.add_metric([], state.spool_capacity_bytes)
        return (queue, capacity, oldest, dead, held, free, used, cap)


def _state_families() -> tuple[GaugeMetricFamily, ...]:
    def per_dest(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["destination"])

    return (
        per_dest("dicomgw_queue_items", "Deliveries waiting for this destination."),
        per_dest("dicomgw_queue_capacity_items", "Size of this destination's in-memory queue."),
        per_dest("dicomgw_queue_oldest_age_seconds", "Age of the oldest waiting delivery."),
        per_dest("dicomgw_dead_letter_items", "Deliveries given up on, awaiting an operator."),
        GaugeMetricFamily("dicomgw_held_items", "Objects no rule routed, held in the spool."),
        GaugeMetricFamily("dicomgw_spool_free_bytes", "Bytes the spool may still use."),
        GaugeMetricFamily("dicomgw_spool_used_bytes", "Bytes of objects in the spool."),
        GaugeMetricFamily("dicomgw_spool_capacity_bytes", "Spool high-water mark (0 = none)."),
    )


class Metrics:
    """Every pushed metric of one gateway process, with small helpers that pick the labels."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        known_calling_aes: Collection[str] = (),
        destinations: Collection[str] = (),
        version: str = gateway.__version__,
    ) -> None:
        self._registry = registry
        self._known_aes = frozenset(known_calling_aes)
        self._destinations = frozenset(destinations)
        self._create(registry)
        self.build_info.labels(version).set(1)
        self._preinitialise()

    def _create(self, r: CollectorRegistry) -> None:
        self.build_info = Gauge("dicomgw_build_info", "Always 1; the version is a label.",
                                ["version"], registry=r)
        self.associations = Counter("dicomgw_associations_total", "Associations by outcome.",
                                    ["direction", "peer", "result"], registry=r)
        self.associations_active = Gauge("dicomgw_associations_active", "Open associations.",
                                         ["direction"], registry=r)
        self.association_rejects = Counter("dicomgw_association_rejects_total",
                                           "Inbound associations rejected, by reason.",
                                           ["reason"], registry=r)
        self.dimse_requests = Counter("dicomgw_dimse_requests_total", "DIMSE requests answered.",
                                      ["service", "calling_ae", "status_class"], registry=r)
        self.dimse_duration = Histogram("dicomgw_dimse_request_duration_seconds",
                                        "Time from request to final response.", ["service"],
                                        buckets=_DIMSE_BUCKETS, registry=r)
        self.received_bytes = Counter("dicomgw_received_bytes_total",
                                      "Dataset bytes received in C-STOREs.", ["calling_ae"],
                                      registry=r)
        self.spool_write = Histogram("dicomgw_spool_write_duration_seconds",
                                     "Time to make one object durable in the spool.",
                                     buckets=_SPOOL_BUCKETS, registry=r)
        self.duplicates = Counter("dicomgw_duplicates_total",
                                  "Objects received again with a SOP Instance UID already spooled.",
                                  registry=r)
        self.forward_attempts = Counter("dicomgw_forward_attempts_total",
                                        "C-STORE attempts to destinations, by outcome.",
                                        ["destination", "outcome"], registry=r)
        self.forward_duration = Histogram("dicomgw_forward_duration_seconds",
                                          "Duration of one forward attempt.", ["destination"],
                                          buckets=_DIMSE_BUCKETS, registry=r)
        self.forwarded_bytes = Counter("dicomgw_forwarded_bytes_total",
                                       "Bytes of objects a destination accepted.", ["destination"],
                                       registry=r)
        self.routing_decisions = Counter("dicomgw_routing_decisions_total",
                                         "Routed objects, per matched rule and chosen destination.",
                                         ["rule", "destination"], registry=r)
        self.routing_unmatched = Counter("dicomgw_routing_unmatched_total",
                                         "Objects no rule routed anywhere (held).", registry=r)
        self.mwl_queries = Counter("dicomgw_mwl_queries_total", "Worklist queries by outcome.",
                                   ["calling_ae", "outcome"], registry=r)
        self.mwl_upstream = Histogram("dicomgw_mwl_upstream_duration_seconds",
                                      "Duration of the upstream (RIS) worklist query.",
                                      buckets=_UPSTREAM_BUCKETS, registry=r)
        self.mwl_results = Counter("dicomgw_mwl_results_total",
                                   "Worklist items passed on to modalities.", registry=r)
        self.rules_loaded = Gauge("dicomgw_rules_loaded", "Rules in the active rule set.",
                                  registry=r)
        self.rules_reloads = Counter("dicomgw_rules_reloads_total", "Rule set (re)loads.",
                                     ["result"], registry=r)
        self.destination_up = Gauge("dicomgw_destination_up",
                                    "1 if the last C-ECHO to the destination succeeded.",
                                    ["destination"], registry=r)

    def _preinitialise(self) -> None:
        ae_labels = (*sorted(self._known_aes), OTHER)
        dest_labels = sorted(self._destinations)
        for direction in DIRECTIONS:
            self.associations_active.labels(direction)
        for peer in ae_labels:
            for result in ASSOCIATION_RESULTS:
                self.associations.labels("in", peer, result)
            self.received_bytes.labels(peer)
            for service in SERVICES:
                for klass in STATUS_CLASSES:
                    self.dimse_requests.labels(service, peer, klass)
            for mwl_outcome in MWL_OUTCOMES:
                self.mwl_queries.labels(peer, mwl_outcome)
        for peer in (*dest_labels, WORKLIST_PEER):
            for result in ASSOCIATION_RESULTS:
                self.associations.labels("out", peer, result)
        for reason in REJECT_REASONS:
            self.association_rejects.labels(reason)
        for service in SERVICES:
            self.dimse_duration.labels(service)
        for dest in dest_labels:
            for outcome in OUTCOMES:
                self.forward_attempts.labels(dest, outcome)
            self.forward_duration.labels(dest)
            self.forwarded_bytes.labels(dest)
            self.destination_up.labels(dest)
        for result in RELOAD_RESULTS:
            self.rules_reloads.labels(result)

    # --- label choice -------------------------------------------------------------------------

    status_class = staticmethod(status_class)

    def calling_ae_label(self, ae: str) -> str:
        """The AE title if it is a configured one, else ``"other"``."""
        return ae if ae in self._known_aes else OTHER

    def destination_label(self, destination: str) -> str:
        """The destination name if it is configured, else ``"other"``."""
        return destination if destination in self._destinations else OTHER

    def peer_label(self, direction: Direction, peer: str) -> str:
        """Inbound: the calling AE label. Outbound: a destination, ``"worklist"`` or ``"other"``."""
        if direction == "in":
            return self.calling_ae_label(peer)
        return WORKLIST_PEER if peer == WORKLIST_PEER else self.destination_label(peer)

    def attach_state(self, provider: Callable[[], GatewayState]) -> StateCollector:
        """Register a ``StateCollector`` over ``provider`` in this registry."""
        collector = StateCollector(provider)
        self._registry.register(collector)
        return collector

    # --- associations -------------------------------------------------------------------------

    def association_opened(self, direction: Direction, peer: str) -> None:
        self.associations.labels(direction, self.peer_label(direction, peer), "accepted").inc()
        self.associations_active.labels(direction).inc()

    def association_closed(self, direction: Direction) -> None:
        self.associations_active.labels(direction).dec()

    def association_aborted(self, direction: Direction, peer: str) -> None:
        """An association ended by A-ABORT or a dropped connection (call ``closed`` as well if it
        had been opened)."""
        self.associations.labels(direction, self.peer_label(direction, peer), "aborted").inc()

    def association_rejected(self, reason: RejectReason, *, calling_ae: str = "") -> None:
        """We rejected an inbound A-ASSOCIATE-RQ."""
        _check(reason, REJECT_REASONS, "reject reason")
        self.association_rejects.labels(reason).inc()
        self.associations.labels("in", self.calling_ae_label(calling_ae), "rejected").inc()

    def association_refused(self, peer: str) -> None:
        """A destination or the worklist rejected our A-ASSOCIATE-RQ."""
        self.associations.labels("out", self.peer_label("out", peer), "rejected").inc()

    # --- DIMSE and ingest -----------------------------------------------------------------------

    def observe_request(
        self, service: Service, calling_ae: str, status: int, seconds: float
    ) -> None:
        _check(service, SERVICES, "service")
        ae = self.calling_ae_label(calling_ae)
        self.dimse_requests.labels(service, ae, status_class(status)).inc()
        self.dimse_duration.labels(service).observe(seconds)

    def observe_store(self, calling_ae: str, status: int, seconds: float, nbytes: int) -> None:
        self.observe_request("store", calling_ae, status, seconds)
        self.received_bytes.labels(self.calling_ae_label(calling_ae)).inc(nbytes)

    def observe_spool_write(self, seconds: float) -> None:
        self.spool_write.observe(seconds)

    def duplicate_received(self) -> None:
        self.duplicates.inc()

    # --- routing and forwarding -----------------------------------------------------------------

    def routed(self, rules_matched: Iterable[str], destinations: Iterable[str]) -> None:
        """Count one routed object: one sample per (matched rule, destination) pair; an object
        with no destination counts as unmatched (held)."""
        dests = [self.destination_label(d) for d in destinations]
        if not dests:
            self.routing_unmatched.inc()
            return
        for rule in tuple(rules_matched) or (NO_RULE,):
            for dest in dests:
                self.routing_decisions.labels(rule, dest).inc()

    def forward_attempt(
        self, destination: str, outcome: Outcome, seconds: float, nbytes: int
    ) -> None:
        """One C-STORE attempt; bytes count only when the destination accepted the object."""
        _check(outcome, OUTCOMES, "forward outcome")
        dest = self.destination_label(destination)
        self.forward_attempts.labels(dest, outcome).inc()
        self.forward_duration.labels(dest).observe(seconds)
        if outcome in DONE_OUTCOMES:
            self.forwarded_bytes.labels(dest).inc(nbytes)

    def set_destination_up(self, destination: str, up: bool) -> None:
        self.destination_up.labels(self.destination_label(destination)).set(1 if up else 0)

    # --- worklist and rules -------------------------------------------------------------------

    def mwl_query(
        self, calling_ae: str, outcome: MwlOutcome, upstream_seconds: float | None, results: int
    ) -> None:
        """One worklist query; ``upstream_seconds`` is None when the RIS was never asked."""
        _check(outcome, MWL_OUTCOMES, "worklist outcome")
        self.mwl_queries.labels(self.calling_ae_label(calling_ae), outcome).inc()
        if upstream_seconds is not None:
            self.mwl_upstream.observe(upstream_seconds)
        self.mwl_results.inc(results)

    def rules_reloaded(self, ok: bool, n_rules: int) -> None:
        """A (re)load attempt; on failure the last good rule set stays, so its size is kept."""
        self.rules_reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.rules_loaded.set(n_rules)


def _check(value: str, allowed: Collection[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def metric_names(registry: CollectorRegistry) -> frozenset[str]:
    """Every sample name the registry can expose (``_total``, ``_bucket``... included), even for
    labelled metrics that have no series yet."""
    return frozenset(_names(registry.collect()))


def _names(families: Iterable[Metric]) -> Iterator[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    for family in families:
        yield from (family.name + s for s in suffixes.get(family.type, ("",)))
        yield from (sample.name for sample in family.samples)
