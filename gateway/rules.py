"""Loading and validating rule files (``rules/*.yaml``) into a compiled ``RuleSet``; JSON schema.

The YAML is composed into nodes (``yaml.compose``), never constructed blindly: every node keeps
its line and column, so each problem names file, line, column and field path. All problems of the
whole file set are collected and raised together as one ``RuleSetInvalid``. The language is
described in docs/rules.md.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import ipaddress
import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import dictionary_VR, keyword_dict
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.errors import RulesError
from gateway.routing import (
    PEER_FIELDS,
    Condition,
    Equals,
    Exists,
    Glob,
    InNetwork,
    IPNetwork,
    Matcher,
    Not,
    OneOf,
    Regex,
    Rule,
    RuleSet,
)

RULE_FILE_SUFFIXES = (".yaml", ".yml")
TOP_LEVEL_KEYS = ("rules",)
RULE_KEYS = ("name", "description", "match", "destinations", "stop")
OPERATORS = ("regex", "glob", "in", "exists", "not", "cidr")
RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FIELD_NAME = re.compile(r"^(calling_ae|called_ae|source_ip|[A-Za-z][A-Za-z0-9]*)$")
MAX_AE_TITLE = 16
MAX_NOT_DEPTH = 4

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same nodes, faster
_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_TYPE_WORDS = {
    "tag:yaml.org,2002:int": "the number",
    "tag:yaml.org,2002:float": "the number",
    _BOOL: "the boolean",
    "tag:yaml.org,2002:timestamp": "the date",
}


@dataclass(frozen=True, slots=True)
class RuleFile:
    """One rule file as read from disk: its path and its exact bytes."""

    path: Path
    content: bytes


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One thing wrong with a rule file set. ``line`` and ``column`` are 1-based."""

    file: Path
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class RuleSetInvalid(RulesError):
    """Every problem found in a rule file set; nothing of the set was loaded."""

    def __init__(self, problems: Sequence[RuleProblem]) -> None:
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in the rule files:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


def load_rules(rules_dir: Path, destinations: Collection[str]) -> RuleSet:
    """Read, validate and compile every rule file in ``rules_dir``; raise ``RuleSetInvalid``."""
    return compile_rules(read_rule_files(rules_dir), destinations)


def read_rule_files(rules_dir: Path) -> tuple[RuleFile, ...]:
    """The ``*.yaml``/``*.yml`` files of ``rules_dir`` by name (symlinks followed, no dot-files).

    A file that vanishes between listing and reading (an editor saving, a ConfigMap update) makes
    the whole directory be read again, so a set is never missing a file that was only replaced.
    """
    for _ in range(_READ_ATTEMPTS - 1):
        files = _read_directory(rules_dir)
        if files is not None:
            return files
    return _read_directory(rules_dir, skip_vanished=True) or ()


_READ_ATTEMPTS = 3


def _read_directory(rules_dir: Path, *, skip_vanished: bool = False) -> tuple[RuleFile, ...] | None:
    """The rule files, or ``None`` if one vanished while we read (unless ``skip_vanished``)."""
    try:
        entries = list(rules_dir.iterdir())
    except FileNotFoundError:
        message = "the rules directory does not exist: create it or fix rules_dir"
        raise _dir_problem(rules_dir, message) from None
    except NotADirectoryError:
        message = "rules_dir is not a directory: point it at the rules folder"
        raise _dir_problem(rules_dir, message) from None
    except OSError as exc:
        raise _dir_problem(rules_dir, f"cannot list the rules directory: {exc.strerror}") from None
    files: list[RuleFile] = []
    problems: list[RuleProblem] = []
    for path in sorted(entries, key=lambda p: p.name):
        if path.name.startswith(".") or path.suffix not in RULE_FILE_SUFFIXES or not path.is_file():
            continue
        try:
            files.append(RuleFile(path, path.read_bytes()))
        except FileNotFoundError:
            if not skip_vanished:
                return None
        except OSError as exc:
            problems.append(RuleProblem(path, None, None, "", f"cannot read: {exc.strerror}"))
    if problems:
        raise RuleSetInvalid(problems)
    return tuple(files)


def _dir_problem(rules_dir: Path, message: str) -> RuleSetInvalid:
    return RuleSetInvalid([RuleProblem(rules_dir, None, None, "", message)])


