"""Configuration: YAML + ``DICOMGW_*`` environment, validation messages, and ``config show``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.settings import Settings, load_settings

GOOD = """\
ae_title: GATEWAY
port: 11112
spool_dir: spool
rules_dir: rules
destinations:
  PACS_PROD:
    ae_title: PROD
    host: 127.0.0.1
    port: 11112
  pacs_test:
    ae_title: TEST
    host: 127.0.0.1
    port: 11113
"""

BAD = """\
ae_title: THIS_AE_TITLE_IS_FAR_TOO_LONG
port: 70000
max_pdu: 100
destinations:
  PACS_PROD:
    ae_title: PROD
    host: 127.0.0.1
    port: 0
unknown_key: 1
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMGW_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})}, check=False)


# ---------------------------------------------------------------------------- the CLI, for real


def test_config_show_with_an_invalid_file_prints_one_line_per_problem_and_exits_2(
    tmp_path: Path,
) -> None:
    result = run_cli("config", "show", "--config", str(write(tmp_path, BAD)))

    assert result.returncode == 2
    assert result.stdout == ""
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 5, result.stderr
    assert "5 problem(s)" in result.stderr
    by_key = {line.split()[1]: line for line in problems}
    assert set(by_key) == {"ae_title", "port", "max_pdu", "destinations.PACS_PROD.port",
                           "unknown_key"}
    assert "16 characters" in by_key["ae_title"]
    assert "65535" in by_key["port"]
    assert "[env: DICOMGW_DESTINATIONS__PACS_PROD__PORT]" in by_key["destinations.PACS_PROD.port"]
    assert "Traceback" not in result.stderr


def test_an_environment_variable_overrides_a_nested_key_in_config_show(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD)
    result = run_cli("config", "show", "--config", str(config),
                     env={"DICOMGW_DESTINATIONS__PACS_PROD__PORT": "104",
                          "DICOMGW_DESTINATIONS__PACS_TEST__RETRY__MAX_ATTEMPTS": "3",
                          "DICOMGW_MAX_ASSOCIATIONS": "4"})

    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["destinations"]["PACS_PROD"]["port"] == 104
    assert shown["destinations"]["PACS_PROD"]["ae_title"] == "PROD"  # the rest of it is kept
    # the YAML spelling of a destination name wins; the variable matched it case-insensitively
    assert set(shown["destinations"]) == {"PACS_PROD", "pacs_test"}
    assert shown["destinations"]["pacs_test"]["retry"]["max_attempts"] == 3
    assert shown["max_associations"] == 4
    assert shown["spool_dir"] == str(tmp_path / "spool")  # relative to the config file


# --------------------------------------------------------------------------- in-process checks


def test_main_returns_2_for_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: cannot read config file")
    assert len(err.strip().splitlines()) == 1


def test_main_returns_2_for_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(write(tmp_path, "port: [1, 2\n"))]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_a_top_level_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), environ={}) == Settings()


def test_environment_beats_file_beats_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), environ={"DICOMGW_AE_TITLE": "FROM_ENV",
                                                             "DICOMGW_ARTIM_TIMEOUT": "1.5"})
    assert settings.ae_title == "FROM_ENV"
    assert settings.port == 11112  # from the file
    assert settings.artim_timeout == 1.5  # parsed as a YAML scalar
    assert settings.network_timeout == 60.0  # default


def test_the_config_file_may_be_named_by_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_settings(None, environ={"DICOMGW_CONFIG": str(path)}).ae_title == "GATEWAY"


def test_environment_lists_and_mappings_are_yaml_flow_values() -> None:
    settings = load_settings(None, environ={
        "DICOMGW_MODALITIES": "[{ae_title: US_ROOM3, addresses: [10.0.0.0/8]}]",
        "DICOMGW_DESTINATIONS__NEW_PACS": "{ae_title: NEW, host: 127.0.0.1, port: 4242}",
    })
    assert settings.known_calling_aes == ("US_ROOM3",)
    assert settings.destinations["NEW_PACS"].port == 4242


def test_an_environment_error_names_the_variable() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ={"DICOMGW_PORT": "not-a-port"})
    assert "[env: DICOMGW_PORT]" in str(raised.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"ae_title": ""}, "1 to 16"),
        ({"ae_title": "A\\B"}, "backslash"),
        ({"ae_title": "    "}, "all spaces"),
        ({"destinations": {"bad name!": {"ae_title": "X", "host": "h", "port": 104}}},
         "destination name"),
        ({"modalities": [{"ae_title": "US", "addresses": ["not-an-ip"]}]}, "not an IP address"),
        ({"max_associations": 0}, "greater than or equal to 1"),
        ({"spool_min_free_fraction": 1.0}, "less than 1"),
        ({"duplicate_policy": "drop"}, "forward"),
        ({"destinations": {"PACS": {"ae_title": "X", "host": "h", "port": 104,
                                    "retry": {"status_overrides": {"0xA700": "permanent"}}}}},
         "without a '0x' prefix"),
        ({"destinations": {"PACS": {"ae_title": "X", "host": "h", "port": 104,
                                    "retry": {"status_overrides": {"A7": "permanent"}}}}},
         "status pattern 'A7'"),
    ],
)
def test_invalid_values_are_explained(tmp_path: Path, data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(write(tmp_path, yaml.safe_dump(data)), environ={})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_serve_with_a_missing_rules_dir_says_what_to_fix_without_a_traceback(tmp_path: Path) -> None:
    config = write(tmp_path, yaml.safe_dump({
        "host": "127.0.0.1", "port": 0, "http_port": 0, "spool_dir": str(tmp_path / "spool"),
        "rules_dir": str(tmp_path / "no-such-rules")}))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 1
    assert "error: " in result.stderr and "the rules directory does not exist" in result.stderr
    assert "Traceback" not in result.stderr  # the task group's exception group was unwrapped
