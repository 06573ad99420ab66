"""The benchmark must not rot: its smoke mode runs inside the test suite.

``python -m bench --smoke`` (a handful of images, one repeat: reference, ingest, end to end, routing)
starts real DCMTK servers and a real gateway process. These tests check that every scenario
completes with positive rates and that results.json has the shape the docs promise; they never
assert timing thresholds (a loaded CI machine is not a benchmark machine).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from peers import require_tool
from pydicom import dcmread

from bench import runner
from bench.ab import main as ab_main
from bench.corpus import CT, US, CorpusPlan, build_corpus, write_object
from bench.runner import Row, Target, judge, main
from bench.scenarios import Sample
from bench.servers import REPO_ROOT, BenchError, ProcessStats

SMOKE_ROWS = {"reference", "ingest", "e2e", "routing"}


@pytest.mark.peer
def test_smoke_run_measures_every_scenario_and_writes_results(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("storescp", "storescu", "echoscu"):
        require_tool(name)

    assert main(["--smoke", "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "profile", "repeats", "rows", "ratios", "failed"} <= set(results)
    assert results["failed"] == {}
    assert results["machine"]["file_create_us_at_start"] > 0
    assert results["machine"]["file_create_us_at_end"] > 0
    assert set(results["rows"]) == SMOKE_ROWS
    for name, row in results["rows"].items():
        assert row["count"] > 0, name
        assert row["median_seconds"] > 0, name
        assert row["rate_per_second"] > 0, name
        assert len(row["samples"]) == 1, name
    for name in ("ingest", "e2e"):
        gateway = results["rows"][name]["servers"]["gateway"]
        assert gateway["peak_rss_mb"] > 10, name
        assert gateway["cpu_seconds"] >= 0, name
    assert results["rows"]["e2e"]["servers"]["storescp"]["peak_rss_mb"] > 0
    assert results["rows"]["routing"]["extra"]["us_per_decision"] > 0
    for name in ("reference", "ingest", "e2e"):  # storescu's own CPU, for the CPU budget of a row
        assert results["rows"][name]["extra"]["client_cpu_seconds"] > 0, name
    ratios = {r["name"]: r for r in results["ratios"]}
    for name in ("e2e_vs_direct", "ingest_vs_direct"):
        assert ratios[name]["value"] > 0
        assert ratios[name]["met"] in (True, False)
    assert ratios["e2e_vs_orthanc"]["value"] is None  # not run in smoke mode: reported as such
    report = capsys.readouterr().out
    assert "| e2e |" in report and "end to end / direct DCMTK hop" in report


@pytest.mark.peer
def test_the_receivers_can_write_outside_the_disk_under_test(tmp_path: Path) -> None:
    """``--receivers DIR``: every storescp writes under DIR, the gateway's spool stays in the
    working folder, and the report says where the receivers wrote."""
    for name in ("storescp", "storescu", "echoscu"):
        require_tool(name)
    out, receivers = tmp_path / "out", tmp_path / "receivers"

    assert main(["--smoke", "--scenarios", "reference,e2e,fanout", "--keep", "--out", str(out),
                 "--receivers", str(receivers)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == {}
    assert results["machine"]["receivers"].startswith(str(receivers))
    images = results["rows"]["e2e"]["count"]
    for folder in ("reference-r0/received", "e2e-r0/received", "fanout-r0/a", "fanout-r0/b"):
        assert len(list((receivers / folder).iterdir())) == images, folder
    assert not (out / "work" / "e2e-r0" / "received").exists()
    assert (out / "work" / "e2e-r0" / "gateway" / "spool").is_dir()


def test_the_filesystem_of_a_path_is_found_in_the_mount_table() -> None:
    assert runner.filesystem_type(Path("/proc/self")) == "proc"
    assert runner.filesystem_type(Path("/")) != "unknown"


@pytest.mark.peer
def test_the_orthanc_rows_run_in_smoke_mode_and_feed_their_ratios(tmp_path: Path) -> None:
    for name in ("storescp", "storescu", "echoscu", "Orthanc"):
        require_tool(name)

    assert main(["--smoke", "--scenarios", "ingest,durable-peer,e2e,peer",
                 "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed"] == {}
    for name in ("orthanc-ingest", "orthanc"):
        row = results["rows"][name]
        assert row["rate_per_second"] > 0, name
        assert row["servers"]["orthanc"]["peak_rss_mb"] > 0, name
    ratios = {r["name"]: r for r in results["ratios"]}
    assert ratios["ingest_vs_durable_peer"]["value"] > 0
    assert ratios["ingest_vs_durable_peer"]["met"] is None  # reported, no target
    assert ratios["e2e_vs_orthanc"]["value"] > 0


@pytest.mark.peer
def test_the_ab_tool_compares_two_checkouts_round_by_round(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("storescp", "storescu", "echoscu"):
        require_tool(name)
    repo = str(REPO_ROOT)

    receivers = tmp_path / "receivers"
    assert ab_main([repo, repo, "--rows", "ingest,e2e", "--rounds", "2", "--profile", "smoke",
                    "--out", str(tmp_path), "--receivers", str(receivers)]) == 0

    report = capsys.readouterr().out
    assert "direct DCMTK hop in the same rounds" in report
    assert f"storescp wrote into {receivers}" in report
    assert receivers.is_dir() and not any(receivers.iterdir())  # each round's folder removed
    for row in ("ingest", "e2e"):
        (line,) = [line for line in report.splitlines() if line.startswith(f"| {row} |")]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[3]) > 0
        assert len(cells[4].split(", ")) == 2  # one B / A per round
    assert not (tmp_path / "work").exists()  # working folders removed


def test_the_ab_tool_refuses_what_is_not_a_checkout(tmp_path: Path) -> None:
    assert ab_main([str(tmp_path), str(REPO_ROOT), "--rounds", "1"]) == 2
    assert ab_main([str(REPO_ROOT), str(REPO_ROOT), "--rows", "nonsense"]) == 2


def test_corpus_is_reproducible_and_valid(tmp_path: Path) -> None:
    plan = CorpusPlan(seed=7, us_images=2, cine_loops=1, cine_frames=2, ct_slices=1)
    first = build_corpus(tmp_path / "a", plan)
    second = build_corpus(tmp_path / "b", plan)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (*first.us, *first.cine, *first.ct)]
    again = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (*second.us, *second.cine, *second.ct)]
    assert digest == again and len(set(digest)) == 4
    cine = dcmread(first.cine[0])
    assert cine.NumberOfFrames == 2
    assert len(cine.PixelData) == 2 * US.frame_bytes
    assert dcmread(first.ct[0]).pixel_array.shape == (512, 512)
    other_seed = build_corpus(tmp_path / "c", CorpusPlan(seed=8, us_images=1, cine_loops=0, ct_slices=0))
    assert dcmread(other_seed.us[0]).SOPInstanceUID != dcmread(first.us[0]).SOPInstanceUID


def test_streamed_object_has_the_declared_length(tmp_path: Path) -> None:
    size = write_object(tmp_path / "ct.dcm", CT, seed=1, index=0, frames=3)
    assert size == (tmp_path / "ct.dcm").stat().st_size
    assert len(dcmread(tmp_path / "ct.dcm").PixelData) == 3 * CT.frame_bytes


def _row(name: str, seconds: float, count: int = 100, rss: int = 0) -> Row:
    servers = {"gateway": ProcessStats(1.0, rss)} if rss else {}
    return Row(name, [Sample(seconds, count, "images", 1000, servers)])


def test_ratios_are_judged_against_their_targets() -> None:
    measured = (_row("reference", 1.0), _row("e2e", 2.5), _row("relay-big", 9.0, 1, 200 * 10**6))
    rows = {r.name: r for r in measured}
    targets = (
        Target("half", "", "e2e", "reference", "rate", ">=", 0.5),
        Target("time", "", "e2e", "reference", "seconds", "<=", 1.5),
        Target("rss", "", "relay-big", None, "gateway_rss_mb", "<", 150),
        Target("info", "", "e2e", "reference", "rate"),
        Target("missing", "", "orthanc", "e2e", "rate", ">=", 2.5),
    )
    verdicts = {v.target.name: v for v in judge(rows, targets)}
    assert verdicts["half"].value == pytest.approx(0.4) and verdicts["half"].met is False
    assert verdicts["time"].value == pytest.approx(2.5) and verdicts["time"].met is False
    assert verdicts["rss"].value == pytest.approx(200) and verdicts["rss"].met is False
    assert verdicts["info"].met is None
    assert verdicts["missing"].value is None and verdicts["missing"].met is None


def test_the_machine_report_survives_a_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_orthanc(name: str) -> str:
        if name == "Orthanc":
            raise BenchError("Orthanc missing: install Debian package orthanc")
        return "/bin/echo"

    monkeypatch.setattr(runner, "tool", no_orthanc)
    info = runner.machine()
    assert info["orthanc"] == "unavailable" and info["dcmtk"] != "unavailable"
