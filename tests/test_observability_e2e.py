"""Metrics after real traffic, checked three ways: exact values, ``promtool check metrics``, and a real
Prometheus server that scrapes the gateway while every dashboard panel query is evaluated."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import GatewayThread
from peers import (
    PeerProcess,
    StoreSCP,
    free_port,
    http_get,
    make_us_image,
    require_tool,
    run_echoscu,
    run_findscu_worklist,
    run_storescu,
    wait_until,
)

from gateway.demo.simulators import WorklistSimulator
from gateway.demo.worklist_items import demo_worklist
from gateway.errors import SpoolFull
from gateway.settings import Destination, Modality, RetryPolicy, Settings, Worklist

pytestmark = pytest.mark.peer
DASHBOARD = Path(__file__).parents[1] / "grafana" / "dashboards" / "dicom-gateway.json"
FAST_RETRY = RetryPolicy(base_delay=0.05, max_delay=0.2)


def _sample(gw: GatewayThread, name: str, **labels: str) -> float:
    assert gw.gateway is not None
    return gw.gateway.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def traffic(tmp_path: Path, store_scp: Callable[..., StoreSCP]) -> Iterator[GatewayThread]:
    """A gateway after stores to two destinations (one down), MWL queries and rejected associations."""
    test_pacs = store_scp(ae_title="PACS_TEST")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text(
        "rules:\n  - name: both\n    destinations: [PACS_TEST, PACS_PROD]\n")
    ris_port = free_port()
    settings = Settings(
        host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool", rules_dir=rules,
        modalities=[Modality(ae_title="US_ROOM3")],
        destinations={
            "PACS_TEST": Destination(ae_title="PACS_TEST", host="127.0.0.1", port=test_pacs.port,
                                     retry=FAST_RETRY),
            "PACS_PROD": Destination(ae_title="PACS_PROD", host="127.0.0.1", port=free_port(),
                                     connect_timeout=1, retry=FAST_RETRY),
        },
        worklist=Worklist(ae_title="RIS", host="127.0.0.1", port=ris_port))
    images = []
    for seed in range(3):
        images.append(tmp_path / f"us{seed}.dcm")
        make_us_image(images[-1], seed, rows=32, cols=32)
    with WorklistSimulator("RIS", ris_port, demo_worklist(date.today(), "US_ROOM3")), \
            GatewayThread(settings) as gw:
        sent = run_storescu(gw.port, images, called_ae="DICOMGW", calling_ae="US_ROOM3")
        assert sent.returncode == 0, sent.stderr
        found = run_findscu_worklist(gw.port, called_ae="DICOMGW", calling_ae="US_ROOM3")
        assert found.returncode == 0, found.stderr
        assert run_echoscu(gw.port, called_ae="WRONG_AE", calling_ae="US_ROOM3").returncode != 0
        assert run_echoscu(gw.port, called_ae="DICOMGW", calling_ae="STRANGER").returncode != 0
        gw.wait_for(lambda g: g.delivered("PACS_TEST") == 3
                    and g.attempts[("PACS_PROD", "transient")] >= 2, 60)
        yield gw


def test_metrics_after_real_traffic(traffic: GatewayThread) -> None:
    gw = traffic
    status, text = http_get(gw.http_port, "/metrics")
    assert status == 200
    promtool = require_tool("promtool")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    assert _sample(gw, "dicomgw_dimse_requests_total", service="store", calling_ae="US_ROOM3",
                   status_class="success") == 3
    assert _sample(gw, "dicomgw_forward_attempts_total", destination="PACS_TEST",
                   outcome="delivered") == 3
    assert _sample(gw, "dicomgw_forward_attempts_total", destination="PACS_PROD",
                   outcome="transient") >= 2
    assert _sample(gw, "dicomgw_associations_total", direction="out", peer="PACS_TEST",
                   result="accepted") >= 1  # the forwarder's association, reused for all three
    assert _sample(gw, "dicomgw_association_rejects_total", reason="called_ae") == 1
    assert _sample(gw, "dicomgw_association_rejects_total", reason="calling_ae") == 1
    assert _sample(gw, "dicomgw_mwl_queries_total", calling_ae="US_ROOM3", outcome="success") == 1
    assert _sample(gw, "dicomgw_mwl_results_total") == 6
    assert _sample(gw, "dicomgw_routing_decisions_total", rule="both", destination="PACS_PROD") == 3
    # scrape-time state read from the journal
    assert 'dicomgw_queue_items{destination="PACS_PROD"} 3.0' in text
    assert 'dicomgw_queue_items{destination="PACS_TEST"} 0.0' in text
    assert 'dicomgw_dead_letter_items{destination="PACS_PROD"} 0.0' in text
    # unknown calling AEs never become label values
    assert "STRANGER" not in text and "WRONG_AE" not in text


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = (target["expr"].replace("$__rate_interval", "1m")
                        .replace("$instance", ".*").replace("$destination", ".*"))
                queries.append((panel.get("title", "?"), expr))

    walk(dashboard["panels"])
    return queries


def test_prometheus_scrapes_and_every_panel_has_data(traffic: GatewayThread,
                                                     tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n  - job_name: dicom-gateway\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{traffic.http_port}']}}]\n")
    server = PeerProcess("prometheus", [
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")
    server.start()
    try:
        def query(expr: str) -> list[Any]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
            assert body["status"] == "success", body
            return list(body["data"]["result"])

        def scraped_twice() -> bool:
            try:
                return bool(query('count_over_time(up{job="dicom-gateway"}[1m]) >= 3'))
            except OSError:
                return False

        wait_until(scraped_twice, timeout=60, what="Prometheus scraping the gateway")
        empty = [(title, expr) for title, expr in _panel_queries() if not query(expr)]
        assert not empty, f"panels without data: {empty}"
    finally:
        server.stop()


def test_readyz_follows_the_high_water_mark(tmp_path: Path,
                                            store_scp: Callable[..., StoreSCP]) -> None:
    pacs_port = free_port()  # nothing listens there until we let the object go
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text("rules:\n  - name: all\n    destinations: [PACS_TEST]\n")
    image = tmp_path / "us.dcm"
    make_us_image(image, 0, rows=64, cols=64)  # ~12 KiB of pixels
    settings = Settings(
        host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool", rules_dir=rules,
        spool_max_bytes=4096,
        destinations={"PACS_TEST": Destination(ae_title="PACS_TEST", host="127.0.0.1",
                                               port=pacs_port, retry=FAST_RETRY)})
    with GatewayThread(settings) as gw:
        assert http_get(gw.http_port, "/readyz")[0] == 200
        assert run_storescu(gw.port, [image], called_ae="DICOMGW").returncode == 0
        status, body = http_get(gw.http_port, "/readyz")
        assert status == 503 and "high-water" in body
        store_scp(ae_title="PACS_TEST", port=pacs_port, fork=True)  # echo probe + our association
        gw.wait_for(lambda g: g.delivered("PACS_TEST") == 1, 60)
        assert http_get(gw.http_port, "/readyz")[0] == 200


def test_a_failing_journal_does_not_take_the_gateway_down_with_a_scrape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    settings = Settings(host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool",
                        rules_dir=rules)
    with GatewayThread(settings) as gw:
        assert gw.gateway is not None
        assert http_get(gw.http_port, "/metrics")[0] == 200

        async def broken() -> dict[str, object]:
            raise SpoolFull("the spool journal cannot be read: disk I/O error")

        monkeypatch.setattr(gw.gateway.spool, "counts", broken)
        status, body = http_get(gw.http_port, "/metrics")
        assert status == 200 and "dicomgw_queue_items" in body  # the last counts
        assert run_echoscu(gw.port, called_ae="DICOMGW").returncode == 0  # still serving