def fingerprint(files: Sequence[RuleFile]) -> str:
    """A hash of the names and contents of ``files``: equal fingerprints mean an identical set."""
    digest = hashlib.sha256()
    for file in files:
        name = file.path.name.encode("utf-8", "surrogateescape")
        digest.update(b"%d:%s:%d:" % (len(name), name, len(file.content)))
        digest.update(file.content)
    return digest.hexdigest()


def compile_rules(files: Sequence[RuleFile], destinations: Collection[str]) -> RuleSet:
    """Validate and compile ``files`` in order; raise ``RuleSetInvalid`` with every problem."""
    compiler = _Compiler(tuple(destinations))
    rules = [rule for file in files for rule in compiler.compile_file(file)]
    if compiler.problems:
        order = {file.path: i for i, file in enumerate(files)}
        raise RuleSetInvalid(sorted(compiler.problems, key=lambda p: _position(p, order)))
    return RuleSet(tuple(rules), tuple(f.path for f in files), fingerprint(files))


def _position(problem: RuleProblem, order: dict[Path, int]) -> tuple[int, int, int]:
    return (order.get(problem.file, -1), problem.line or 0, problem.column or 0)


class _Compiler:
    """Walks the composed YAML nodes of a file set, recording every problem on the way."""

    def __init__(self, destinations: tuple[str, ...]) -> None:
        self.destinations = destinations
        self.problems: list[RuleProblem] = []
        self.names: dict[str, str] = {}
        self.file = Path()

    def problem(self, node: Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        column = node.start_mark.column + 1 if node is not None else None
        self.problems.append(RuleProblem(self.file, line, column, path, message))

    def compile_file(self, file: RuleFile) -> list[Rule]:
        self.file = file.path
        root = self.compose(file.content)
        if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
            return []
        if not isinstance(root, MappingNode):
            self.problem(root, "", "the top level must be a mapping with a 'rules:' list")
            return []
        rules_node: Node | None = None
        for key, key_node, value in self.pairs(root, ""):
            if key in TOP_LEVEL_KEYS:
                rules_node = value
            else:
                self.problem(key_node, key, _unknown("top-level key", key, TOP_LEVEL_KEYS))
        if rules_node is None or (isinstance(rules_node, ScalarNode) and rules_node.tag == _NULL):
            return []
        if not isinstance(rules_node, SequenceNode):
            self.problem(rules_node, "rules", "must be a list of rules, each starting with '- '")
            return []
        compiled = (self.rule(item, f"rules[{i}]") for i, item in enumerate(rules_node.value))
        return [rule for rule in compiled if rule is not None]

    def compose(self, content: bytes) -> Node | None:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not UTF-8 text (bad byte at offset {exc.start}): save it as UTF-8"
            self.problem(None, "", message)
            return None
        try:
            return yaml.compose(text, Loader=_LOADER)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = ": ".join(str(part) for part in (exc.context, exc.problem) if part)
            line = mark.line + 1 if mark else None
            column = mark.column + 1 if mark else None
            began = exc.context_mark
            if began is not None and mark is not None and began.line != mark.line:
                what += f" (it began at line {began.line + 1})"
            message = f"YAML syntax error: {what}; fix the syntax"
            self.problems.append(RuleProblem(self.file, line, column, "", message))
        except yaml.YAMLError as exc:
            self.problem(None, "", f"YAML syntax error: {exc}")
        return None

    def pairs(self, node: MappingNode, path: str) -> Iterator[tuple[str, Node, Node]]:
        """The (key, key node, value node) pairs of a mapping; reports bad and duplicate keys."""
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self.problem(key_node, path, "YAML merge keys (<<) are not supported: write it out")
                continue
            if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR):
                self.problem(key_node, path, f"the key {key_node.value!r} must be text")
                continue
            key = key_node.value
            where = _join(path, key)
            if key in seen:
                message = f"duplicate key (first at line {seen[key]}); YAML keeps only the last"
                self.problem(key_node, where, message + ": merge them into one")
                continue
            seen[key] = key_node.start_mark.line + 1
            yield key, key_node, value_node

    def rule(self, node: Node, path: str) -> Rule | None:
        if not isinstance(node, MappingNode):
            self.problem(node, path, "each rule must be a mapping with name, match, destinations")
            return None
        before = len(self.problems)
        fields: dict[str, Node] = {}
        for key, key_node, value in self.pairs(node, path):
            if key in RULE_KEYS:
                fields[key] = value
            else:
                self.problem(key_node, _join(path, key), _unknown("rule key", key, RULE_KEYS))
        name = self.name(fields.get("name"), node, path)
        if "description" in fields:
            self.text(fields["description"], f"{path}.description")
        conditions = self.match(fields["match"], f"{path}.match") if "match" in fields else ()
        destinations = self.rule_destinations(fields.get("destinations"), node, path)
        stop = self.boolean(fields["stop"], f"{path}.stop") if "stop" in fields else False
        if len(self.problems) > before or name is None or destinations is None:
            return None
        origin = f"{self.file}:{node.start_mark.line + 1}"
        return Rule(name, conditions, destinations, bool(stop), origin)

    def name(self, node: Node | None, rule_node: Node, path: str) -> str | None:
        if node is None:
            self.problem(rule_node, f"{path}.name", "missing 'name': give every rule a unique name")
            return None
        name = self.text(node, f"{path}.name")
        if name is None:
            return None
        if not RULE_NAME.match(name):
            message = f"{name!r} is not a valid rule name: use 1-64 letters, digits, '_', '.', '-'"
            self.problem(node, f"{path}.name", message)
            return None
        origin = f"{self.file}:{node.start_mark.line + 1}"
        if name in self.names:
            message = f"duplicate rule name {name!r}, first used at {self.names[name]}; rename one"
            self.problem(node, f"{path}.name", message + " (names are unique across all files)")
            return None
        self.names[name] = origin
        return name

    def rule_destinations(
        self, node: Node | None, rule_node: Node, path: str
    ) -> tuple[str, ...] | None:
        where = f"{path}.destinations"
        if node is None:
            message = "missing 'destinations': e.g. [PACS_PROD], or [] to hold what matches"
            self.problem(rule_node, where, message)
            return None
        if not isinstance(node, SequenceNode):
            shown = node.value if isinstance(node, ScalarNode) else "..."
            self.problem(node, where, f"must be a list: write destinations: [{shown}]")
            return None
        names: list[str] = []
        for i, item in enumerate(node.value):
            name = self.text(item, f"{where}[{i}]")
            if name is not None and self.known_destination(name, item, f"{where}[{i}]"):
                names.append(name)
        return tuple(dict.fromkeys(names))

    def known_destination(self, name: str, node: Node, path: str) -> bool:
        if name in self.destinations:
            return True
        if not self.destinations:
            message = "no destinations are configured: add it under 'destinations:' in the config"
        else:
            configured = ", ".join(sorted(self.destinations))
            hint = _did_you_mean(name, self.destinations)
            message = f"configured destinations are: {configured}{hint}"
        self.problem(node, path, f"unknown destination {name!r}; {message}")
        return False

    def match(self, node: Node, path: str) -> tuple[Condition, ...]:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            message = "'match' is empty: remove it to match every instance, or add conditions"
            self.problem(node, path, message)
            return ()
        if not isinstance(node, MappingNode):
            self.problem(node, path, "must be a mapping of field: condition (e.g. Modality: US)")
            return ()
        conditions: list[Condition] = []
        for key, key_node, value in self.pairs(node, path):
            known = self.known_field(key, key_node, _join(path, key))
            test = self.condition(key, value, _join(path, key))
            if known and test is not None:
                conditions.append(Condition(key, test))
        return tuple(conditions)

    def known_field(self, key: str, node: Node, path: str) -> bool:
        if key in PEER_FIELDS:
            return True
        if key in keyword_dict and key:
            if dictionary_VR(keyword_dict[key]) == "SQ":
                message = f"{key} is a sequence (SQ): rules can test attributes with values only"
                self.problem(node, path, message)
                return False
            return True
        message = f"unknown field {key!r}: not calling_ae, called_ae, source_ip or a DICOM keyword"
        suggestion = _suggest_field(key)
        hint = f"; did you mean {suggestion!r}?" if suggestion else "; check the spelling (PS3.6)"
        self.problem(node, path, message + hint)
        return False

    def condition(self, field: str, node: Node, path: str, depth: int = 0) -> Matcher | None:
        if isinstance(node, SequenceNode):
            message = "a list is not a condition: to match any of them write {in: [...]}"
            self.problem(node, path, message)
            return None
        if isinstance(node, ScalarNode):
            hint = " (or use {exists: false} to match a missing attribute)"
            value = self.text(node, path, missing_hint=hint)
            return None if value is None else self.plain(field, value, node, path)
        assert isinstance(node, MappingNode)
        operators = list(self.pairs(node, path))
        for key, key_node, _ in operators:
            if key not in OPERATORS:
                self.problem(key_node, _join(path, key), _unknown("operator", key, OPERATORS))
        if len(operators) != 1:
            found = ", ".join(key for key, _, _ in operators) or "none"
            valid = ", ".join(OPERATORS)
            message = f"give exactly one operator (found: {found}); valid operators: {valid}"
            self.problem(node, path, message)
            return None
        key, _, operand = operators[0]
        if key not in OPERATORS:
            return None
        return self.operator(field, key, operand, _join(path, key), depth)

    def plain(self, field: str, value: str, node: Node, path: str) -> Matcher | None:
        if field == "source_ip":
            return self.networks(node, path)
        if field in PEER_FIELDS and len(value.strip(" ")) > MAX_AE_TITLE:
            self.problem(node, path, f"{value!r} is longer than an AE title (16 characters)")
            return None
        return Equals(value)

    def operator(
        self, field: str, operator: str, node: Node, path: str, depth: int
    ) -> Matcher | None:
        if operator == "not":
            if depth >= MAX_NOT_DEPTH:
                self.problem(node, path, "'not' is nested too deeply (or an alias refers to itself)")
                return None
            inner = self.condition(field, node, path, depth + 1)
            return None if inner is None else Not(inner)
        if operator == "exists":
            expected = self.boolean(node, path)
            return None if expected is None else Exists(expected)
        if operator == "in":
            return self.one_of(node, path)
        if operator == "cidr":
            if field != "source_ip":
                message = f"cidr tests source_ip only, not {field}: use glob or regex"
                self.problem(node, path, message)
                return None
            return self.networks(node, path)
        pattern = self.text(node, path)
        if pattern is None:
            return None
        if operator == "glob":
            return Glob(pattern, re.compile(fnmatch.translate(pattern)))
        try:
            return Regex(re.compile(pattern))
        except re.error as exc:
            at = f" at position {exc.pos}" if exc.pos is not None else ""
            self.problem(node, path, f"invalid regex {pattern!r}: {exc.msg}{at} (Python re syntax)")
            return None

    def one_of(self, node: Node, path: str) -> Matcher | None:
        if not isinstance(node, SequenceNode) or not node.value:
            self.problem(node, path, "'in' takes a non-empty list: {in: [A, B]}")
            return None
        items = [self.text(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        choices = [item for item in items if item is not None]
        return OneOf(tuple(choices)) if len(choices) == len(items) else None

    def networks(self, node: Node, path: str) -> Matcher | None:
        items = node.value if isinstance(node, SequenceNode) else [node]
        networks: list[IPNetwork] = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            text = self.text(item, where)
            network = None if text is None else self.network(text, item, where)
            if network is not None:
                networks.append(network)
        if not items:
            self.problem(node, path, "give at least one network, e.g. 10.20.0.0/16")
        return InNetwork(tuple(networks)) if networks and len(networks) == len(items) else None

    def network(self, text: str, node: Node, path: str) -> IPNetwork | None:
        try:
            return ipaddress.ip_network(text.strip())
        except ValueError as exc:
            hint = "write an address or a network such as 10.20.0.0/16 or fd00::/8"
            with contextlib.suppress(ValueError):
                hint = f"did you mean {ipaddress.ip_network(text.strip(), strict=False)}?"
            self.problem(node, path, f"invalid address or network {text!r} ({exc}); {hint}")
            return None

    def boolean(self, node: Node, path: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            return bool(_scalar_value(node))
        message = f"expected true or false (without quotes), got {_node_text(node)!r}"
        self.problem(node, path, message)
        return None

    def text(self, node: Node, path: str, missing_hint: str = "") -> str | None:
        """A text scalar; a value YAML turned into a number, boolean, date or null is a problem."""
        if isinstance(node, ScalarNode) and node.tag == _STR:
            return str(node.value)
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            self.problem(node, path, f"no value given: write one{missing_hint}")
        elif isinstance(node, ScalarNode) and node.tag in _TYPE_WORDS:
            value = _scalar_value(node)
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            quoted = json.dumps(node.value)
            message = f"YAML reads {node.value} as {_TYPE_WORDS[node.tag]} {shown}, not the text"
            self.problem(node, path, f"{message} {quoted}: quote it, {quoted}")
        else:
            self.problem(node, path, f"expected text, got {_node_kind(node)}")
        return None


def _scalar_value(node: ScalarNode) -> object:
    return SafeConstructor().construct_object(node, deep=True)


def _node_text(node: Node) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else _node_kind(node)


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return f"{node.tag.rsplit(':', 1)[-1]} {node.value!r}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown(what: str, key: str, valid: Sequence[str]) -> str:
    return f"unknown {what} {key!r}; valid: {', '.join(valid)}{_did_you_mean(key, valid)}"


def _did_you_mean(word: str, candidates: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    folded = [c for c in candidates if c.lower() == word.lower()]
    best = folded or close
    return f" (did you mean {best[0]!r}?)" if best else ""


def _suggest_field(key: str) -> str | None:
    by_case = _fields_by_lowercase().get(key.lower())
    if by_case is not None:
        return by_case
    close = difflib.get_close_matches(key, _field_names(), n=1, cutoff=0.75)
    return close[0] if close else None


@cache
def _field_names() -> tuple[str, ...]:
    return tuple(sorted(PEER_FIELDS)) + tuple(k for k in keyword_dict if k)


@cache
def _fields_by_lowercase() -> dict[str, str]:
    return {name.lower(): name for name in _field_names()}


def ruleset_warnings(ruleset: RuleSet, destinations: Collection[str]) -> list[str]:
    """Things that are valid but probably not meant (for ``rules check``)."""
    warnings: list[str] = []
    if not ruleset.rules:
        warnings.append("there are no rules: every instance will be held (spooled, sent nowhere)")
    catch_all = next((r for r in ruleset.rules if r.stop and not r.conditions), None)
    if catch_all is not None:
        after = ruleset.rules[ruleset.rules.index(catch_all) + 1 :]
        warnings += [
            f"rule {r.name!r} ({r.origin}) can never apply: rule {catch_all.name!r} "
            f"({catch_all.origin}) matches every instance and stops"
            for r in after
        ]
    used = set(ruleset.destinations)
    warnings += [f"destination {d!r} is configured but no rule sends to it" for d in destinations
                 if d not in used]
    return warnings


def rules_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of one rule file; docs/rules.schema.json is a copy of it."""
    text = {"type": "string"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dicom-gateway rule file",
        "description": "Routing rules; see docs/rules.md. Files load in file-name order.",
        "type": "object",
        "additionalProperties": False,
        "properties": {"rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}}},
        "$defs": {
            "rule": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "destinations"],
                "properties": {
                    "name": {"type": "string", "pattern": RULE_NAME.pattern},
                    "description": text,
                    "match": {"$ref": "#/$defs/match"},
                    "destinations": {"type": "array", "items": text},
                    "stop": {"type": "boolean", "default": False},
                },
            },
            "match": {
                "type": "object",
                "description": "Every condition must hold. Fields: calling_ae, called_ae, "
                "source_ip, or a DICOM keyword.",
                "propertyNames": {"pattern": FIELD_NAME.pattern},
                "properties": {"source_ip": {"$ref": "#/$defs/ip_condition"}},
                "additionalProperties": {"$ref": "#/$defs/condition"},
            },
            "condition": _condition_schema("#/$defs/condition", with_cidr=False),
            "ip_condition": _condition_schema("#/$defs/ip_condition", with_cidr=True),
        },
    }


def _condition_schema(self_ref: str, *, with_cidr: bool) -> dict[str, Any]:
    text = {"type": "string"}
    operators: dict[str, Any] = {
        "regex": {**text, "description": "re.search: matches anywhere unless anchored"},
        "glob": {**text, "description": "fnmatch.fnmatchcase: the whole value, case-sensitive"},
        "in": {"type": "array", "items": text, "minItems": 1},
        "exists": {"type": "boolean", "description": "present with a non-empty value"},
        "not": {"$ref": self_ref},
    }
    if with_cidr:
        networks = {"type": "array", "items": text, "minItems": 1}
        operators["cidr"] = {"oneOf": [text, networks]}
    return {
        "oneOf": [
            {**text, "description": "exact match"},
            {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": operators,
            },
        ]
    }
