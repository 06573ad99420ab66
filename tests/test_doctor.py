"""``dicom-gateway doctor`` and ``echo NAME`` against a wrong AE title, a wrong port and healthy peers.

The peers are the demo simulators (pynetdicom): a PACS that checks the called AE title answers a
wrong one with A-ASSOCIATE-RJ 1,1,7; nothing listens on the wrong port.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import write_config
from peers import HOST, free_port

import gateway
from gateway import cli
from gateway.demo.simulators import StorageSimulator, WorklistSimulator

REPO = Path(gateway.__file__).resolve().parent.parent


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StorageSimulator]:
    simulator = StorageSimulator("PACS", 0, tmp_path / "pacs", require_called_aet=True)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def ris() -> Iterator[WorklistSimulator]:
    simulator = WorklistSimulator("RIS", 0, [], require_called_aet=True)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def peer(ae_title: str, port: int) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": HOST, "port": port, "connect_timeout": 5.0, "dimse_timeout": 5.0}


def config_file(tmp_path: Path, destinations: dict[str, dict[str, Any]], **extra: Any) -> Path:
    return write_config(
        tmp_path / "gateway.yaml",
        {
            "ae_title": "DICOMGW",
            "spool_dir": str(tmp_path / "spool"),
            "rules_dir": str(tmp_path / "rules"),
            "destinations": destinations,
            **extra,
        },
    )


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_doctor_explains_each_failing_peer_and_exits_non_zero(tmp_path: Path, pacs: StorageSimulator) -> None:
    wrong_port = free_port()
    config = config_file(
        tmp_path,
        {
            "WRONG_AE": peer("NOT_PACS", pacs.port),
            "WRONG_PORT": peer("PACS", wrong_port),
            "HEALTHY": peer("PACS", pacs.port),
        },
    )

    result = doctor(config)

    assert result.returncode == 1, result.stderr
    wrong_ae, wrong_address, healthy = result.stdout.splitlines()
    assert wrong_ae.startswith("FAIL  WRONG_AE: the peer does not know the called AE title NOT_PACS")
    assert "destinations.WRONG_AE.ae_title" in wrong_ae
    assert "[A-ASSOCIATE-RJ 1,1,7 rejected-permanent]" in wrong_ae
    assert wrong_address == (
        f"FAIL  WRONG_PORT: nothing listens at {HOST}:{wrong_port}: check that the "
        "PACS is running and the port is right (destinations.WRONG_PORT.port)"
    )
    assert healthy.startswith(f"OK    HEALTHY: C-ECHO to PACS at {HOST}:{pacs.port} succeeded in ")


def test_doctor_exits_zero_when_every_peer_is_healthy(
    tmp_path: Path, pacs: StorageSimulator, ris: WorklistSimulator
) -> None:
    config = config_file(tmp_path, {"PACS_PROD": peer("PACS", pacs.port)}, worklist=peer("RIS", ris.port))

    result = doctor(config)

    assert result.returncode == 0, result.stdout + result.stderr
    destination, worklist = result.stdout.splitlines()
    assert destination.startswith(f"OK    PACS_PROD: C-ECHO to PACS at {HOST}:{pacs.port} succeeded")
    assert worklist.startswith(f"OK    RIS RIS at {HOST}:{ris.port}: ")


def test_doctor_checks_each_modality_s_own_ris_and_names_its_config_key(
    tmp_path: Path, pacs: StorageSimulator, ris: WorklistSimulator
) -> None:
    wrong_port = free_port()
    config = config_file(
        tmp_path,
        {"PACS_TEST": peer("PACS", pacs.port)},
        worklist=peer("RIS", ris.port),
        worklist_by_calling_ae={"US_TEST": peer("RIS", ris.port), "CT_TEST": peer("RIS", wrong_port)},
    )

    result = doctor(config)

    assert result.returncode == 1, result.stdout + result.stderr
    destination, worklist, us_test, ct_test = result.stdout.splitlines()
    assert destination.startswith("OK    PACS_TEST: ")
    assert worklist.startswith(f"OK    RIS RIS at {HOST}:{ris.port}: ")
    assert us_test.startswith(f"OK    for calling AE US_TEST: RIS RIS at {HOST}:{ris.port}: ")
    assert ct_test.startswith(
        f"FAIL  for calling AE CT_TEST: RIS RIS at {HOST}:{wrong_port}: nothing listens"
    )
    assert "worklist_by_calling_ae.CT_TEST.host/worklist_by_calling_ae.CT_TEST.port" in ct_test


def test_doctor_with_nothing_configured_says_so_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor", "--config", str(config_file(tmp_path, {}))]) == 1
    assert "nothing to check" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case",
    [
        ("WRONG_AE", 1, "WRONG_AE: the peer does not know the called AE title NOT_PACS"),
        ("WRONG_PORT", 1, "WRONG_PORT: nothing listens at 127.0.0.1:"),
        ("HEALTHY", 0, "HEALTHY: C-ECHO to PACS at 127.0.0.1:"),
    ],
)
def test_echo_one_destination(
    tmp_path: Path, pacs: StorageSimulator, capsys: pytest.CaptureFixture[str], case: tuple[str, int, str]
) -> None:
    name, code, begins = case
    config = config_file(
        tmp_path,
        {
            "WRONG_AE": peer("NOT_PACS", pacs.port),
            "WRONG_PORT": peer("PACS", free_port()),
            "HEALTHY": peer("PACS", pacs.port),
        },
    )

    assert cli.main(["echo", name, "--config", str(config)]) == code
    assert capsys.readouterr().out.startswith(begins)


def test_echo_an_unknown_name_is_a_configuration_error_listing_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(tmp_path, {"PACS_PROD": peer("PACS", free_port())})

    assert cli.main(["echo", "PACS_TSET", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "no destination named 'PACS_TSET'" in error
    assert "PACS_PROD, worklist" in error
