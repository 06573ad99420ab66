"""kill -9 of the gateway process while DCMTK sends: nothing acknowledged is lost.

The gateway runs as ``dicom-gateway serve`` (``GatewayProcess``). storescu sends 200 small images;
its ``-v`` output says which were acknowledged (``Sending file: X`` ... ``Received Store Response
(Success)``). After a seeded number of acknowledgements (and, seeded too, either right after an
acknowledgement or right after the next request went out) the gateway gets SIGKILL; a fresh process
on the same spool and config takes the images not acknowledged yet, and is killed in turn (three
rounds, so that some kills land in the middle of a reception). The last restart must hold every
acknowledged image, byte for byte, with the journal and the object files in agreement and no partial
file left in ``<spool>/tmp``. ``CRASH_TEST_SEED=n`` explores other kill points.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from gateway_harness import GatewayProcess, write_config
from peers import (
    dataset_bytes,
    free_port,
    make_us_image,
    peer_env,
    require_tool,
    run_echoscu,
)

from gateway.journal import HeldItem
from gateway.spool import Spool

HOST = "127.0.0.1"
GATEWAY_AE = "DICOMGW"
IMAGES = 200
SEED = int(os.environ.get("CRASH_TEST_SEED", "20240607"))  # override to explore
ROUNDS = 3
SEND_TIMEOUT = 120.0
ROWS, COLS = 128, 170  # 128 x 170 x 3 bytes: ~64 KiB of pixel data each

SENDING = re.compile(r"Sending file: (\S+)")
ACKNOWLEDGED = re.compile(r"Received Store Response \(Success\)")
REQUESTED = re.compile(r"Sending Store Request")


def send_and_kill(storescu: str, port: int, files: list[Path], gateway: GatewayProcess,
                  *, kill_after: int, mid_request: bool) -> tuple[list[Path], str]:
    """Run storescu on ``files``; SIGKILL the gateway after ``kill_after`` acknowledgements (right
    away, or once the next request went out). Returns the acknowledged files and the output."""
    process = subprocess.Popen(
        [storescu, "-v", "-to", "5", "-ta", "10", "-td", "10", "-aec", GATEWAY_AE, HOST, str(port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_env(),
        stdin=subprocess.DEVNULL)
    watchdog = threading.Timer(SEND_TIMEOUT, process.kill)  # a bound, never a wait for state
    watchdog.start()
    acknowledged: list[Path] = []
    current: Path | None = None
    lines: list[str] = []
    killed = False
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if match := SENDING.search(line):
                current = Path(match.group(1))
            elif ACKNOWLEDGED.search(line):
                assert current is not None
                acknowledged.append(current)
                current = None
            reached = len(acknowledged) >= kill_after
            if not killed and reached and (not mid_request or REQUESTED.search(line)):
                gateway.kill()
                killed = True
        process.wait(SEND_TIMEOUT)
    finally:
        watchdog.cancel()
        process.kill()
    output = "".join(lines)
    assert killed, f"the gateway was never killed (kill_after {kill_after}):\n{output[-3000:]}"
    return acknowledged, output


async def journal_view(spool_dir: Path) -> list[HeldItem]:
    spool = Spool(spool_dir)
    await spool.open_readonly()
    try:
        return await spool.held_items(10_000)
    finally:
        await spool.close()


@pytest.mark.peer
def test_kill_9_mid_transfer_loses_no_acknowledged_image(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    rng = random.Random(SEED)
    files = [tmp_path / "images" / f"img-{i:03d}.dcm" for i in range(IMAGES)]
    uid_of = {path: make_us_image(path, seed=i, rows=ROWS, cols=COLS).SOPInstanceUID
              for i, path in enumerate(files)}
    original = {uid_of[path]: dataset_bytes(path) for path in files}
    spool_dir = tmp_path / "spool"
    (tmp_path / "rules").mkdir()  # no rules: everything is held, so nothing leaves the spool
    port = free_port()
    config = write_config(tmp_path / "gateway.yaml", {
        "ae_title": GATEWAY_AE, "host": HOST, "port": port, "http_port": free_port(),
        "spool_dir": str(spool_dir), "rules_dir": str(tmp_path / "rules"), "log_level": "INFO",
    })

    acknowledged: list[Path] = []
    for round_ in range(ROUNDS):  # each round sends what is not acknowledged yet, then kills
        remaining = [path for path in files if path not in acknowledged]
        kill_after = rng.randrange(10, len(remaining) // 2)
        gateway = GatewayProcess(config, tmp_path / f"gateway-{round_}.log").start()
        try:
            acked, output = send_and_kill(storescu, port, remaining, gateway, kill_after=kill_after,
                                          mid_request=rng.random() < 0.5)
        finally:
            gateway.kill()
        assert kill_after <= len(acked) < len(remaining), output[-3000:]
        assert acked == remaining[: len(acked)]  # storescu sends in order, one at a time
        acknowledged += acked
        partial = [p.name for p in (spool_dir / "tmp").iterdir()]  # the reception cut short
        assert len(partial) <= 1, partial

    restarted = GatewayProcess(config, tmp_path / "gateway-last.log").start()
    try:
        assert [p.name for p in (spool_dir / "tmp").iterdir()] == []  # swept at start-up
        echo = run_echoscu(port, called_ae=GATEWAY_AE)
        assert echo.returncode == 0, echo.stderr  # and it serves again
    finally:
        assert restarted.terminate() == 0, restarted.log_tail()

    items = asyncio.run(journal_view(spool_dir))
    stored = {item.sop_instance_uid for item in items}
    for path in acknowledged:
        assert uid_of[path] in stored, f"acknowledged {path.name} is missing after the crashes"
    # per kill, at most the image in flight was committed without its acknowledgement arriving
    # (it was sent again in the next round: a duplicate, never a loss)
    assert len(acknowledged) <= len(items) <= len(acknowledged) + ROUNDS
    assert stored <= set(original)
    for item in items:
        data = item.path.read_bytes()
        assert len(data) == item.size
        assert data[item.dataset_offset:] == original[item.sop_instance_uid], f"{item.path} damaged"

    object_files = {p for p in (spool_dir / "objects").rglob("*") if p.is_file()}
    assert object_files == {item.path for item in items}  # no orphan, no missing file
    assert [p.name for p in (spool_dir / "tmp").iterdir()] == []
    with sqlite3.connect(f"file:{spool_dir / 'journal.sqlite3'}?mode=ro", uri=True) as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
    assert states == {"held": len(items)}  # nothing marked lost
