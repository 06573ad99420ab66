"""``python -m bench``: run the scenarios, repeat them, and report medians and same-run ratios.

Repeats are interleaved (every scenario once, then every scenario again, ...) so that drift of the
machine during the run hits the gateway and its baselines alike. Each row reports the median
seconds over the repeats, the rate and MB/s derived from it, the median CPU seconds and the
highest peak RSS of each server process. Ratios compare medians of rows measured in this same run,
and each one is checked against its target. A Markdown report goes to stdout, everything as JSON
to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import profile as profiling
from bench.scenarios import DEFAULT, PROFILES, SCENARIOS, SMOKE, Context, Profile, Sample, Scenario
from bench.servers import REPO_ROOT, BenchError, ProcessStats, Server, tool
from gateway import __version__ as gateway_version

MB = 1_000_000
NOISY_CORES = 0.25
Metric = Literal["rate", "mb_per_s", "seconds", "gateway_rss_mb", "us_per_decision"]


@dataclass(frozen=True, slots=True)
class Target:
    """``numerator`` row's metric (divided by ``denominator``'s when given) ``op`` ``threshold``."""

    name: str
    description: str
    numerator: str
    denominator: str | None
    metric: Metric
    op: Literal[">=", "<=", "<"] = ">="
    threshold: float | None = None  # None: reported, no target


TARGETS: tuple[Target, ...] = (
    Target("e2e_vs_direct", "end to end / direct DCMTK hop (images/s)", "e2e", "reference", "rate",
           ">=", 0.5),
    Target("e2e_vs_orthanc", "end to end / Orthanc Lua router (images/s)", "e2e", "orthanc", "rate",
           ">=", 2.5),
    Target("ingest_vs_direct", "ingest / direct DCMTK hop (images/s)", "ingest", "reference", "rate",
           ">=", 0.8),
    Target("ingest_vs_durable_peer", "ingest / Orthanc storing (both sync every object; images/s)",
           "ingest", "orthanc-ingest", "rate"),
    Target("fanout_vs_one", "fan-out to two / one destination (images/s)", "fanout", "e2e", "rate",
           ">=", 0.8),
    Target("concurrency_vs_one", "8 senders / one sender, end to end (images/s)", "concurrency", "e2e",
           "rate", ">=", 1.0),
    Target("mwl_vs_direct", "MWL query time through the gateway / direct", "mwl-gateway", "mwl-direct",
           "seconds", "<=", 1.5),
    Target("mixed_vs_direct", "CT + cine end to end / direct hop (MB/s)", "mixed-e2e", "mixed-direct",
           "mb_per_s"),
    Target("relay_big_rss_mb", "gateway peak RSS relaying the big object (MB)", "relay-big", None,
           "gateway_rss_mb", "<", 150),
    Target("backlog_rss_mb", "gateway peak RSS on the backlog (MB)", "backlog", None, "gateway_rss_mb",
           "<", 150),
    Target("recovery_seconds", "restart on the backlog: process start to READY=1 (s)", "backlog", None,
           "seconds", "<", 10),
    Target("routing_us", "one routing decision, µs (1,000 rules at full size)", "routing", None,
           "us_per_decision"),
)


# ---------------------------------------------------------------------------------------------
# Aggregation


@dataclass(slots=True)
class Row:
    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def count(self) -> int:
        return self.samples[0].count

    @property
    def bytes(self) -> int:
        return self.samples[0].bytes

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    def servers(self) -> dict[str, dict[str, float]]:
        names = dict.fromkeys(name for s in self.samples for name in s.servers)
        def stats(name: str) -> list[ProcessStats]:
            return [s.servers[name] for s in self.samples if name in s.servers]

        return {name: {
            "cpu_seconds": statistics.median(p.cpu_seconds for p in stats(name)),
            "main_thread_cpu_seconds": statistics.median(p.main_thread_cpu_seconds for p in stats(name)),
            "peak_rss_mb": max(p.peak_rss_bytes for p in stats(name)) / MB,
        } for name in names}

    @property
    def foreign_cores(self) -> float:
        return max(s.foreign_cores for s in self.samples)

    def extra(self) -> dict[str, float]:
        keys = dict.fromkeys(k for s in self.samples for k in s.extra)
        return {k: statistics.median(s.extra[k] for s in self.samples if k in s.extra) for k in keys}

    def metric(self, metric: Metric) -> float | None:
        if metric == "gateway_rss_mb":
            return self.servers().get("gateway", {}).get("peak_rss_mb")
        if metric == "us_per_decision":
            return self.extra().get("us_per_decision")
        value: float = getattr(self, metric)
        return value

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.samples[0].unit, "count": self.count, "bytes": self.bytes,
            "repeats": len(self.samples), "median_seconds": self.seconds, "rate_per_second": self.rate,
            "mb_per_second": self.mb_per_s, "servers": self.servers(), "extra": self.extra(),
            "foreign_cpu_cores_max": self.foreign_cores,
            "samples": [{**asdict(s), "servers": {k: asdict(v) for k, v in s.servers.items()}}
                        for s in self.samples],
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    target: Target
    value: float | None  # from the medians
    met: bool | None  # None: no threshold, or not measured
    per_repeat: tuple[float, ...] = ()  # the same ratio within each round of the interleaved repeats

    def to_json(self) -> dict[str, Any]:
        t = self.target
        return {"name": t.name, "description": t.description, "value": self.value,
                "target": None if t.threshold is None else f"{t.op} {t.threshold:g}", "met": self.met,
                "per_repeat": list(self.per_repeat)}


def judge(rows: Mapping[str, Row], targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    verdicts = []
    for target in targets:
        value = _value(rows, target)
        met = None if value is None or target.threshold is None else _holds(value, target)
        verdicts.append(Verdict(target, value, met, _per_repeat(rows, target)))
    return verdicts


def _per_repeat(rows: Mapping[str, Row], target: Target) -> tuple[float, ...]:
    top = rows.get(target.numerator)
    if top is None:
        return ()
    if target.denominator is None:
        return tuple(v for v in (_sample_value(s, target.metric) for s in top.samples) if v is not None)
    bottom = rows.get(target.denominator)
    if bottom is None:
        return ()
    pairs = zip(top.samples, bottom.samples, strict=False)
    values = ((_sample_value(a, target.metric), _sample_value(b, target.metric)) for a, b in pairs)
    return tuple(a / b for a, b in values if a is not None and b)


def _sample_value(sample: Sample, metric: Metric) -> float | None:
    if metric == "gateway_rss_mb":
        gateway = sample.servers.get("gateway")
        return None if gateway is None else gateway.peak_rss_bytes / MB
    if metric == "us_per_decision":
        return sample.extra.get("us_per_decision")
    if metric == "seconds":
        return sample.seconds
    if sample.seconds <= 0:
        return None
    return (sample.count if metric == "rate" else sample.bytes / MB) / sample.seconds


def _value(rows: Mapping[str, Row], target: Target) -> float | None:
    top = rows[target.numerator].metric(target.metric) if target.numerator in rows else None
    if top is None or target.denominator is None:
        return top
    bottom = rows[target.denominator].metric(target.metric) if target.denominator in rows else None
    return top / bottom if bottom else None


def _holds(value: float, target: Target) -> bool:
    assert target.threshold is not None
    if target.op == ">=":
        return value >= target.threshold
    if target.op == "<=":
        return value <= target.threshold
    return value < target.threshold


# ---------------------------------------------------------------------------------------------
# Running


def run(ctx: Context, scenarios: Sequence[Scenario], repeats: int,
        progress: Callable[[str], None]) -> tuple[dict[str, Row], dict[str, str]]:
    """Every scenario ``repeats`` times, interleaved; returns the rows and the scenarios that failed."""
    rows: dict[str, Row] = {}
    failed: dict[str, str] = {}
    for scenario in scenarios:
        if scenario.prepare is not None:
            progress(f"preparing {scenario.name} ...")
            try:
                scenario.prepare(ctx)
            except BenchError as exc:
                failed[scenario.name] = str(exc)
    for repeat in range(repeats):
        for scenario in scenarios:
            if scenario.name in failed:
                continue
            os.sync()  # no scenario pays for the writeback of the previous one's unsynced files
            started = time.perf_counter()
            meter = ForeignLoad()
            try:
                measured = scenario.run(ctx, repeat)
            except BenchError as exc:
                failed[scenario.name] = str(exc)
                progress(f"[{repeat + 1}/{repeats}] {scenario.name}: FAILED: {exc}")
                continue
            foreign = meter.cores()
            for name, sample in measured.items():
                sample.foreign_cores = foreign
                rows.setdefault(name, Row(name)).samples.append(sample)
                progress(f"[{repeat + 1}/{repeats}] {name}: {sample.seconds:.3f} s, "
                         f"{sample.count / sample.seconds:.1f} {sample.unit}/s")
            progress(f"    ({scenario.name} took {time.perf_counter() - started:.1f} s; other "
                     f"processes used {foreign:.2f} CPU cores meanwhile)")
    return rows, failed


class ForeignLoad:
    """CPU time the rest of the machine spent while a scenario ran: all busy CPU time (``/proc/stat``)
    minus the benchmark's own (this process and every child it waited for: servers and clients).
    A benchmark on a machine where other work runs is noise, and this says how much."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy = _machine_busy_seconds()
        self.own = _own_cpu_seconds()

    def cores(self) -> float:
        wall = max(time.perf_counter() - self.started, 1.0)  # /proc/stat counts 10 ms ticks
        foreign = (_machine_busy_seconds() - self.busy) - (_own_cpu_seconds() - self.own)
        return max(foreign, 0.0) / wall


