"""``rules check``, ``rules test`` and ``rules schema``: the operator's tools for rule files.

``add_rules_commands`` registers them on the lead's argparse front end (``gateway.cli``). Each
command function takes the parsed ``argparse.Namespace`` and returns an exit code: 0 fine, 1 the
rules (or a tested path) have a problem, 2 the configuration is invalid. Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from gateway.errors import ConfigError, RulesError
from gateway.header import Header, header_from_dataset
from gateway.routing import RuleSet, RuleTrace, explain, route
from gateway.rules import RuleSetInvalid, load_rules, rules_schema, ruleset_warnings
from gateway.settings import Settings, load_settings

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_CONFIG = 2


def add_rules_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``rules check|test|schema``; each sets ``func`` to a ``(Namespace) -> int``."""
    rules = subparsers.add_parser("rules", help="check, test and describe the routing rules")
    commands = rules.add_subparsers(dest="rules_command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="validate every rule file; exit 1 on any problem")
    _add_common_options(check)
    check.set_defaults(func=run_check)

    test = commands.add_parser(
        "test", help="show where DICOM files would be routed and why (sends nothing)"
    )
    _add_common_options(test)
    test.add_argument("--calling-ae", default="", help="the sending modality's AE title")
    test.add_argument("--called-ae", help="the AE title it calls (default: the gateway's)")
    test.add_argument("--source-ip", default="127.0.0.1", help="its IP address")
    test.add_argument("--json", action="store_true", help="print one JSON document")
    test.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    test.set_defaults(func=run_test)

    schema = commands.add_parser("schema", help="print the JSON schema of a rule file")
    schema.set_defaults(func=run_schema)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", type=Path, help="rules directory (default: rules_dir)")
    parser.add_argument("--config", type=Path, help="config file (default: $DICOMGW_CONFIG)")


def run_check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, rules_dir, ruleset = loaded
    for warning in ruleset_warnings(ruleset, list(settings.destinations)):
        print(f"warning: {warning}", file=sys.stderr)
    used = ", ".join(ruleset.destinations) or "none"
    print(
        f"{rules_dir}: OK, {len(ruleset.rules)} rule(s) in {len(ruleset.files)} file(s); "
        f"destinations used: {used}"
    )
    return EXIT_OK


def run_schema(args: argparse.Namespace) -> int:
    print(json.dumps(rules_schema(), indent=2))
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class _Peer:
    calling_ae: str
    called_ae: str
    source_ip: str


def run_test(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    settings, _, ruleset = loaded
    peer = _Peer(args.calling_ae, args.called_ae or settings.ae_title, args.source_ip)
    results = [_test_one(path, ruleset, peer) for path in _files(args.paths)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"as if sent by calling_ae={peer.calling_ae!r} to called_ae={peer.called_ae!r} "
            f"from source_ip={peer.source_ip!r}"
        )
        for result in results:
            print(_describe(result))
    missing = any(result.get("error") == _MISSING for result in results)
    return EXIT_INVALID if missing else EXIT_OK


def _load(args: argparse.Namespace) -> tuple[Settings, Path, RuleSet] | int:
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    rules_dir: Path = args.rules or settings.rules_dir
    try:
        return settings, rules_dir, load_rules(rules_dir, list(settings.destinations))
    except RuleSetInvalid as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{rules_dir}: {len(err.problems)} problem(s); nothing loaded", file=sys.stderr)
    except RulesError as err:
        print(f"error: {err}", file=sys.stderr)
    return EXIT_INVALID


_MISSING = "no such file or folder"


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    """Every file named, and every file under every folder named (sorted, recursively)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _test_one(path: Path, ruleset: RuleSet, peer: _Peer) -> dict[str, Any]:
    if not path.exists():
        return {"file": str(path), "error": _MISSING}
    header = _read_header(path, ruleset, peer)
    if isinstance(header, str):
        return {"file": str(path), "error": header}
    decision = route(header, ruleset)
    return {
        "file": str(path),
        "destinations": list(decision.destinations),
        "held": decision.held,
        "matched": list(decision.matched),
        "rules": [
            _trace_json(trace, rule.stop)
            for rule, trace in zip(ruleset.rules, explain(header, ruleset), strict=True)
        ],
    }


def _read_header(path: Path, ruleset: RuleSet, peer: _Peer) -> Header | str:
    """The routing header of one file, or why it was skipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in dataset and "SOPInstanceUID" not in dataset:
                return "skipped: not a DICOM instance (no SOP Class or SOP Instance UID)"
            return header_from_dataset(
                dataset,
                ruleset.keywords,
                calling_ae=peer.calling_ae,
                called_ae=peer.called_ae,
                source_ip=peer.source_ip,
            )
        except Exception as exc:  # pydicom raises many kinds on arbitrary bytes: skip the file
            return f"skipped: cannot read as DICOM ({type(exc).__name__}: {exc})"


def _trace_json(trace: RuleTrace, stop: bool) -> dict[str, Any]:
    return {
        "rule": trace.rule,
        "stop": stop,
        "matched": trace.matched,
        "applied": trace.applied,
        "why_not": trace.failure,
        "stopped_by": trace.stopped_by,
    }


def _describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['file']}: {result['error']}"
    sent = ", ".join(result["destinations"]) or "held (no rule sends it anywhere)"
    lines = [f"{result['file']}: {sent}"]
    for rule in result["rules"]:
        if rule["applied"]:
            lines.append(f"  + {rule['rule']}: matched" + (", stop" if rule["stop"] else ""))
        elif rule["matched"]:
            stopped = f"{rule['stopped_by']!r} stopped evaluation before it"
            lines.append(f"  ~ {rule['rule']}: matches, but {stopped}")
        else:
            lines.append(f"  - {rule['rule']}: {rule['why_not']}")
    return "\n".join(lines)
