"""``rules check``, ``rules test`` and ``rules schema`` through a small argparse front end."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pydicom.data
import pytest

from gateway.cli_rules import add_rules_commands
from gateway.rules import rules_schema

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"  # bundled with pydicom: offline
CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"

CONFIG = """\
rules_dir: rules
destinations:
  PACS_TEST: {ae_title: PACS_TEST, host: 127.0.0.1, port: 11113}
  PACS_PROD: {ae_title: PACS_PROD, host: 127.0.0.1, port: 11114}
"""

RULES = """\
rules:
  - name: us-demo-to-test
    match: {calling_ae: US_DEMO}
    destinations: [PACS_TEST]
    stop: true
  - name: ct-to-prod
    match: {Modality: CT}
    destinations: [PACS_PROD]
"""


@pytest.fixture(autouse=True)
def _no_gateway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DICOMGW_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10-rules.yaml").write_text(RULES, encoding="utf-8")
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dicom-gateway")
    add_rules_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_check_valid_rules(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, "rules", "check", "--config", config)
    assert code == 0
    assert out.strip() == (
        f"{config.parent / 'rules'}: OK, 2 rule(s) in 1 file(s); "
        "destinations used: PACS_TEST, PACS_PROD"
    )
    assert err == ""


def test_check_reports_every_problem_with_file_and_line(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "10-a.yaml").write_text(
        "rules:\n  - name: a\n    match: {Modality: NO}\n    destinations: [PACS_TST]\n"
    )
    (other / "20-b.yaml").write_text("rules:\n  - name: a\n    destinations: PACS_PROD\n")
    code, out, err = run(capsys, "rules", "check", "--config", config, "--rules", other)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: {other / '10-a.yaml'}:3:")
    assert "rules[0].match.Modality" in lines[0] and "quote it" in lines[0]
    assert lines[1].startswith(f"error: {other / '10-a.yaml'}:4:") and "PACS_TST" in lines[1]
    assert lines[2].startswith(f"error: {other / '20-b.yaml'}:2:") and "duplicate rule name" in lines[2]
    assert lines[3].startswith(f"error: {other / '20-b.yaml'}:3:") and "must be a list" in lines[3]
    assert lines[4] == f"{other}: 4 problem(s); nothing loaded"


def test_check_warns_about_an_empty_rules_directory(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "rules", "check", "--config", config, "--rules", empty)
    assert code == 0
    assert "0 rule(s) in 0 file(s); destinations used: none" in out
    assert "warning: there are no rules: every instance will be held" in err


def test_check_exits_2_on_a_bad_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: not-a-port\n")
    code, _, err = run(capsys, "rules", "check", "--config", bad)
    assert code == 2 and "port" in err
    code, _, err = run(capsys, "rules", "check", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "cannot read config file" in err


def test_check_without_a_config_uses_the_defaults(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10.yaml").write_text(RULES)
    code, _, err = run(capsys, "rules", "check")
    assert code == 1  # the default settings have no destinations: naming one is an error
    assert "no destinations are configured" in err


def test_check_follows_dicomgw_config(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOMGW_CONFIG", str(config))
    code, out, _ = run(capsys, "rules", "check")
    assert code == 0 and "2 rule(s)" in out


def test_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "schema")
    assert code == 0 and json.loads(out) == rules_schema()


def test_test_explains_each_file(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "rules", "test", "--config", config, CT, MR)
    assert code == 0
    assert out.splitlines() == [
        "as if sent by calling_ae='' to called_ae='DICOMGW' from source_ip='127.0.0.1'",
        f"{CT}: PACS_PROD",
        "  - us-demo-to-test: calling_ae is '', expected 'US_DEMO'",
        "  + ct-to-prod: matched",
        f"{MR}: held (no rule sends it anywhere)",
        "  - us-demo-to-test: calling_ae is '', expected 'US_DEMO'",
        "  - ct-to-prod: Modality is 'MR', expected 'CT'",
    ]


def test_test_with_peer_options_and_stop(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(
        capsys, "rules", "test", "--config", config, "--calling-ae", "US_DEMO",
        "--called-ae", "GW_TEST", "--source-ip", "10.1.2.3", CT,
    )
    assert code == 0
    assert out.splitlines() == [
        "as if sent by calling_ae='US_DEMO' to called_ae='GW_TEST' from source_ip='10.1.2.3'",
        f"{CT}: PACS_TEST",
        "  + us-demo-to-test: matched, stop",
        "  ~ ct-to-prod: matches, but 'us-demo-to-test' stopped evaluation before it",
    ]


def test_test_json(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all\n")
    code, out, _ = run(capsys, "rules", "test", "--config", config, "--json", CT, MR, text)
    assert code == 0
    results: list[dict[str, Any]] = json.loads(out)
    assert [r["file"] for r in results] == [str(CT), str(MR), str(text)]
    ct, mr, notes = results
    assert ct["destinations"] == ["PACS_PROD"] and ct["matched"] == ["ct-to-prod"] and not ct["held"]
    assert ct["rules"][0] == {
        "rule": "us-demo-to-test",
        "stop": True,
        "matched": False,
        "applied": False,
        "why_not": "calling_ae is '', expected 'US_DEMO'",
        "stopped_by": None,
    }
    assert mr["destinations"] == [] and mr["held"] and mr["matched"] == []
    assert mr["rules"][1]["why_not"] == "Modality is 'MR', expected 'CT'"
    assert "not a DICOM instance" in notes["error"] and "destinations" not in notes


def test_test_walks_folders_recursively_in_order(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "incoming"
    (folder / "b").mkdir(parents=True)
    shutil.copy(MR, folder / "b" / "mr.dcm")
    shutil.copy(CT, folder / "a.dcm")
    (folder / "b" / "truncated.dcm").write_bytes(CT.read_bytes()[:300])
    # a Part-10 header whose first element is cut short: pydicom raises while reading it
    (folder / "c.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x01")
    code, out, _ = run(capsys, "rules", "test", "--config", config, "--json", folder)
    assert code == 0
    results = json.loads(out)
    assert [Path(r["file"]).relative_to(folder).as_posix() for r in results] == [
        "a.dcm", "b/mr.dcm", "b/truncated.dcm", "c.dcm"
    ]
    assert results[0]["destinations"] == ["PACS_PROD"]
    assert results[1]["held"] is True
    assert "not a DICOM instance" in results[2]["error"]
    assert results[3]["error"].startswith("skipped: cannot read as DICOM")


def test_test_survives_every_bundled_pydicom_file(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, _ = run(capsys, "rules", "test", "--config", config, "--json", TEST_FILES)
    assert code == 0
    results = json.loads(out)
    assert len(results) > 50
    routed = [r for r in results if "destinations" in r]
    skipped = [r for r in results if "error" in r]
    assert len(routed) + len(skipped) == len(results)
    assert any(Path(r["file"]).name == "README.txt" for r in skipped)
    ct = next(r for r in routed if Path(r["file"]).name == "CT_small.dcm")
    assert ct["destinations"] == ["PACS_PROD"]


def test_test_a_missing_path_exits_1(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "rules", "test", "--config", config, CT, config.parent / "nope")
    assert code == 1
    assert f"{config.parent / 'nope'}: no such file or folder" in out
    assert f"{CT}: PACS_PROD" in out


def test_test_with_invalid_rules_exits_1(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    (config.parent / "rules" / "20-bad.yaml").write_text("rules:\n  - name: x\n")
    code, out, err = run(capsys, "rules", "test", "--config", config, CT)
    assert code == 1 and out == ""
    assert "20-bad.yaml:2:5: rules[0].destinations: missing 'destinations'" in err
