"""The composition root: builds every component from ``Settings`` and runs them in one task group.

Start-up order: spool recovery (so nothing acknowledged is forgotten), rules, forwarders, then the
DICOM listener and HTTP; ``task_status.started`` reports the bound ports once the gateway listens.
Shutdown (``stop()`` or SIGTERM/SIGINT via the CLI): stop accepting, let associations in flight
finish for ``shutdown_timeout``, cancel the rest, close the journal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client import CollectorRegistry

from gateway.access import AccessPolicy
from gateway.dicom.acceptor import Acceptor, AcceptorConfig
from gateway.errors import RulesError, SpoolFull
from gateway.forwarder import AttemptObserver, Forwarder
from gateway.header import configure_pydicom
from gateway.http import HttpServer, Readiness
from gateway.metrics import DestinationState, GatewayState, Metrics
from gateway.mwl import WorklistProxy
from gateway.routing import RuleSet
from gateway.rules import load_rules
from gateway.rules_watch import RulesWatcher
from gateway.scp import GatewayServices, Ingest, WorklistService
from gateway.sdnotify import Notifier
from gateway.settings import Settings
from gateway.spool import Spool, StoredInstance
from gateway.tls import server_context

log = logging.getLogger("gateway")
HOUSEKEEPING_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Bound:
    """Where the running gateway listens (ports resolved when 0 was configured; a listener that
    is not configured has port None)."""

    dicom_port: int | None
    http_port: int
    tls_port: int | None = None


class RulesHolder:
    """The rule set in force; swapped whole by the watcher, read by ingest."""

    def __init__(self, current: RuleSet) -> None:
        self.current = current


class Gateway:
    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None,
                 spool: Spool | None = None, notifier: Notifier | None = None,
                 attempt_observer: AttemptObserver | None = None) -> None:
        self.settings = settings
        configure_pydicom()
        self.notifier = notifier or Notifier()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, destinations=tuple(settings.destinations),
                               known_calling_aes=tuple(settings.known_calling_aes))
        self.spool = spool or Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes,
                           min_free_fraction=settings.spool_min_free_fraction,
                           duplicate_policy=settings.duplicate_policy,
                           retention_seconds=settings.retention_seconds)
        self.forwarders = {
            name: Forwarder(name, destination, self.spool, self.metrics,
                            calling_ae=settings.ae_title, max_pdu=settings.max_pdu,
                            observer=attempt_observer)
            for name, destination in settings.destinations.items()
        }
        self.rules: RulesHolder | None = None
        self.watcher: RulesWatcher | None = None
        self.acceptor: Acceptor | None = None
        self._stop = anyio.Event()
        self._state = GatewayState()
        self.listening = False

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[Bound] = anyio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        report = await self.spool.open()
        log.info("spool recovered: %d pending deliveries, %d held, %d partial files swept, "
                 "%d orphans removed", report.pending_deliveries, report.held_instances,
                 report.swept_temp_files, report.orphan_files)
        try:
            ruleset = await anyio.to_thread.run_sync(load_rules, settings.rules_dir,
                                                     tuple(settings.destinations))
            self.rules = RulesHolder(ruleset)
            self.metrics.rules_reloaded(True, len(ruleset.rules))
            await self._serve(ruleset, task_status)
        finally:
            self.listening = False
            with anyio.CancelScope(shield=True):
                await self.spool.close()

    async def _serve(self, ruleset: RuleSet, task_status: TaskStatus[Bound]) -> None:
        settings = self.settings
        assert self.rules is not None
        ingest = Ingest(self.spool, self.rules, self.metrics, self._notify)
        access = AccessPolicy(settings.modalities)
        if access.open:
            log.warning("no modalities configured: any calling AE title is accepted "
                        "(list them under 'modalities' to restrict who may connect)")
        services = GatewayServices(ingest, self.metrics, self._worklist(), access)
        self.acceptor = Acceptor(AcceptorConfig(
            settings.ae_title, settings.max_associations, settings.max_pdu,
            settings.artim_timeout, settings.network_timeout,
            worklist_enabled=settings.worklist is not None,
            max_association_seconds=settings.max_association_seconds,
            max_association_bytes=settings.max_association_bytes), services)
        watcher = self.watcher = RulesWatcher(
            settings.rules_dir, tuple(settings.destinations), self._rules_reloaded,
            self._rules_failed, initial=ruleset)
        http = HttpServer(settings.http_host, settings.http_port, self.registry, self.readiness,
                          before_scrape=self.refresh_state)
        self.metrics.attach_state(lambda: self._state)
        async with anyio.create_task_group() as tg:
            for forwarder in self.forwarders.values():
                tg.start_soon(forwarder.run)
            await tg.start(watcher.run)
            http_port = await tg.start(http.serve)
            dicom_port, tls_port = await self._listen(tg, self.acceptor)
            self.listening = True
            task_status.started(Bound(dicom_port, http_port, tls_port))
            self.notifier.notify(f"READY=1\nSTATUS=listening on {dicom_port or tls_port}")
            tg.start_soon(self.notifier.watchdog)
            tg.start_soon(self._housekeeping)
            await self._stop.wait()
            self.acceptor.stop_accepting()
            self.notifier.notify("STOPPING=1")
            log.info("stopping: draining associations for up to %g s", settings.shutdown_timeout)
            self.listening = False
            await self.acceptor.drain(settings.shutdown_timeout)
            tg.cancel_scope.cancel()

    async def _listen(self, tg: TaskGroup, acceptor: Acceptor) -> tuple[int | None, int | None]:
        settings = self.settings
        tls = settings.tls
        context = server_context(tls) if tls is not None else None  # ConfigError on bad files
        plain = None
        if tls is None or tls.plain:
            plain = await tg.start(partial(acceptor.serve, settings.host, settings.port))
        secure = None
        if tls is not None:
            secure = await tg.start(partial(acceptor.serve, settings.host, tls.port, ssl=context))
        return plain, secure

    async def _housekeeping(self) -> None:
        """Apply retention, prune finished journal rows, re-count spool bytes (every minute)."""
        while True:
            await anyio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                removed = await self.spool.sweep_retention()
            except SpoolFull as exc:  # the journal is failing: readiness says so; try again later
                log.error("housekeeping skipped: %s", exc)
                continue
            if removed:
                log.info("retention: removed %d delivered objects", removed)

    async def reload_rules(self) -> None:
        """Validate and swap the rules now (SIGHUP)."""
        if self.watcher is not None:
            await self.watcher.reload_now()

    def _worklist(self) -> WorklistService | None:
        if self.settings.worklist is None:
            return None
        return WorklistProxy(self.settings.worklist, calling_ae=self.settings.ae_title,
                             upstreams_by_calling_ae=self.settings.worklist_by_calling_ae,
                             observer=self.metrics.mwl_query)

    def _notify(self, stored: StoredInstance, destinations: tuple[str, ...] | Any) -> None:
        for name in destinations:
            forwarder = self.forwarders.get(name)
            if forwarder is not None:
                forwarder.wake(stored.id)

    def _rules_reloaded(self, ruleset: RuleSet) -> None:
        assert self.rules is not None
        self.rules.current = ruleset
        self.metrics.rules_reloaded(True, len(ruleset.rules))
        log.info("rules reloaded: %d rules from %d files", len(ruleset.rules), len(ruleset.files))

    def _rules_failed(self, error: RulesError) -> None:
        self.metrics.rules_reloaded(False, 0)
        log.error("rules not reloaded, the previous rules stay in force:\n%s", error)

    async def refresh_state(self) -> None:
        """Snapshot journal counts for the scrape (the journal lives on its own thread, so the
        collector cannot query it synchronously; the HTTP server awaits this before /metrics).
        When the journal fails, the scrape shows the last counts (and readiness the failure)."""
        try:
            counts = await self.spool.counts()
            held = await self.spool.held_count()
        except SpoolFull as exc:
            log.error("metrics: journal counts not refreshed: %s", exc)
            return
        usage = self.spool.usage()
        now = time.time()
        destinations = {}
        for name, destination in self.settings.destinations.items():
            c = counts.get(name)
            oldest = (now - c.oldest_received_at) if c and c.oldest_received_at else 0.0
            destinations[name] = DestinationState(c.pending if c else 0, destination.queue_capacity,
                                                  max(oldest, 0.0), c.dead if c else 0)
        free = usage.free_bytes
        if usage.capacity_bytes:  # what is left under the high-water mark, if that is less
            free = min(free, max(usage.capacity_bytes - usage.used_bytes, 0))
        self._state = GatewayState(destinations, held, free, usage.used_bytes, usage.capacity_bytes)

    def readiness(self) -> Readiness:
        reasons = []
        if not self.listening:
            reasons.append("not listening for DICOM")
        usage = self.spool.usage()
        if not usage.writable:
            reasons.append("spool not writable")
        if usage.over_high_water:
            reasons.append("spool over its high-water mark")
        if self.rules is None:
            reasons.append("rules not loaded")
        return Readiness(not reasons, tuple(reasons))