def _machine_busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
        "kernel": platform.release(), "memory_mb": _memory_mb(), "gateway": gateway_version,
        "dcmtk": _version("storescp").strip("$ ").replace("dcmtk: ", "DCMTK "),
        "orthanc": _version("Orthanc"),
        "loadavg_at_start": os.getloadavg()[0],
    }


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (``tmpfs``, ``ext4``...), from /proc/mounts."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


CREATE_PROBE_FILES = 200


def file_create_us(directory: Path) -> float:
    """Median µs to create one file in a fresh folder under ``directory``. On ext4 without a
    journal it grows ~20x after many recent deletes, and the reference (storescp) creates one file
    per image, so it is reported next to the results (docs/performance.md, "file creation")."""
    probe = directory / "create-probe"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir(parents=True)
    times: list[float] = []
    try:
        for index in range(CREATE_PROBE_FILES):
            started = time.perf_counter()
            fd = os.open(probe / f"{index:04d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            times.append(time.perf_counter() - started)
            os.close(fd)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return statistics.median(times) * 1e6


def _memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MB
    except (ValueError, OSError):
        return 0


def _version(name: str) -> str:
    """The first line ``name --version`` prints, or "unavailable" (the tool may not be installed:
    only the scenarios that need it fail)."""
    try:
        result = subprocess.run([tool(name), "--version"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, BenchError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else ""


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass(frozen=True, slots=True)
class Report:
    rows: Mapping[str, Row]
    verdicts: Sequence[Verdict]
    failed: Mapping[str, str]
    machine: Mapping[str, Any]
    profile: Profile
    repeats: int
    scenarios: Sequence[str]


def markdown(report: Report) -> str:
    rows, info, profile = report.rows, report.machine, report.profile
    out = [f"## dicom-gateway benchmark ({profile.name}: {profile.us_images} US images, "
           f"median of {report.repeats})", "",
           f"{info['nproc']} CPU ({info['cpu_model']}), Python {info['python']}, {info['dcmtk']}, "
           f"{info['orthanc']}; creating a file took {info.get('file_create_us_at_start', 0):.0f} µs "
           f"at the start and {info.get('file_create_us_at_end', 0):.0f} µs at the end (it sets the "
           "pace of the storescp rows on some disks: docs/performance.md); storescp wrote into "
           f"{info.get('receivers', 'the working folder')}", "",
           "| row | n | median s | rate | MB/s | gateway CPU s (event loop) | gateway peak RSS MB "
           "| other servers (CPU s / peak RSS MB) | other load |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows.values():
        servers = row.servers()
        gateway = servers.pop("gateway", None)
        others = ", ".join(f"{name} {s['cpu_seconds']:.2f} / {s['peak_rss_mb']:.0f}"
                           for name, s in servers.items())
        rate = f"{row.rate:,.1f} {row.samples[0].unit}/s"
        out.append(f"| {row.name} | {row.count} | {row.seconds:.3f} | {rate} "
                   f"| {row.mb_per_s:,.1f} | {_cpu(gateway)} "
                   f"| {_num(gateway, 'peak_rss_mb', 0)} | {others or '-'} | {row.foreign_cores:.2f} |")
    out += ["", "| ratio / measure | value (of medians) | per repeat | target | met |",
            "|---|---:|---|---|---|"]
    for v in report.verdicts:
        value = "not measured" if v.value is None else f"{v.value:,.2f}"
        rounds = ", ".join(f"{x:,.2f}" for x in v.per_repeat) or "-"
        target = "-" if v.target.threshold is None else f"{v.target.op} {v.target.threshold:g}"
        met = {True: "met", False: "**NOT MET**", None: "-"}[v.met]
        out.append(f"| {v.target.description} | {value} | {rounds} | {target} | {met} |")
    extras = [f"- {row.name}: " + ", ".join(f"{k} {x:,.3g}" for k, x in row.extra().items())
              for row in rows.values() if row.extra()]
    if extras:
        out += ["", *extras]
    noisy = [row.name for row in rows.values() if row.foreign_cores > NOISY_CORES]
    if noisy:
        out += ["", f"**Noisy:** other processes used more than {NOISY_CORES} CPU cores during "
                    f"{', '.join(noisy)} (column 'other load'): rerun on a quiet machine."]
    if report.failed:
        out += ["", "Failed scenarios:"]
        out += [f"- {name}: {error.splitlines()[0]}" for name, error in report.failed.items()]
    return "\n".join(out) + "\n"


def _cpu(values: Mapping[str, float] | None) -> str:
    if values is None:
        return "-"
    return f"{values['cpu_seconds']:.2f} ({values['main_thread_cpu_seconds']:.2f})"


def _num(values: Mapping[str, float] | None, key: str, digits: int) -> str:
    return "-" if values is None else f"{values[key]:.{digits}f}"


def results_json(report: Report) -> dict[str, Any]:
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "profile": asdict(report.profile), "repeats": report.repeats,
        "scenarios": list(report.scenarios), "machine": dict(report.machine),
        "rows": {name: row.to_json() for name, row in report.rows.items()},
        "ratios": [v.to_json() for v in report.verdicts], "failed": dict(report.failed),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller corpus, one repeat (a few minutes)")
    size.add_argument("--smoke", action="store_true",
                      help="a handful of images, one repeat, reference+ingest+e2e+routing (the test suite)")
    parser.add_argument("--scenarios", default="",
                        help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=0, help="repeats per scenario (median of N)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out",
                        help="corpus, working folders and results.json (default bench/out)")
    parser.add_argument("--seed", type=int, default=20240601, help="corpus seed")
    parser.add_argument("--keep", action="store_true", help="keep the working folders (logs, spools)")
    parser.add_argument("--receivers", type=Path, default=None, metavar="DIR",
                        help="storescp writes what it receives under DIR (e.g. /dev/shm, a tmpfs) "
                             "instead of the working folder on the disk under test; the gateway's "
                             "spool stays on that disk")
    parser.add_argument("--profile", action="store_true",
                        help="sample the gateway with py-spy during the first repeat of each of its rows")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> tuple[Profile, list[Scenario], int]:
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()] or list(
        SMOKE if args.smoke else DEFAULT)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return profile, [SCENARIOS[n] for n in names], args.repeats or profile.repeats


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:12} {', '.join(scenario.rows):28} {scenario.description}")
        return 0
    profile, scenarios, repeats = select(args)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    profiler = _profiler(out) if args.profile else None
    receivers: Path | None = args.receivers.resolve() if args.receivers is not None else None
    ctx = Context(out, profile, seed=args.seed, keep=args.keep, profiler=profiler, receivers=receivers)
    info = machine()
    info["receivers"] = ("each repeat's working folder" if receivers is None
                         else f"{receivers} ({filesystem_type(receivers)})")
    info["file_create_us_at_start"] = file_create_us(out)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        rows, failed = run(ctx, scenarios, repeats, progress)
    finally:
        info["file_create_us_at_end"] = file_create_us(out)
        if not args.keep:
            shutil.rmtree(out / "work", ignore_errors=True)  # spools, received files: GBs
    report = Report(rows, judge(rows), failed, info, profile, repeats, [s.name for s in scenarios])
    document = results_json(report)
    document["wall_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(document, indent=2))
    print(markdown(report))
    progress(f"results: {out / 'results.json'} ({document['wall_seconds']:.0f} s)")
    return 1 if failed else 0


def _profiler(out: Path) -> Callable[[Server, str], Any]:
    if not profiling.available():
        raise SystemExit("--profile needs py-spy: pip install py-spy")

    def attach(server: Server, row: str) -> Any:
        return profiling.py_spy(server, out / "profiles", row)

    return attach
