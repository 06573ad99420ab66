"""The deployment files, validated offline: Dockerfile, compose stack, systemd unit, Kubernetes
manifests, HAProxy configuration.

Each file is checked twice: by its own tool where one runs offline (``docker compose config -q``
or ``docker-compose config -q``, ``systemd-analyze verify``, ``haproxy -c``, ``promtool``, the
``kubernetes-validate`` schemas bundled in its PyPI package), and by parse-level checks of what
the gateway needs from it (a non-root user, HTTP probes on /readyz and /healthz, a stop grace
period longer than ``shutdown_timeout``, the configuration files it mounts actually loading).
The compose stack cannot run here (no Docker engine): its Orthanc configurations, worklist
generator, gateway configuration and rules are rehearsed on loopback with Debian's Orthanc.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from gateway_harness import GatewayThread, write_config
from peers import (
    HOST,
    SYSTEM_DIRS,
    Orthanc,
    free_port,
    make_us_image,
    missing,
    read_findscu_results,
    require_tool,
    run_findscu_worklist,
    run_storescu,
)
from pydicom import dcmread

from gateway.rules import load_rules
from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "dicom-gateway.service"
KUBERNETES = DEPLOY / "kubernetes"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: comments dropped, ``\\`` continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1]:]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching pattern wins; a
    pattern matching a parent folder matches everything under it)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def docker_final() -> list[tuple[str, str]]:
    return final_stage(dockerfile_instructions(DOCKERFILE.read_text()))


def healthcheck_argv(stage: list[tuple[str, str]]) -> list[str]:
    (arguments,) = [args for keyword, args in stage if keyword == "HEALTHCHECK"]
    command = arguments[arguments.index("CMD ") + len("CMD "):]
    argv: list[str] = json.loads(command)
    return argv


DOCKERFILE_INSTRUCTIONS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})


def test_dockerfile_instructions_are_known_and_json_arguments_parse() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions[0][0] in ("ARG", "FROM")
    for keyword, arguments in instructions:
        assert keyword in DOCKERFILE_INSTRUCTIONS, f"unknown instruction {keyword}"
        if keyword in ("CMD", "ENTRYPOINT", "VOLUME") or arguments.startswith("["):
            assert isinstance(json.loads(arguments), list), f"{keyword} {arguments}"
    assert len([k for k, _ in instructions if k == "FROM"]) == 2  # build stage + runtime stage


def test_dockerfile_runs_as_a_numeric_non_root_user(docker_final: list[tuple[str, str]]) -> None:
    users = [args for keyword, args in docker_final if keyword == "USER"]
    assert users, "the runtime stage has no USER: the gateway would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid"


def test_dockerfile_uses_slim_python_311(docker_final: list[tuple[str, str]]) -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    assert docker_final[0] == ("FROM", "${PYTHON_IMAGE}")


def test_dockerfile_spool_volume_exec_form_and_sigterm(docker_final: list[tuple[str, str]]) -> None:
    found = dict(docker_final)
    assert "/var/lib/dicom-gateway" in json.loads(found["VOLUME"])
    assert found["STOPSIGNAL"] == "SIGTERM"
    # exec form: the gateway is PID 1 and gets SIGTERM itself, not a shell
    assert json.loads(found["ENTRYPOINT"]) == ["dicom-gateway"]
    assert json.loads(found["CMD"]) == ["serve"]
    env = found["ENV"]
    assert "DICOMGW_CONFIG=/etc/dicom-gateway/gateway.yaml" in env


def test_dockerfile_healthcheck_is_python_urllib_on_healthz(docker_final: list[tuple[str, str]]) -> None:
    argv = healthcheck_argv(docker_final)
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2] and "/healthz" in argv[2]
    compile(argv[2], "<HEALTHCHECK>", "exec")


def test_dockerfile_healthcheck_passes_on_a_live_gateway_and_fails_without_one(
    tmp_path: Path, docker_final: list[tuple[str, str]]
) -> None:
    """Run the image's HEALTHCHECK command itself (with this Python) against a real gateway."""
    argv = [sys.executable, *healthcheck_argv(docker_final)[1:]]
    (tmp_path / "rules").mkdir()
    config = write_config(tmp_path / "gateway.yaml", {
        "host": HOST, "port": 0, "http_host": HOST, "http_port": free_port(),
        "spool_dir": "spool", "rules_dir": "rules"})
    env = {"DICOMGW_CONFIG": str(config), "PATH": "/usr/bin:/bin"}

    def check() -> int:
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=TIMEOUT,
                              check=False).returncode

    with GatewayThread(load_settings(config, environ={})):
        assert check() == 0
    assert check() != 0


