"""Hot reload end to end: a running gateway follows a rule edit, keeps the last good rules through a
broken edit, and follows the fix. Routing is observed where it matters: at two real DCMTK PACS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from gateway_harness import GatewayThread
from peers import StoreSCP, make_us_image, run_storescu

from gateway.settings import Destination, Settings

pytestmark = pytest.mark.peer

TO_PROD = """rules:
  - name: everything-to-prod
    destinations: [PACS_PROD]
"""
ROOM3_TO_TEST = """rules:
  - name: us-room3-commissioning
    match: {calling_ae: US_ROOM3}
    destinations: [PACS_TEST]
    stop: true
  - name: everything-to-prod
    destinations: [PACS_PROD]
"""
BROKEN = """rules:
  - name: us-room3-commissioning
    match: {calling_ae: US_ROOM3, Modality: {regex: "(unclosed"}}
    destinations: [PACS_NOWHERE]
"""


def _send(gw: GatewayThread, image: Path) -> None:
    result = run_storescu(gw.port, [image], called_ae="DICOMGW", calling_ae="US_ROOM3")
    assert result.returncode == 0, result.stderr


def _reloads(gw: GatewayThread, result: str) -> float:
    value = gw.gateway.registry.get_sample_value(  # type: ignore[union-attr]
        "dicomgw_rules_reloads_total", {"result": result})
    return value or 0.0


def test_rule_edit_broken_edit_and_fix(tmp_path: Path,
                                       store_scp: Callable[..., StoreSCP]) -> None:
    test_pacs, prod_pacs = store_scp(ae_title="PACS_TEST"), store_scp(ae_title="PACS_PROD")
    rules = tmp_path / "rules"
    rules.mkdir()
    rule_file = rules / "10-us-room3.yaml"
    rule_file.write_text(TO_PROD)
    settings = Settings(
        host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool", rules_dir=rules,
        destinations={
            "PACS_TEST": Destination(ae_title="PACS_TEST", host="127.0.0.1", port=test_pacs.port),
            "PACS_PROD": Destination(ae_title="PACS_PROD", host="127.0.0.1", port=prod_pacs.port),
        })
    images = [tmp_path / f"us{i}.dcm" for i in range(4)]
    for seed, image in enumerate(images):
        make_us_image(image, seed, rows=32, cols=32)

    with GatewayThread(settings) as gw:
        assert gw.gateway is not None and gw.gateway.watcher is not None
        watcher = gw.gateway.watcher
        _send(gw, images[0])
        gw.wait_for(lambda g: g.delivered("PACS_PROD") == 1, 30)

        rule_file.write_text(ROOM3_TO_TEST)
        gw.call(watcher.poll)  # the same check the watcher's timer runs
        assert _reloads(gw, "success") == 2  # start-up load + this edit
        _send(gw, images[1])
        gw.wait_for(lambda g: g.delivered("PACS_TEST") == 1, 30)

        rule_file.write_text(BROKEN)
        gw.call(watcher.poll)
        assert _reloads(gw, "failure") == 1
        _send(gw, images[2])  # the last good rules stay in force
        gw.wait_for(lambda g: g.delivered("PACS_TEST") == 2, 30)

        rule_file.write_text(TO_PROD)
        gw.call(watcher.poll)
        assert _reloads(gw, "success") == 3
        _send(gw, images[3])
        gw.wait_for(lambda g: g.delivered("PACS_PROD") == 2, 30)

    assert len(test_pacs.received_files()) == 2
    assert len(prod_pacs.received_files()) == 2
    assert gw.attempts[("PACS_TEST", "delivered")] == 2
