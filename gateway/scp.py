"""The gateway's services behind the acceptor: C-ECHO, durable C-STORE ingest, and the MWL proxy.

A C-STORE's dataset bytes go straight into a spool temp file as they arrive. The header (only the
elements the rules read) is parsed from the buffered prefix and the routing decision made (pure) as
soon as the prefix is complete, while the rest is still arriving (or, for a small dataset, when the
last fragment is in); then the spool commits file + journal row + deliveries. Only then is Success
answered. Anything that goes wrong answers a failure status; nothing is ever answered Success early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import anyio
from pydicom.dataset import Dataset

from gateway.dicom import dimse
from gateway.dicom.events import (
    AssociationInfo,
    DatasetSink,
    FindRequest,
    FindResponse,
    Rejection,
    StoreRequest,
)
from gateway.errors import SpoolFull
from gateway.header import (
    HeaderUnreadable,
    PrefixTooShort,
    header_from_dataset,
    read_header,
    read_header_file,
)
from gateway.metrics import Metrics
from gateway.routing import Decision, RuleSet, route
from gateway.spool import InstanceMeta, Spool, SpoolWriter, StoredInstance
from gateway.spool_writer import PREFIX_BYTES

log = logging.getLogger("gateway.scp")

ALWAYS_READ = frozenset({"SOPClassUID"})  # reading it proves the dataset parses at all


class RulesSource(Protocol):
    @property
    def current(self) -> RuleSet: ...


class WorklistService(Protocol):
    def find(self, info: AssociationInfo, request: FindRequest) -> AsyncIterator[FindResponse]: ...


Notify = Callable[[StoredInstance, Sequence[str]], None]


class Ingest:
    """Turns one C-STORE into a spooled, journalled, routed instance."""

    def __init__(self, spool: Spool, rules: RulesSource, metrics: Metrics, notify: Notify) -> None:
        self.spool = spool
        self.rules = rules
        self.metrics = metrics
        self.notify = notify

    def begin(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink:
        meta = InstanceMeta(request.sop_class_uid, request.sop_instance_uid,
                            request.transfer_syntax, info.calling_ae, info.called_ae, info.peer_ip)
        try:
            writer: SpoolWriter | None = self.spool.begin(meta)
            refusal = ""
        except SpoolFull as exc:
            writer, refusal = None, str(exc)
        return StoreSink(self, info, request, writer, refusal)

    def decide_from_prefix(self, writer: SpoolWriter, request: StoreRequest,
                           info: AssociationInfo, size: int) -> Decision:
        """Route on the header parsed from the buffered prefix (no I/O). Raises PrefixTooShort
        when the header reaches beyond the prefix, HeaderUnreadable when it does not parse."""
        ruleset = self.rules.current
        prefix = writer.prefix
        dataset = read_header(prefix, request.transfer_syntax, ruleset.keywords | ALWAYS_READ,
                              complete=size <= len(prefix))
        return self._route(dataset, ruleset, info)

    async def decide(self, writer: SpoolWriter, request: StoreRequest, info: AssociationInfo,
                     size: int) -> Decision:
        try:
            return self.decide_from_prefix(writer, request, info, size)
        except PrefixTooShort:
            return await self.decide_from_file(writer, request, info)

    async def decide_from_file(self, writer: SpoolWriter, request: StoreRequest,
                               info: AssociationInfo) -> Decision:
        """A header longer than the prefix: parse it from the spooled file, off the event loop."""
        ruleset = self.rules.current
        dataset = await anyio.to_thread.run_sync(
            read_header_file, writer.tmp_path, writer.dataset_offset,
            request.transfer_syntax, ruleset.keywords | ALWAYS_READ)
        return self._route(dataset, ruleset, info)

    @staticmethod
    def _route(dataset: Dataset, ruleset: RuleSet, info: AssociationInfo) -> Decision:
        if "SOPClassUID" not in dataset:
            raise HeaderUnreadable("the dataset has no SOP Class UID")
        header = header_from_dataset(dataset, ruleset.keywords, calling_ae=info.calling_ae,
                                     called_ae=info.called_ae, source_ip=info.peer_ip)
        return route(header, ruleset)


class StoreSink:
    """One C-STORE in progress (implements ``gateway.dicom.events.DatasetSink``)."""

    __slots__ = ("early", "info", "ingest", "refusal", "request", "size", "started", "writer")

    def __init__(self, ingest: Ingest, info: AssociationInfo, request: StoreRequest,
                 writer: SpoolWriter | None, refusal: str) -> None:
        self.ingest, self.info, self.request = ingest, info, request
        self.writer, self.refusal = writer, refusal
        self.size = 0
        self.started = time.perf_counter()
        # what routing made of the prefix while the rest still arrived: a decision, or why not
        self.early: Decision | PrefixTooShort | HeaderUnreadable | None = None

    def write(self, data: memoryview) -> None:
        self.size += len(data)
        writer = self.writer
        if writer is not None:
            writer.write(data)
            if self.early is None and self.size > PREFIX_BYTES:  # the prefix is all there
                self._decide_early(writer)

    def _decide_early(self, writer: SpoolWriter) -> None:
        """Route while the rest of the dataset is still arriving, off the path between the last
        fragment and the response. It is the call ``finish`` would make (a prefix of a larger
        dataset), made sooner; its outcome, decision or exception, is kept for ``finish``."""
        try:
            self.early = self.ingest.decide_from_prefix(writer, self.request, self.info, self.size)
        except (PrefixTooShort, HeaderUnreadable) as exc:
            self.early = exc

    async def _decision(self, writer: SpoolWriter) -> Decision:
        early = self.early
        if isinstance(early, Decision):
            return early
        if isinstance(early, HeaderUnreadable):
            raise early
        if isinstance(early, PrefixTooShort):  # the prefix was parsed already: the file, at once
            return await self.ingest.decide_from_file(writer, self.request, self.info)
        return await self.ingest.decide(writer, self.request, self.info, self.size)

    async def finish(self) -> tuple[int, str]:
        status, comment = await self._finish()
        metrics = self.ingest.metrics
        metrics.observe_store(self.info.calling_ae, status, time.perf_counter() - self.started,
                              self.size)
        log.debug("C-STORE %s from %s: status 0x%04X", self.request.sop_instance_uid,
                  self.info.calling_ae, status)
        return status, comment

    async def _finish(self) -> tuple[int, str]:
        writer = self.writer
        if writer is None:
            log.warning("refused C-STORE from %s: %s", self.info.calling_ae, self.refusal)
            return dimse.OUT_OF_RESOURCES, self.refusal
        if writer.failed:
            writer.abort()
            return dimse.OUT_OF_RESOURCES, "spool write failed"
        try:
            decision = await self._decision(writer)
        except HeaderUnreadable as exc:
            writer.abort()
            log.warning("C-STORE %s from %s is not a readable dataset: %s",
                        self.request.sop_instance_uid, self.info.calling_ae, exc)
            return dimse.STORE_CANNOT_UNDERSTAND, "dataset header cannot be parsed"
        except OSError as exc:  # reading the temp file back for a header beyond the prefix
            writer.abort()
            log.error("C-STORE %s from %s not stored: cannot read the spooled dataset back: %s",
                      self.request.sop_instance_uid, self.info.calling_ae, exc)
            return dimse.OUT_OF_RESOURCES, "spool read failed"
        spooled = time.perf_counter()
        try:
            stored = await writer.commit(decision.destinations, decision.matched)
        except SpoolFull as exc:
            log.error("C-STORE %s from %s not stored: %s", self.request.sop_instance_uid,
                      self.info.calling_ae, exc)
            return dimse.OUT_OF_RESOURCES, str(exc)
        self._stored(stored, decision, time.perf_counter() - spooled)
        return dimse.SUCCESS, ""

    def _stored(self, stored: StoredInstance, decision: Decision, seconds: float) -> None:
        metrics = self.ingest.metrics
        metrics.observe_spool_write(seconds)
        if stored.duplicate:
            metrics.duplicate_received()
        metrics.routed(decision.matched, decision.destinations)
        if decision.destinations:
            self.ingest.notify(stored, decision.destinations)
        else:
            log.info("instance %s from %s held: no rule routes it", self.request.sop_instance_uid,
                     self.info.calling_ae)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class AccessPolicy(Protocol):
    def check(self, calling_ae: str, peer_ip: str) -> Rejection | None: ...


class GatewayServices:
    """Implements ``gateway.dicom.events.Services`` by delegating to the gateway's components."""

    def __init__(self, ingest: Ingest, metrics: Metrics, worklist: WorklistService | None = None,
                 access: AccessPolicy | None = None) -> None:
        self.ingest = ingest
        self.metrics = metrics
        self.worklist = worklist
        self.access = access

    def check_calling(self, calling_ae: str, peer_ip: str) -> Rejection | None:
        return self.access.check(calling_ae, peer_ip) if self.access is not None else None

    def association_started(self, info: AssociationInfo) -> None:
        self.metrics.association_opened("in", info.calling_ae)
        log.info("association from %s (%s) accepted, %d contexts", info.calling_ae, info.peer_ip,
                 len(info.contexts))

    def association_ended(self, info: AssociationInfo, aborted: bool) -> None:
        if aborted:
            self.metrics.association_aborted("in", info.calling_ae)
        self.metrics.association_closed("in")

    def association_rejected(self, rejection: Rejection, calling_ae: str, peer_ip: str,
                             called_ae: str) -> None:
        self.metrics.association_rejected(rejection.label, calling_ae=calling_ae)  # type: ignore[arg-type]
        advice = _REJECTION_ADVICE.get(rejection.label, "").format(calling=calling_ae, ip=peer_ip,
                                                                    called=called_ae)
        log.warning("security: rejected association from %s at %s calling %s (%s, RJ %d,%d,%d): %s",
                    calling_ae, peer_ip, called_ae, rejection.label, rejection.result,
                    rejection.source, rejection.reason, advice,
                    extra={"event": "association_rejected", "calling_ae": calling_ae,
                           "source_ip": peer_ip, "called_ae": called_ae,
                           "reason": rejection.label})

    def echo(self, info: AssociationInfo) -> int:
        self.metrics.observe_request("echo", info.calling_ae, dimse.SUCCESS, 0.0)
        return dimse.SUCCESS

    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink:
        return self.ingest.begin(info, request)

    def find(self, info: AssociationInfo, request: FindRequest) -> AsyncIterator[FindResponse]:
        if self.worklist is None:
            return _no_worklist()
        return self.worklist.find(info, request)


_REJECTION_ADVICE = {
    "called_ae": "the modality calls {called!r}, which is not this gateway's AE title: configure the "
                 "modality to call the gateway's ae_title",
    "calling_ae": "{calling!r} is not a known modality: add it under 'modalities' if it should send",
    "source_ip": "{calling!r} is known but may not call from {ip}: check its 'addresses' in "
                 "'modalities' or the modality's network settings",
    "limit": "max_associations reached: the modality may retry; raise max_associations if this "
             "is normal load",
    "context": "the peer did not propose the DICOM application context: it is not a DICOM client",
    "protocol": "the peer speaks an unsupported upper-layer protocol version",
}


async def _no_worklist() -> AsyncIterator[FindResponse]:
    yield FindResponse(dimse.UNABLE_TO_PROCESS, None, "no worklist upstream configured")
