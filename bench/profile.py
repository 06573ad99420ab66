"""Sampling profiles of the gateway process during a scenario (``python -m bench --profile``).

``py-spy record --pid`` (``pip install py-spy``) attaches to the running gateway once it is ready,
samples it while the scenario runs (on-CPU samples only, without pausing it), and writes collapsed
stacks; ``summarize`` turns them into the functions that cost the most CPU, by self time and
inclusive time, which is what ``docs/performance.md`` reports.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.servers import BenchError, Server

_LINE = re.compile(r":\d+\)$")
ATTACH_TIMEOUT = 15.0


def available() -> bool:
    return shutil.which("py-spy") is not None


@contextlib.contextmanager
def py_spy(server: Server, out_dir: Path, row: str, rate: int = 250) -> Iterator[None]:
    """Sample ``server`` while the block runs; writes ``profile-<row>.txt`` and its summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"profile-{row}.txt"
    log = out_dir / f"py-spy-{row}.log"
    argv = ["py-spy", "record", "--pid", str(server.pid), "--rate", str(rate), "--format", "raw",
            "--nonblocking", "--output", str(raw)]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_attached(process, log)
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    if raw.exists():
        (out_dir / f"profile-{row}-summary.txt").write_text(summarize(raw))


def _wait_attached(process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while b"Sampling process" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"py-spy did not attach:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)  # waiting for a foreign process's first output line, bounded


def summarize(raw: Path, top: int = 25) -> str:
    """Top functions by self and inclusive share of the on-CPU samples in a collapsed-stack file."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} on-CPU samples", "", "self time:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)] if total else []
    lines += ["", "inclusive time:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)] if total else []
    return "\n".join(lines) + "\n"
