"""The worklist proxy against a second upstream implementation: Orthanc's worklist plugin,
through the whole running gateway (GatewayThread), compared with a direct query."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest
from gateway_harness import GatewayThread
from peers import Orthanc, read_findscu_results, run_findscu_worklist
from pydicom.dataset import Dataset

from gateway.demo.worklist_items import demo_worklist
from gateway.settings import Settings, Worklist

pytestmark = pytest.mark.peer


def _by_accession(answers: list[Dataset]) -> list[Dataset]:
    return sorted(answers, key=lambda ds: str(ds.AccessionNumber))


def test_orthanc_worklist_through_the_gateway(tmp_path: Path,
                                              orthanc: Callable[..., Orthanc]) -> None:
    items = demo_worklist(date(2026, 11, 30), "US_ROOM3", n=5)
    ris = orthanc(ae_title="ORTHANC_RIS", worklist_items=items)
    rules = tmp_path / "rules"
    rules.mkdir()
    settings = Settings(host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool",
                        rules_dir=rules,
                        worklist=Worklist(ae_title="ORTHANC_RIS", host="127.0.0.1", port=ris.port))
    via, direct = tmp_path / "via", tmp_path / "direct"
    with GatewayThread(settings) as gw:
        proxied = run_findscu_worklist(gw.port, called_ae="DICOMGW", calling_ae="US_ROOM3",
                                       out_dir=via)
        assert proxied.returncode == 0, proxied.stdout + proxied.stderr
        assert gw.gateway is not None
        assert gw.gateway.registry.get_sample_value(
            "dicomgw_mwl_results_total") == 5
    straight = run_findscu_worklist(ris.port, called_ae="ORTHANC_RIS", calling_ae="US_ROOM3",
                                    out_dir=direct)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    got, expected = _by_accession(read_findscu_results(via)), _by_accession(
        read_findscu_results(direct))
    assert len(expected) == 5
    assert got == expected
    assert {str(ds.PatientName) for ds in got} == {str(i.PatientName) for i in items}
