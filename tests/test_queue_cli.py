"""``dicom-gateway queue list/retry/purge/reroute`` against the spool of a running gateway.

The gateway runs in a thread (``GatewayThread``); the commands run through ``gateway.cli.main`` in
the test thread, with their own journal connection, as they would from another process. Two DCMTK
storescp accept uncompressed syntaxes only, so a JPEG image becomes a dead letter at both; images
from an AE no rule knows are held. At the end the journal passes SQLite's integrity check.
"""

from __future__ import annotations

import collections
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import GATEWAY_AE, GatewayThread, destination_config, gateway_config
from peers import Peers, StoreSCP, make_us_images, run_dcmsend, run_storescu, sop_instance_uids

from gateway import cli, forwarder
from gateway.settings import load_settings
from gateway.spool import JOURNAL_NAME

WAIT = 60.0

ROOM3_ONLY = """
rules:
  - name: room3
    match: {calling_ae: US_ROOM3}
    destinations: [PACS_TEST, PACS_PROD]
"""

ROOM9_TOO = (
    ROOM3_ONLY
    + """
  - name: room9
    match: {calling_ae: US_ROOM9}
    destinations: [PACS_PROD]
"""
)


@pytest.fixture(autouse=True)
def fast_rescan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forwarders pick up what the CLI did at their next journal rescan: make it soon."""
    monkeypatch.setattr(forwarder, "RESCAN", 0.2)


class Queue:
    """``dicom-gateway queue ...`` with one config; returns (exit code, stdout, stderr)."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main(["queue", *args, "--config", str(self.config)])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def json(self, *args: str) -> dict[str, Any]:
        code, out, err = self("list", "--json", *args)
        assert code == 0, err
        result: dict[str, Any] = json.loads(out)
        return result


def write_gateway_config(tmp_path: Path, test_port: int, prod_port: int) -> Path:
    return gateway_config(tmp_path, {"PACS_TEST": destination_config(test_port, "TESTPACS"),
                                     "PACS_PROD": destination_config(prod_port, "PRODPACS")},
                          ROOM3_ONLY)






def table(listing: str) -> dict[str, tuple[int, int]]:
    """``queue list`` text -> destination: (pending, dead)."""
    rows = {}
    for line in listing.splitlines()[1:]:
        if line.startswith("held") or not line.strip():
            break
        name, pending, dead, _ = line.split(maxsplit=3)
        rows[name] = (int(pending), int(dead))
    return rows


def integrity(spool_dir: Path) -> str:
    with sqlite3.connect(f"file:{spool_dir / JOURNAL_NAME}?mode=ro", uri=True, timeout=10) as db:
        (result,) = db.execute("PRAGMA integrity_check").fetchone()
    return str(result)


