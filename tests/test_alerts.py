"""deploy/prometheus: the alert rules, their promtool unit tests and the example scrape config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from peers import require_tool
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayState, Metrics, metric_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"
CONFIG = DEPLOY / "prometheus.yml"
EXPECTED_ALERTS = {
    "DicomGatewayDown",
    "DicomGatewayQueueStale",
    "DicomGatewayDeadLetters",
    "DicomGatewayForwardFailures",
    "DicomGatewayDestinationDown",
    "DicomGatewayRulesReloadFailed",
    "DicomGatewaySpoolLow",
}


def promtool() -> str:
    return require_tool("promtool")


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], cwd=DEPLOY, capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", ALERTS.name)


def test_promtool_unit_tests() -> None:
    run_promtool("test", "rules", ALERTS_TEST.name)


def test_promtool_check_config() -> None:
    run_promtool("check", "config", CONFIG.name)


def test_every_expected_alert_exists_once() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_has_severity_summary_and_runbook(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert len(annotations["runbook"].split()) >= 5  # a sentence of what to do, not a stub


def test_every_alert_is_tested_firing_and_silent() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert doc["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for test in doc["tests"]:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert fired == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


def test_alerts_use_only_exported_metrics() -> None:
    registry = CollectorRegistry()
    Metrics(registry).attach_state(GatewayState)
    exported = metric_names(registry)
    used = {name for rule in alert_rules() for name in re.findall(r"dicomgw_\w+", rule["expr"])}
    assert used
    assert used <= exported, used - exported


def test_scrape_config_targets_the_gateway() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "dicom-gateway"  # DicomGatewayDown selects up{job="dicom-gateway"}
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert config["rule_files"] == [ALERTS.name]
