"""The benchmark scenarios. Each one starts its own servers on loopback, drives DCMTK clients
against them, and returns one ``Sample`` per table row it measures (a scenario may measure a
baseline and the gateway side by side, e.g. ``mwl``).

Timings: a transfer starts when the first ``storescu`` is launched and ends when the last file has
landed at the final receiver (an inotify event, see ``bench.measure``), or, where the gateway is
the final receiver (``ingest``), when ``storescu`` exits: every C-STORE Success it got was sent only
after the object was durably spooled. Server CPU is counted from readiness to the end of the run.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.corpus import (
    Corpus,
    CorpusPlan,
    build_big_object,
    build_corpus,
    worklist_items,
    write_worklist_files,
)
from bench.measure import Landing
from bench.servers import (
    HOST,
    BenchError,
    Gateway,
    Orthanc,
    ProcessStats,
    Server,
    StoreSCP,
    WorklistSCP,
    findscu_worklist,
    finish,
    free_port,
    storescu,
)
from gateway.header import Header
from gateway.routing import RuleSet, route
from gateway.rules import RuleFile, compile_rules

ROUTE_ALL = "rules:\n  - name: all\n    destinations: [DEST]\n"
FAN_OUT = "rules:\n  - name: both\n    destinations: [PACS_A, PACS_B]\n"
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Profile:
    """Sizes of one benchmark run (``full`` is what the targets are defined for)."""

    name: str
    us_images: int
    repeats: int
    senders: int = 8
    mwl_items: int = 200
    mwl_queries: int = 20
    big_bytes: int = 1 << 30
    backlog: int = 100_000
    routing_rules: int = 1000
    routing_calls: int = 2000
    ct_slices: int = 200
    cine_loops: int = 4
    cine_frames: int = 60


PROFILES: Mapping[str, Profile] = {
    "full": Profile("full", us_images=500, repeats=3),
    "quick": Profile("quick", us_images=100, repeats=1, mwl_queries=5, big_bytes=128 << 20,
                     backlog=10_000, routing_calls=500, ct_slices=40, cine_loops=1),
    "smoke": Profile("smoke", us_images=6, repeats=1, senders=2, mwl_items=5, mwl_queries=2,
                     big_bytes=4 << 20, backlog=200, routing_rules=50, routing_calls=20, ct_slices=2,
                     cine_loops=1, cine_frames=3),
}


@dataclass(slots=True)
class Sample:
    """One repeat of one row: ``count`` things (``unit``) took ``seconds``."""

    seconds: float
    count: int
    unit: str
    bytes: int = 0
    servers: dict[str, ProcessStats] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    foreign_cores: float = 0.0  # CPU other processes used meanwhile (set by the runner)


class Context:
    """What scenarios share: output folders, the profile, the corpus (built on first use)."""

    def __init__(self, out: Path, profile: Profile, *, seed: int, keep: bool = False,
                 profiler: Callable[[Server, str], contextlib.AbstractContextManager[None]] | None = None,
                 gateway_tree: Path | None = None, receivers: Path | None = None) -> None:
        self.out = out
        # where the DCMTK receivers (storescp) write; None: each repeat's working folder, on the
        # disk under test (docs/performance.md, "Where the receivers write")
        self.receivers = receivers
        self.gateway_tree = gateway_tree  # None: this checkout's gateway (bench.ab sets another)
        self.profile = profile
        self.seed = seed
        self.keep = keep
        self.profiler = profiler
        self._corpus: Corpus | None = None
        self.big_object: Path | None = None
        self.backlog_spool: Path | None = None
        self.ruleset: RuleSet | None = None
        self.ruleset_compile_seconds = 0.0

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            p = self.profile
            plan = CorpusPlan(seed=self.seed, us_images=p.us_images, cine_loops=p.cine_loops,
                              cine_frames=p.cine_frames, ct_slices=p.ct_slices)
            self._corpus = build_corpus(self.out / "corpus" / p.name, plan)
        return self._corpus

    @property
    def timeout(self) -> float:
        return 120.0 + self.profile.us_images / 5

    @contextlib.contextmanager
    def work(self, name: str, repeat: int) -> Iterator[Path]:
        """A fresh working folder for one repeat; removed afterwards unless ``keep``."""
        path = self.out / "work" / f"{name}-r{repeat}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            if not self.keep:
                shutil.rmtree(path, ignore_errors=True)
                if self.receivers is not None:
                    shutil.rmtree(self.receivers / path.name, ignore_errors=True)

    def received(self, work: Path, name: str) -> Path:
        """The folder a storescp of this repeat writes into: ``work / name``, or the same name
        under ``receivers`` when the receivers write elsewhere (a tmpfs, say)."""
        if self.receivers is None:
            return work / name
        return self.receivers / work.name / name

    def gateway(self, directory: Path, **options: Any) -> Gateway:
        """The gateway under test (from ``gateway_tree`` when set), not yet started."""
        return Gateway(directory, tree=self.gateway_tree, **options)

    def profiled(self, server: Server, row: str, repeat: int) -> contextlib.AbstractContextManager[None]:
        if self.profiler is None or repeat != 0:
            return contextlib.nullcontext()
        return self.profiler(server, row)


Rows = dict[str, Sample]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    rows: tuple[str, ...]
    description: str
    run: Callable[[Context, int], Rows]
    prepare: Callable[[Context], None] | None = None


# ---------------------------------------------------------------------------------------------
# Helpers


def _send(port: int, files: Sequence[Path], called_ae: str, timeout: float) -> float:
    """Send ``files`` with one storescu; returns the CPU seconds storescu used."""
    with ClientCPU() as cpu:
        finish(storescu(port, files, called_ae=called_ae), "storescu", timeout)
    return cpu.seconds


class ClientCPU:
    """CPU seconds (user + system) of the child processes reaped inside the block: the storescu
    clients, which are not servers with a PID to read (``finish`` reaps them)."""

    def __enter__(self) -> Self:
        self.seconds = 0.0
        self._before = _children_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = _children_cpu() - self._before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stats(*servers: Server) -> dict[str, ProcessStats]:
    names: dict[str, ProcessStats] = {}
    for server in servers:
        key, n = server.name, 1
        while key in names:  # a second storescp is "storescp-2"
            n += 1
            key = f"{server.name}-{n}"
        names[key] = server.stats()
    return names


def _transfer(files: Sequence[Path], corpus: Corpus, seconds: float, servers: Sequence[Server],
              **extra: float) -> Sample:
    return Sample(seconds, len(files), "images", corpus.total_bytes(files), _stats(*servers), dict(extra))


def _count_files(directory: Path, pattern: str = "*") -> int:
    return sum(1 for p in directory.rglob(pattern) if p.is_file())


def _relay(ctx: Context, row: str, repeat: int, work: Path, files: Sequence[Path]) -> Sample:
    """storescu -> gateway -> storescp; seconds until the last file landed."""
    with StoreSCP(ctx.received(work, "received")) as scp, Landing([scp.directory]) as landing, \
            ctx.gateway(work / "gateway", destinations={"DEST": (scp.ae_title, scp.port)},
                        rules=ROUTE_ALL) as gateway, ctx.profiled(gateway, row, repeat):
        started = time.perf_counter()
        client = _send(gateway.port, files, gateway.ae_title, ctx.timeout)
        ingested = time.perf_counter() - started
        landed = landing.wait(len(files), ctx.timeout) - started
        return Sample(landed, len(files), "images", ctx.corpus.total_bytes(files),
                      _stats(gateway, scp), {"ingest_seconds": ingested, "client_cpu_seconds": client})


def _direct(ctx: Context, work: Path, files: Sequence[Path]) -> Sample:
    with StoreSCP(ctx.received(work, "received")) as scp:
        started = time.perf_counter()
        client = _send(scp.port, files, scp.ae_title, ctx.timeout)
        seconds = time.perf_counter() - started
        found = _count_files(scp.directory)
        if found != len(files):
            raise BenchError(f"storescp wrote {found} of {len(files)} files")
        return _transfer(files, ctx.corpus, seconds, [scp], client_cpu_seconds=client)


# ---------------------------------------------------------------------------------------------
# Transfer scenarios


def reference(ctx: Context, repeat: int) -> Rows:
    with ctx.work("reference", repeat) as work:
        return {"reference": _direct(ctx, work, ctx.corpus.us)}


def ingest(ctx: Context, repeat: int) -> Rows:
    files = ctx.corpus.us
    with ctx.work("ingest", repeat) as work, ctx.gateway(work / "gateway") as gateway, \
            ctx.profiled(gateway, "ingest", repeat):
        started = time.perf_counter()
        client = _send(gateway.port, files, gateway.ae_title, ctx.timeout)
        seconds = time.perf_counter() - started
        sample = _transfer(files, ctx.corpus, seconds, [gateway], client_cpu_seconds=client)
        spooled = _count_files(work / "gateway" / "spool" / "objects", "*.dcm")
        if spooled != len(files):
            raise BenchError(f"the gateway spooled {spooled} of {len(files)} objects")
        return {"ingest": sample}


def end_to_end(ctx: Context, repeat: int) -> Rows:
    with ctx.work("e2e", repeat) as work:
        return {"e2e": _relay(ctx, "e2e", repeat, work, ctx.corpus.us)}


def fan_out(ctx: Context, repeat: int) -> Rows:
    files = ctx.corpus.us
    with ctx.work("fanout", repeat) as work, \
            StoreSCP(ctx.received(work, "a"), ae_title="PACS_A") as a, \
            StoreSCP(ctx.received(work, "b"), ae_title="PACS_B") as b, \
            Landing([a.directory, b.directory]) as landing, \
            ctx.gateway(work / "gateway", rules=FAN_OUT,
                        destinations={"PACS_A": (a.ae_title, a.port), "PACS_B": (b.ae_title, b.port)}
                        ) as gateway, ctx.profiled(gateway, "fanout", repeat):
        started = time.perf_counter()
        client = _send(gateway.port, files, gateway.ae_title, ctx.timeout)
        ingested = time.perf_counter() - started
        landed = landing.wait(len(files), ctx.timeout) - started
        return {"fanout": _transfer(files, ctx.corpus, landed, [gateway, a, b], ingest_seconds=ingested,
                                    client_cpu_seconds=client)}


def concurrency(ctx: Context, repeat: int) -> Rows:
    return _concurrent(ctx, repeat, "concurrency", associations=1)


def concurrency_associations(ctx: Context, repeat: int) -> Rows:
    """The same with ``associations: 4`` to the PACS (storescp ``--fork`` serves them in parallel)."""
    return _concurrent(ctx, repeat, "concurrency-a4", associations=4)


def _concurrent(ctx: Context, repeat: int, row: str, *, associations: int) -> Rows:
    files = ctx.corpus.us
    senders = ctx.profile.senders
    chunks = [files[i::senders] for i in range(senders)]
    fork = ("--fork",) if associations > 1 else ()
    with ctx.work(row, repeat) as work, StoreSCP(ctx.received(work, "received"), extra=fork) as scp, \
            Landing([scp.directory]) as landing, \
            ctx.gateway(work / "gateway", rules=ROUTE_ALL, settings={"destinations": {"DEST": {
                "ae_title": scp.ae_title, "host": HOST, "port": scp.port,
                "associations": associations}}}) as gateway, ctx.profiled(gateway, row, repeat):
        started = time.perf_counter()
        with ClientCPU() as cpu:
            clients = [storescu(gateway.port, chunk, called_ae=gateway.ae_title,
                                calling_ae=f"BENCHSCU{i}") for i, chunk in enumerate(chunks)]
            for client in clients:
                finish(client, "storescu", ctx.timeout)
        ingested = time.perf_counter() - started
        landed = landing.wait(len(files), ctx.timeout) - started
        return {row: _transfer(files, ctx.corpus, landed, [gateway, scp], ingest_seconds=ingested,
                               client_cpu_seconds=cpu.seconds)}


def peer(ctx: Context, repeat: int) -> Rows:
    files = ctx.corpus.us
    with ctx.work("peer", repeat) as work, StoreSCP(ctx.received(work, "received")) as scp, \
            Landing([scp.directory]) as landing, \
            Orthanc(work / "orthanc", ("STORESCP", "127.0.0.1", scp.port)) as orthanc:
        started = time.perf_counter()
        _send(orthanc.dicom_port, files, "ORTHANC", ctx.timeout)
        ingested = time.perf_counter() - started
        landed = landing.wait(len(files), ctx.timeout) - started
        return {"orthanc": _transfer(files, ctx.corpus, landed, [orthanc, scp], ingest_seconds=ingested)}


def durable_peer(ctx: Context, repeat: int) -> Rows:
    """storescu -> Orthanc storing only: a receiver that, like the gateway, syncs every object to
    disk before it answers (the direct DCMTK hop never syncs)."""
    files = ctx.corpus.us
    with ctx.work("durable-peer", repeat) as work, Orthanc(work / "orthanc") as orthanc:
        started = time.perf_counter()
        client = _send(orthanc.dicom_port, files, "ORTHANC", ctx.timeout)
        seconds = time.perf_counter() - started
        return {"orthanc-ingest": _transfer(files, ctx.corpus, seconds, [orthanc],
                                            client_cpu_seconds=client)}


def mixed(ctx: Context, repeat: int) -> Rows:
    files = (*ctx.corpus.ct, *ctx.corpus.cine)
    with ctx.work("mixed-direct", repeat) as work:
        direct = _direct(ctx, work, files)
    with ctx.work("mixed-e2e", repeat) as work:
        relayed = _relay(ctx, "mixed-e2e", repeat, work, files)
    return {"mixed-direct": direct, "mixed-e2e": relayed}


# ---------------------------------------------------------------------------------------------
# Worklist


def mwl(ctx: Context, repeat: int) -> Rows:
    items = worklist_items(ctx.profile.mwl_items, seed=ctx.seed, station_ae="BENCHUS")
    with ctx.work("mwl", repeat) as work:
        write_worklist_files(work / "db" / "WLMSCP", items)
        with WorklistSCP(work / "db") as ris, \
                ctx.gateway(work / "gateway", worklist=(ris.ae_title, ris.port)) as gateway:
            targets = {"mwl-direct": (ris.port, ris.ae_title),
                       "mwl-gateway": (gateway.port, gateway.ae_title)}
            for name, (port, ae) in targets.items():
                _check_answers(work / f"check-{name}", port, ae, len(items))
            spent = dict.fromkeys(targets, 0.0)
            with ctx.profiled(gateway, "mwl-gateway", repeat):
                for _ in range(ctx.profile.mwl_queries):
                    for name, (port, ae) in targets.items():  # interleaved: same conditions for both
                        started = time.perf_counter()
                        findscu_worklist(port, called_ae=ae)
                        spent[name] += time.perf_counter() - started
            queries = ctx.profile.mwl_queries
            return {
                "mwl-direct": Sample(spent["mwl-direct"] / queries, len(items), "answers",
                                     servers=_stats(ris)),
                "mwl-gateway": Sample(spent["mwl-gateway"] / queries, len(items), "answers",
                                      servers=_stats(gateway, ris)),
            }


def _check_answers(out_dir: Path, port: int, called_ae: str, expected: int) -> None:
    findscu_worklist(port, called_ae=called_ae, out_dir=out_dir)
    found = _count_files(out_dir, "rsp*.dcm")
    if found != expected:
        raise BenchError(f"findscu -W via {called_ae} got {found} answers, expected {expected}")


# ---------------------------------------------------------------------------------------------
# Memory: one very large object, a large backlog, restart recovery


def prepare_memory(ctx: Context) -> None:
    ctx.big_object = build_big_object(ctx.out / "corpus" / f"big-{ctx.profile.big_bytes}", ctx.seed,
                                      ctx.profile.big_bytes)
    spool = ctx.out / "work" / "backlog" / "spool"
    if spool.exists():
        shutil.rmtree(spool)
    command = [sys.executable, "-m", "bench.backlog", str(spool), str(ctx.profile.backlog), "DEST"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise BenchError(f"creating the backlog failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    ctx.backlog_spool = spool


def memory(ctx: Context, repeat: int) -> Rows:
    return {"relay-big": _relay_big(ctx, repeat), "backlog": _backlog(ctx, repeat)}


def _relay_big(ctx: Context, repeat: int) -> Sample:
    assert ctx.big_object is not None
    size = ctx.big_object.stat().st_size
    with ctx.work("relay-big", repeat) as work:
        sample = _relay(ctx, "relay-big", repeat, work, [ctx.big_object])
    sample.bytes, sample.unit = size, "objects"
    return sample


def _backlog(ctx: Context, repeat: int) -> Sample:
    """Restart a gateway on the backlog spool (destination down): time to READY=1, then its RSS once
    the forwarder has filled its in-memory queue and failed an attempt, and one /metrics scrape."""
    assert ctx.backlog_spool is not None
    with ctx.work("backlog", repeat) as work, \
            ctx.gateway(work / "gateway", destinations={"DEST": ("NOWHERE", free_port())},
                        settings={"spool_dir": str(ctx.backlog_spool)}) as gateway:
        _wait_for_attempt(gateway, ctx.timeout)
        started = time.perf_counter()
        scrape = gateway.metrics()
        scraped = time.perf_counter() - started
        if 'dicomgw_queue_items{destination="DEST"}' not in scrape:
            raise BenchError("the gateway's /metrics has no dicomgw_queue_items for DEST")
        return Sample(gateway.ready_seconds, ctx.profile.backlog, "objects", servers=_stats(gateway),
                      extra={"recovery_seconds": gateway.ready_seconds, "scrape_seconds": scraped})


def _wait_for_attempt(gateway: Gateway, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while 'dicomgw_forward_attempts_total{destination="DEST",outcome="transient"}' not in gateway.metrics():
        if time.monotonic() > deadline:
            raise BenchError("the gateway made no forward attempt on its backlog")
        time.sleep(delay)  # polling a foreign process's /metrics, bounded
        delay = min(delay * 2, 0.5)


# ---------------------------------------------------------------------------------------------
# Routing


def prepare_routing(ctx: Context) -> None:
    text = routing_rules(ctx.profile.routing_rules)
    started = time.perf_counter()
    files = [RuleFile(Path("bench-rules.yaml"), text.encode())]
    ctx.ruleset = compile_rules(files, ("PACS_TEST", "PACS_PROD"))
    ctx.ruleset_compile_seconds = time.perf_counter() - started


ROUTING_HEADER = Header("US_MAIN", "BENCHGW", "192.168.1.20", {
    "Modality": ("US",),
    "StationName": ("USROOM1",),
    "StudyDescription": ("US ABDOMEN",),
    "SOPClassUID": ("1.2.840.10008.5.1.4.1.1.6.1",),
    "InstitutionName": ("Benchmark Hospital",),
    "AccessionNumber": ("A0001",),
})


def routing_rules(count: int) -> str:
    """``count - 1`` rules that do not match ``ROUTING_HEADER`` (each fails on its second condition,
    after ``Modality: US`` held), then a catch-all: every decision walks every rule."""
    kinds = (
        "{{Modality: US, calling_ae: US_ROOM{i}}}",
        "{{Modality: US, StationName: {{glob: 'ROOM{i}-*'}}}}",
        "{{Modality: US, StudyDescription: {{regex: '(?i)protocol {i}\\b'}}}}",
        "{{Modality: US, source_ip: {{cidr: 10.{a}.{b}.0/24}}, SOPClassUID: {{in: ['1.2.3.{i}']}}}}",
        "{{Modality: US, AccessionNumber: {{exists: false}}, "
        "InstitutionName: {{not: {{glob: '*Clinic*'}}}}}}",
    )
    lines = ["rules:"]
    for i in range(count - 1):
        match = kinds[i % len(kinds)].format(i=i, a=i // 256, b=i % 256)
        lines += [f"  - name: rule-{i:04d}", f"    match: {match}", "    destinations: [PACS_TEST]"]
    lines += ["  - name: catch-all", "    destinations: [PACS_PROD]"]
    return "\n".join(lines) + "\n"


def routing(ctx: Context, repeat: int) -> Rows:
    ruleset = ctx.ruleset
    assert ruleset is not None
    calls = ctx.profile.routing_calls
    started = time.perf_counter()
    for _ in range(calls):
        decision = route(ROUTING_HEADER, ruleset)
    seconds = time.perf_counter() - started
    if decision.destinations != ("PACS_PROD",):
        raise BenchError(f"routing chose {decision.destinations}, expected only PACS_PROD")
    extra = {"us_per_decision": seconds / calls * 1e6, "rules": float(len(ruleset.rules)),
             "compile_seconds": ctx.ruleset_compile_seconds}
    return {"routing": Sample(seconds, calls, "decisions", extra=extra)}


# ---------------------------------------------------------------------------------------------
# Registry


SCENARIOS: Mapping[str, Scenario] = {s.name: s for s in (
    Scenario("reference", ("reference",), "storescu -> storescp (the direct DCMTK hop)", reference),
    Scenario("ingest", ("ingest",), "storescu -> gateway, held (Success = durably spooled)", ingest),
    Scenario("e2e", ("e2e",), "storescu -> gateway -> storescp, until the last file landed", end_to_end),
    Scenario("fanout", ("fanout",), "storescu -> gateway -> two storescp (every image to both)", fan_out),
    Scenario("concurrency", ("concurrency",), "8 storescu at once -> gateway -> storescp", concurrency),
    Scenario("concurrency4", ("concurrency-a4",),
             "8 storescu at once -> gateway (associations: 4) -> storescp --fork",
             concurrency_associations),
    Scenario("peer", ("orthanc",), "storescu -> Orthanc (Lua send + delete) -> storescp", peer),
    Scenario("durable-peer", ("orthanc-ingest",),
             "storescu -> Orthanc storing only (fsync per file, like the gateway's ingest)", durable_peer),
    Scenario("mixed", ("mixed-direct", "mixed-e2e"),
             "CT slices + US cine loops: direct hop vs through the gateway", mixed),
    Scenario("mwl", ("mwl-direct", "mwl-gateway"), "findscu -W: wlmscpfs directly vs through the gateway",
             mwl),
    Scenario("memory", ("relay-big", "backlog"),
             "gateway RSS relaying one very large object; restart on a large backlog", memory,
             prepare_memory),
    Scenario("routing", ("routing",), "route() with 1,000 rules, in process", routing, prepare_routing),
)}
DEFAULT = ("reference", "ingest", "e2e", "fanout", "concurrency", "concurrency4", "peer", "durable-peer",
           "mixed", "mwl", "memory", "routing")
SMOKE = ("reference", "ingest", "e2e", "routing")