@pytest.mark.peer
def test_queue_commands_beside_a_running_gateway(
    tmp_path: Path, peers: Peers, sample_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    room3 = make_us_images(tmp_path / "room3", 2, first_seed=1)
    room9 = make_us_images(tmp_path / "room9", 2, first_seed=50)
    jpeg = sample_files["jpeg_baseline"]
    with (
        StoreSCP(tmp_path / "test-plain", ae_title="TESTPACS", syntaxes="+x=") as test_plain,
        StoreSCP(tmp_path / "prod", ae_title="PRODPACS", syntaxes="+x=") as prod_pacs,
    ):
        config = write_gateway_config(tmp_path, test_plain.port, prod_pacs.port)
        settings = load_settings(config)
        queue = Queue(config, capsys)
        with GatewayThread(settings) as gw:
            assert run_storescu(gw.port, room3, calling_ae="US_ROOM3", called_ae=GATEWAY_AE).returncode == 0
            assert run_dcmsend(gw.port, [jpeg], calling_ae="US_ROOM3", called_ae=GATEWAY_AE).returncode == 0
            assert run_storescu(gw.port, room9, calling_ae="US_ROOM9", called_ae=GATEWAY_AE).returncode == 0
            gw.wait_for(
                lambda g: (
                    g.delivered("PACS_TEST") >= 2
                    and g.delivered("PACS_PROD") >= 2
                    and g.dead["PACS_TEST"] >= 1
                    and g.dead["PACS_PROD"] >= 1
                ),
                WAIT,
            )

            # list: counts per destination, held instances
            code, out, _ = queue("list")
            assert code == 0
            assert table(out) == {"PACS_TEST": (0, 1), "PACS_PROD": (0, 1)}
            assert "held (no rule matched): 2" in out

            # list --dead: one line per dead delivery, with the reason
            code, out, _ = queue("list", "--dead")
            dead_lines = [line for line in out.splitlines() if line.startswith("#")]
            assert code == 0 and len(dead_lines) == 2
            assert {line.split()[1] for line in dead_lines} == {"PACS_TEST", "PACS_PROD"}
            for line in dead_lines:
                assert " dead attempts=1 " in line
                assert "'JPEG Baseline (Process 1)' (1.2.840.10008.1.2.4.50)" in line

            # list --held: the instances no rule routed
            held = queue.json("--held")
            assert held["held"] == 2
            assert {item["state"] for item in held["items"]} == {"held"}
            assert {item["calling_ae"] for item in held["items"]} == {"US_ROOM9"}
            held_uids = collections.Counter(item["sop_instance_uid"] for item in held["items"])
            assert held_uids == sop_instance_uids(room9)

            # purge refuses without --yes, then deletes for good
            code, out, err = queue("purge", "PACS_PROD")
            assert code == 1 and "--yes" in err and out == ""
            assert len(queue.json("--dead", "--destination", "PACS_PROD")["items"]) == 1
            code, out, _ = queue("purge", "PACS_PROD", "--yes")
            assert (code, out.strip()) == (0, "purged 1 dead-lettered deliveries")
            assert [i["destination"] for i in queue.json("--dead")["items"]] == ["PACS_TEST"]

            # retry after the PACS was fixed: delivered
            test_plain.stop()
            test_pacs = peers.store_scp(ae_title="TESTPACS", port=test_plain.port, fork=True)
            code, out, _ = queue("retry", "PACS_TEST")
            assert (code, out.strip()) == (0, "re-queued 1 dead-lettered deliveries")
            gw.wait_for(lambda g: g.delivered("PACS_TEST") >= 3, WAIT)
            assert queue.json("--dead")["items"] == []
            assert integrity(settings.spool_dir) == "ok"

            # reroute: nothing changes until a rule routes the held instances
            code, out, _ = queue("reroute")
            assert (code, out.strip()) == (0, "rerouted 0 held instances; 2 still held; 0 unreadable")
            (settings.rules_dir / "10-test.yaml").write_text(ROOM9_TOO, encoding="utf-8")
            code, out, _ = queue("reroute")
            assert (code, out.strip()) == (0, "rerouted 2 held instances; 0 still held; 0 unreadable")
            gw.wait_for(lambda g: g.delivered("PACS_PROD") >= 4, WAIT)
            final = queue.json()
        prod_received = prod_pacs.received_files()

    assert final["held"] == 0
    assert all(counts["pending"] == 0 and counts["dead"] == 0 for counts in final["destinations"].values())
    assert dict(gw.attempts) == {
        ("PACS_TEST", "delivered"): 3,
        ("PACS_TEST", "permanent"): 1,
        ("PACS_PROD", "delivered"): 4,
        ("PACS_PROD", "permanent"): 1,
    }
    assert sop_instance_uids(test_pacs.received_files()) == sop_instance_uids([jpeg])
    assert sop_instance_uids(prod_received) == sop_instance_uids([*room3, *room9])
    assert integrity(settings.spool_dir) == "ok"
    assert sorted((settings.spool_dir / "objects").rglob("*.dcm")) == [], "every object was finished"


def test_queue_commands_name_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_gateway_config(tmp_path, 1, 2)
    queue = Queue(config, capsys)

    code, _, err = queue("list")
    assert code == 1 and "no spool journal" in err and "spool_dir" in err
    code, _, err = queue("retry", "PACS_TSET")
    assert code == 2 and "no destination named 'PACS_TSET'" in err
    code, _, err = queue("purge", "PACS_TSET", "--yes")
    assert code == 2 and "no destination named 'PACS_TSET'" in err