def test_dockerfile_copies_only_what_the_build_context_keeps(docker_final: list[tuple[str, str]]) -> None:
    patterns = dockerignore_patterns()
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    copies = [args.split() for keyword, args in instructions if keyword == "COPY"]
    sources = [src for words in copies if not words[0].startswith("--from") for src in words[:-1]]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(patterns, source.rstrip("/")), f".dockerignore drops {source}"
    assert not dockerignore_excludes(patterns, "gateway/demo/rules/10-demo.yaml")


@pytest.mark.parametrize("path", [".venv/bin/python", "var/spool/journal.sqlite3", ".git/HEAD",
                                  "tests/peers.py", "gateway/__pycache__/cli.cpython-311.pyc",
                                  "deploy/compose/gateway.yaml"])
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert dockerignore_excludes(dockerignore_patterns(), path)


# ---------------------------------------------------------------------------------------------
# Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def compose_tool() -> list[str]:
    """``docker compose`` when the plugin works, else Debian's ``docker-compose``."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=TIMEOUT,
                               check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose", path=":".join(SYSTEM_DIRS))
    if legacy is None:
        missing("docker compose / docker-compose",
                 "install Debian package docker-compose (apt-get install docker-compose)")
    return [legacy]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"write durations as <n>s, not {duration!r}"
    return float(match.group(1))


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            yield (COMPOSE_DIR / source).resolve(), target


def compose_settings() -> Settings:
    return load_settings(COMPOSE_DIR / "gateway.yaml", environ={})


@pytest.mark.peer
def test_compose_file_is_valid_for_compose() -> None:
    result = subprocess.run([*compose_tool(), "-f", str(COMPOSE_FILE), "config", "-q"],
                            capture_output=True, text=True, timeout=TIMEOUT, check=False,
                            cwd=COMPOSE_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
    build = compose["services"]["gateway"]["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_gateway_mounts_config_rules_and_a_spool_volume(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    mounts = {target: source for source, target in bind_mounts(gateway)}
    assert mounts["/etc/dicom-gateway/gateway.yaml"] == COMPOSE_DIR / "gateway.yaml"
    assert mounts["/etc/dicom-gateway/rules"] == COMPOSE_DIR / "rules"
    named = [v for v in gateway["volumes"] if not v.startswith((".", "/"))]
    assert any(v.split(":")[1] == "/var/lib/dicom-gateway" for v in named)
    settings = compose_settings()
    assert settings.spool_dir.is_relative_to("/var/lib/dicom-gateway")
    assert settings.http_host == "0.0.0.0"  # Prometheus scrapes from another container
    assert seconds(gateway["stop_grace_period"]) > settings.shutdown_timeout


def test_compose_gateway_config_and_rules_load_and_name_compose_services(compose: dict[str, Any]) -> None:
    settings = compose_settings()
    ruleset = load_rules(settings.rules_dir, tuple(settings.destinations))
    assert {d for rule in ruleset.rules for d in rule.destinations} == {"PACS_TEST", "PACS_PROD"}
    services = compose["services"]
    assert settings.worklist is not None
    peers = [*settings.destinations.values(), settings.worklist]
    for peer in peers:
        assert peer.host in services, f"{peer.host} is not a compose service"
    orthanc_aets = {}
    for service in services.values():
        for source, target in bind_mounts(service):
            if target == "/etc/orthanc/orthanc.json":
                orthanc_aets[json.loads(source.read_text())["DicomAet"]] = service
    assert {peer.ae_title for peer in peers} <= set(orthanc_aets)


def test_compose_prometheus_scrapes_the_gateway_and_loads_the_alerts(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = {target: source for source, target in bind_mounts(prometheus)}
    assert mounts["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus" / "alerts.yml"
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "dicom-gateway"
    assert job["static_configs"][0]["targets"] == [f"gateway:{compose_settings().http_port}"]
    assert config["rule_files"] == ["alerts.yml"]


@pytest.mark.peer
def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_grafana_is_provisioned_from_the_repository(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/dicom-gateway.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_path] == ROOT / "grafana" / "dashboards"
    assert mounts["/etc/grafana/provisioning/dashboards"] == ROOT / "grafana/provisioning/dashboards"
    (datasource,) = yaml.safe_load(
        mounts["/etc/grafana/provisioning/datasources/prometheus.yaml"].read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def run_make_worklist(directory: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the image has the package installed; here, maybe not
    result = subprocess.run([sys.executable, str(COMPOSE_DIR / "make_worklist.py"), str(directory), *extra],
                            capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_worklist_writes_todays_items_for_the_station(tmp_path: Path) -> None:
    (tmp_path / "stale.wl").write_bytes(b"old")
    run_make_worklist(tmp_path, "--station-ae", "US_ROOM9", "--count", "4")
    files = sorted(tmp_path.glob("*.wl"))
    assert [f.name for f in files] == [f"item-{i:04d}.wl" for i in range(4)]
    for path in files:
        item = dcmread(path, force=True)
        step = item.ScheduledProcedureStepSequence[0]
        assert step.ScheduledStationAETitle == "US_ROOM9"
        assert step.ScheduledProcedureStepStartDate == date.today().strftime("%Y%m%d")


def _orthanc_options(name: str) -> tuple[str, dict[str, Any]]:
    """The AE title and the settings of a compose Orthanc, minus what a loopback test must own."""
    config: dict[str, Any] = json.loads((COMPOSE_DIR / name).read_text())
    local = {"DicomPort", "HttpPort", "StorageDirectory", "IndexDirectory", "RemoteAccessAllowed",
             "Worklists", "DicomAet", "Name"}
    return config["DicomAet"], {k: v for k, v in config.items() if k not in local}


@pytest.mark.peer
def test_compose_stack_rehearsed_on_loopback(tmp_path: Path, orthanc: Callable[..., Orthanc]) -> None:
    """The compose stack without Docker: its three Orthanc configurations (Debian's Orthanc), its
    worklist generator, its gateway.yaml (hosts and ports overridden by DICOMGW_* variables, as an
    operator would) and its rules; a modality routed to the Test PACS, another to Prod, and a
    worklist query through the gateway."""
    test_aet, test_options = _orthanc_options("orthanc-test.json")
    prod_aet, prod_options = _orthanc_options("orthanc-prod.json")
    ris_aet, ris_options = _orthanc_options("orthanc-ris.json")
    pacs_test = orthanc(ae_title=test_aet, extra_config=test_options)
    pacs_prod = orthanc(ae_title=prod_aet, extra_config=prod_options)
    ris = orthanc(ae_title=ris_aet, extra_config=ris_options, worklist_items=[])
    run_make_worklist(ris.directory / "worklists")

    environ = {
        "DICOMGW_HOST": HOST, "DICOMGW_PORT": "0", "DICOMGW_HTTP_HOST": HOST, "DICOMGW_HTTP_PORT": "0",
        "DICOMGW_SPOOL_DIR": str(tmp_path / "spool"),
        "DICOMGW_DESTINATIONS__PACS_TEST__HOST": HOST,
        "DICOMGW_DESTINATIONS__PACS_TEST__PORT": str(pacs_test.port),
        "DICOMGW_DESTINATIONS__PACS_PROD__HOST": HOST,
        "DICOMGW_DESTINATIONS__PACS_PROD__PORT": str(pacs_prod.port),
        "DICOMGW_WORKLIST__HOST": HOST, "DICOMGW_WORKLIST__PORT": str(ris.port),
    }
    settings = load_settings(COMPOSE_DIR / "gateway.yaml", environ=environ)
    commissioning, production = tmp_path / "us.dcm", tmp_path / "ct.dcm"
    make_us_image(commissioning, seed=1, rows=32, cols=32)
    make_us_image(production, seed=2, rows=32, cols=32)
    with GatewayThread(settings) as gw:
        for image, calling_ae in ((commissioning, "US_DEMO"), (production, "CT_ROOM1")):
            sent = run_storescu(gw.port, [image], called_ae=settings.ae_title, calling_ae=calling_ae)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        gw.wait_for(lambda g: g.delivered("PACS_TEST") >= 1 and g.delivered("PACS_PROD") >= 1,
                    timeout=TIMEOUT)
        answers = tmp_path / "answers"
        found = run_findscu_worklist(gw.port, called_ae=settings.ae_title, calling_ae="US_DEMO",
                                     out_dir=answers)
        assert found.returncode == 0, found.stdout + found.stderr
    assert len(pacs_test.instances()) == 1
    assert len(pacs_prod.instances()) == 1
    stations = {str(ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle)
                for ds in read_findscu_results(answers)}
    assert len(read_findscu_results(answers)) == 6
    assert stations == {"US_DEMO"}


# ---------------------------------------------------------------------------------------------
# systemd


def unit_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def systemd_settings() -> Settings:
    return load_settings(DEPLOY / "systemd" / "gateway.yaml", environ={})


@pytest.mark.peer
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert exec_start is not None
    # verify insists that the binary exists: point it at this environment's executable
    here = shutil.which("dicom-gateway") or "/bin/true"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={exec_start.group(1)}", f"ExecStart={here}"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert not complaints, "\n".join(complaints)


def test_systemd_unit_is_notify_with_watchdog_and_hardening() -> None:
    service = unit_sections()["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
        "Restart": "on-failure", "KillSignal": "SIGTERM", "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert seconds(service["WatchdogSec"]) > 0
    assert service.get("User") or service.get("DynamicUser") == "yes"
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "/etc/dicom-gateway/gateway.yaml"]


def test_systemd_stop_timeout_exceeds_the_drain_and_spool_is_the_state_directory() -> None:
    service = unit_sections()["Service"]
    settings = systemd_settings()
    assert seconds(service["TimeoutStopSec"]) > settings.shutdown_timeout
    state = Path("/var/lib") / service["StateDirectory"]
    assert settings.spool_dir.is_relative_to(state), "ProtectSystem=strict: only StateDirectory is writable"
    assert load_rules(settings.rules_dir, tuple(settings.destinations)).rules


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path.name, document))
    return documents


def kubernetes_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in kubernetes_documents()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_container() -> dict[str, Any]:
    (container,) = kubernetes_kind("StatefulSet")["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def kubernetes_settings(tmp_path: Path) -> Settings:
    """The ConfigMaps written out as the pod sees them, then loaded by the gateway's own code."""
    config = kubernetes_kind("ConfigMap", "dicom-gateway-config")["data"]["gateway.yaml"]
    settings = load_settings(write_yaml(tmp_path / "gateway.yaml", config), environ={})
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for name, text in kubernetes_kind("ConfigMap", "dicom-gateway-rules")["data"].items():
        write_yaml(rules_dir / name, text)
    assert load_rules(rules_dir, tuple(settings.destinations)).rules
    return settings


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def validator() -> ModuleType:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        missing("kubernetes-validate", "pip install kubernetes-validate (a test extra)")


@pytest.mark.peer
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_against_the_api_schemas(version: str) -> None:
    """Strict: an unknown field (a typo) fails too. Custom resources are checked by parse below."""
    kubernetes_validate = validator()
    checked = []
    for name, document in kubernetes_documents():
        if document["kind"] in ("ServiceMonitor", "Kustomization"):
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {document['kind']} {document['metadata']['name']}: {error.message}")
        checked.append(document["kind"])
    assert {"StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget"} <= set(checked)


def test_kubernetes_probes_are_http_on_readyz_and_healthz(tmp_path: Path) -> None:
    container = gateway_container()
    http_port = kubernetes_settings(tmp_path).http_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == http_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container[kind]
        assert "tcpSocket" not in probe, f"{kind}: never a TCP probe on the DICOM port"
        assert ports[probe["httpGet"]["port"]] == http_port


def test_kubernetes_spool_is_a_claim_per_replica_and_rules_a_live_configmap(tmp_path: Path) -> None:
    statefulset = kubernetes_kind("StatefulSet")
    settings = kubernetes_settings(tmp_path)
    mounts = {m["name"]: m for m in gateway_container()["volumeMounts"]}
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    spool_mount = mounts[claim["metadata"]["name"]]
    assert settings.spool_dir.is_relative_to(spool_mount["mountPath"])
    rules_mount = mounts["rules"]
    assert Path(rules_mount["mountPath"]) == Path("/etc/dicom-gateway/rules")
    assert "subPath" not in rules_mount, "a subPath mount never sees ConfigMap updates: no hot reload"
    config = kubernetes_kind("ConfigMap", "dicom-gateway-config")["data"]["gateway.yaml"]
    assert yaml.safe_load(config)["rules_dir"] == rules_mount["mountPath"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == "dicom-gateway-rules"
    retention = statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_kubernetes_pod_is_non_root_read_only_and_drains_before_sigkill(tmp_path: Path) -> None:
    pod = kubernetes_kind("StatefulSet")["spec"]["template"]["spec"]
    container = gateway_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_seconds = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
    drain = kubernetes_settings(tmp_path).shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + drain


def test_kubernetes_selectors_match_the_pods() -> None:
    statefulset = kubernetes_kind("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name, document in kubernetes_documents():
        if document["kind"] == "Service":
            assert document["spec"]["selector"].items() <= labels.items(), name
        if document["kind"] == "PodDisruptionBudget":
            assert document["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    headless = kubernetes_kind("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    dicom = kubernetes_kind("Service", "dicom-gateway")
    assert dicom["spec"]["externalTrafficPolicy"] == "Local"  # the modality's address survives


def test_kubernetes_metrics_are_scrapable(tmp_path: Path) -> None:
    http_port = kubernetes_settings(tmp_path).http_port
    annotations = kubernetes_kind("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(http_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    metrics = kubernetes_kind("Service", "dicom-gateway-metrics")
    monitor = kubernetes_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    port_names = {p["name"] for p in metrics["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    job = metrics["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert job == "dicom-gateway"  # what deploy/prometheus/alerts.yml selects


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).exists(), resource


# ---------------------------------------------------------------------------------------------
# HAProxy


@pytest.mark.peer
def test_haproxy_config_is_valid_without_warnings() -> None:
    haproxy = require_tool("haproxy")
    result = subprocess.run([haproxy, "-dW", "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_balances_tcp_connections_with_readyz_checks() -> None:
    text = HAPROXY_CFG.read_text()
    lines = (line.strip() for line in text.splitlines())
    directives = {line for line in lines if line and not line.startswith("#")}
    assert "mode tcp" in directives
    assert "balance leastconn" in directives
    assert "option httpchk" in directives
    assert any(d.startswith("http-check send meth GET uri /readyz") for d in directives)
    assert "option redispatch" in directives
    timeouts = {d.split()[1]: d.split()[2] for d in directives if d.startswith("timeout ")}
    network_timeout = Settings().network_timeout
    for side in ("client", "server"):
        value = timeouts[side]
        assert value.endswith("m") and float(value[:-1]) * 60 > network_timeout, (side, value)
