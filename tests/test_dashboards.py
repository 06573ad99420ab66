"""grafana/: the provisioned dashboard only queries metrics the gateway exports, in valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from peers import require_tool
from prometheus_client import CollectorRegistry

from gateway.metrics import DestinationState, GatewayState, Metrics, metric_names

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dicom-gateway.json"
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
# What a query looks like once Grafana has filled in the variables (for the PromQL syntax check).
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$destination": ".*",
}


def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]


def exported_names() -> frozenset[str]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, known_calling_aes=["CT01"], destinations=["pacs_prod"])
    sample = GatewayState(destinations={"pacs_prod": DestinationState(1, 10, 5.0, 0)}, held=1)
    metrics.attach_state(lambda: sample)
    return metric_names(registry)


def test_uid_is_stable_and_unique(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "dicom-gateway"
    uids = [json.loads(p.read_text(encoding="utf-8"))["uid"]
            for p in sorted((GRAFANA / "dashboards").glob("*.json"))]
    assert len(uids) == len(set(uids))


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    assert len(query_panels(dashboard)) >= 20


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "destination"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["query"]["query"].startswith("label_values(")


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in query_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_rows_cover_every_area(dashboard: dict[str, Any]) -> None:
    rows = " | ".join(p["title"].lower() for p in dashboard["panels"] if p["type"] == "row")
    for area in ("ingest", "queues", "dead letters", "worklist", "associations", "rules", "spool"):
        assert area in rows


def test_panels_only_use_exported_metrics(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in re.findall(r"dicomgw_\w+", expr)}
    unknown = used - exported_names()
    assert not unknown, f"panels query metrics the gateway does not export: {sorted(unknown)}"


def test_dashboard_shows_the_key_metrics(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in re.findall(r"dicomgw_\w+", expr)}
    key = {
        "dicomgw_dimse_requests_total", "dicomgw_received_bytes_total",
        "dicomgw_spool_write_duration_seconds_bucket", "dicomgw_dimse_request_duration_seconds_bucket",
        "dicomgw_queue_items", "dicomgw_queue_oldest_age_seconds", "dicomgw_forward_attempts_total",
        "dicomgw_forward_duration_seconds_bucket", "dicomgw_dead_letter_items", "dicomgw_held_items",
        "dicomgw_mwl_queries_total", "dicomgw_mwl_upstream_duration_seconds_bucket",
        "dicomgw_associations_active", "dicomgw_association_rejects_total", "dicomgw_rules_loaded",
        "dicomgw_rules_reloads_total", "dicomgw_spool_free_bytes", "dicomgw_spool_used_bytes",
        "dicomgw_destination_up",
    }
    assert key <= used, key - used


def test_variables_used_are_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | BUILTIN_VARIABLES
    for expr in expressions(dashboard):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined, f"{name} in {expr}"


def as_promql(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def test_panel_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    tool = promtool()
    rules = []
    for i, expr in enumerate(expressions(dashboard)):
        rules.append({"record": f"dashboard:query_{i}", "expr": as_promql(expr)})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", str(rule_file)], capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_provisioning_files() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dicom-gateway.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert path in docs  # the docs say where to copy the dashboard
