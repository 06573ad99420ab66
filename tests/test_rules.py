"""Loading and validating rule files: the example language, every problem with file and line, schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.errors import RulesError
from gateway.header import Header
from gateway.routing import Decision, route
from gateway.rules import (
    RuleFile,
    RuleProblem,
    RuleSetInvalid,
    compile_rules,
    fingerprint,
    load_rules,
    read_rule_files,
    rules_schema,
    ruleset_warnings,
)

REPO = Path(__file__).resolve().parent.parent
DESTINATIONS = ("PACS_TEST", "PACS_PROD")

EXAMPLE = """\
rules:
  - name: us-room3-commissioning
    match:
      calling_ae: US_ROOM3
      Modality: US
      StudyDescription: {regex: "(?i)phantom|qa"}
      PatientName: {glob: "TEST^*"}
      SOPClassUID: {in: ["1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"]}
      AccessionNumber: {exists: false}
      InstitutionName: {not: {glob: "*Clinic*"}}
      source_ip: {cidr: 10.20.0.0/16}
    destinations: [PACS_TEST]
    stop: true
  - name: everything-to-prod
    destinations: [PACS_PROD]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(text: str, destinations: tuple[str, ...] = DESTINATIONS) -> list[RuleProblem]:
    with pytest.raises(RuleSetInvalid) as caught:
        compile_rules([RuleFile(Path("rules/t.yaml"), text.encode())], destinations)
    assert caught.value.problems, "RuleSetInvalid without problems"
    return caught.value.problems


def only_problem(text: str, destinations: tuple[str, ...] = DESTINATIONS) -> RuleProblem:
    problems = problems_of(text, destinations)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_the_example_loads_and_routes(tmp_path: Path) -> None:
    write(tmp_path, "10-us-room3.yaml", EXAMPLE)
    rules = load_rules(tmp_path, DESTINATIONS)
    assert [r.name for r in rules.rules] == ["us-room3-commissioning", "everything-to-prod"]
    assert rules.files == (tmp_path / "10-us-room3.yaml",)
    assert rules.keywords == {
        "Modality", "StudyDescription", "PatientName", "SOPClassUID", "AccessionNumber",
        "InstitutionName",
    }
    assert rules.rules[0].origin == f"{tmp_path / '10-us-room3.yaml'}:2"
    phantom = Header(
        "US_ROOM3",
        "DICOMGW",
        "10.20.3.4",
        {
            "Modality": ("US",),
            "StudyDescription": ("Phantom QA",),
            "PatientName": ("TEST^Phantom",),
            "SOPClassUID": ("1.2.840.10008.5.1.4.1.1.6.1",),
            "InstitutionName": ("General Hospital",),
        },
    )
    assert route(phantom, rules) == Decision(("PACS_TEST",), ("us-room3-commissioning",))
    patient = Header("US_ROOM3", "DICOMGW", "10.20.3.4", {"Modality": ("US",)})
    assert route(patient, rules) == Decision(("PACS_PROD",), ("everything-to-prod",))


def test_files_load_in_name_order_and_only_yaml_files_count(tmp_path: Path) -> None:
    write(tmp_path, "20-b.yaml", "rules:\n  - name: b\n    destinations: [PACS_PROD]\n")
    write(tmp_path, "10-a.yml", "rules:\n  - name: a\n    destinations: [PACS_TEST]\n")
    write(tmp_path, "README.md", "not rules")
    write(tmp_path, ".hidden.yaml", "rules: [oops]")
    (tmp_path / "dir.yaml").mkdir()
    elsewhere = write(tmp_path / "dir.yaml", "30-c.yaml", "rules:\n  - name: c\n    destinations: []\n")
    os.symlink(elsewhere, tmp_path / "30-c.yaml")
    rules = load_rules(tmp_path, DESTINATIONS)
    assert [r.name for r in rules.rules] == ["a", "b", "c"]
    assert [p.name for p in rules.files] == ["10-a.yml", "20-b.yaml", "30-c.yaml"]


def test_an_empty_directory_or_file_is_valid_with_no_rules(tmp_path: Path) -> None:
    rules = load_rules(tmp_path, DESTINATIONS)
    assert rules.rules == () and rules.files == ()
    assert route(Header("A", "B", "127.0.0.1"), rules).held
    assert any("no rules" in w for w in ruleset_warnings(rules, DESTINATIONS))
    write(tmp_path, "00-empty.yaml", "# nothing yet\n")
    write(tmp_path, "01-empty-list.yaml", "rules:\n")
    assert load_rules(tmp_path, DESTINATIONS).rules == ()


def test_a_missing_rules_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(RuleSetInvalid) as caught:
        load_rules(tmp_path / "nope", DESTINATIONS)
    assert "does not exist" in str(caught.value)
    assert isinstance(caught.value, RulesError)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RuleSetInvalid, match="not a directory"):
        load_rules(tmp_path / "file", DESTINATIONS)


def test_fingerprint_follows_names_and_contents() -> None:
    a = RuleFile(Path("a.yaml"), b"rules: []\n")
    same = RuleFile(Path("/elsewhere/a.yaml"), b"rules: []\n")
    edited = RuleFile(Path("a.yaml"), b"rules: [] \n")
    renamed = RuleFile(Path("b.yaml"), b"rules: []\n")
    assert fingerprint([a]) == fingerprint([same])
    assert len({fingerprint([a]), fingerprint([edited]), fingerprint([renamed]), fingerprint([])}) == 4
    # a boundary between two files cannot be moved without changing the fingerprint
    split1 = [RuleFile(Path("a.yaml"), b"xy"), RuleFile(Path("b.yaml"), b"z")]
    split2 = [RuleFile(Path("a.yaml"), b"x"), RuleFile(Path("b.yaml"), b"yz")]
    assert fingerprint(split1) != fingerprint(split2)
    ruleset = compile_rules([a], DESTINATIONS)
    assert ruleset.fingerprint == fingerprint([a])


def rule_with(condition: str) -> str:
    return f"rules:\n  - name: r\n    match:\n      {condition}\n    destinations: [PACS_TEST]\n"


# (rule file text, line, column, field path, words the message must contain)
PROBLEMS = [
    pytest.param(
        "rules:\n  - name: r\n    destinations: [PACS_TST]\n",
        3, 20, "rules[0].destinations[0]",
        ["unknown destination 'PACS_TST'", "PACS_PROD, PACS_TEST", "did you mean 'PACS_TEST'"],
        id="unknown-destination",
    ),
    pytest.param(
        rule_with('StudyDescription: {regex: "(unclosed"}'),
        4, 33, "rules[0].match.StudyDescription.regex",
        ["invalid regex '(unclosed'", "missing )"],
        id="invalid-regex",
    ),
    pytest.param(
        rule_with("Modalty: US"), 4, 7, "rules[0].match.Modalty",
        ["unknown field 'Modalty'", "did you mean 'Modality'"],
        id="unknown-keyword",
    ),
    pytest.param(
        rule_with("modality: US"), 4, 7, "rules[0].match.modality", ["did you mean 'Modality'"],
        id="keyword-case",
    ),
    pytest.param(
        rule_with("StudyDescription: {regexp: x}"), 4, 26, "rules[0].match.StudyDescription.regexp",
        ["unknown operator 'regexp'", "regex, glob, in, exists, not, cidr"],
        id="unknown-operator",
    ),
    pytest.param(
        rule_with("BodyPartExamined: {glob: 'x*', regex: y}"), 4, 25,
        "rules[0].match.BodyPartExamined", ["exactly one operator", "glob, regex"],
        id="two-operators",
    ),
    pytest.param(
        rule_with("PatientID: 0123"), 4, 18, "rules[0].match.PatientID",
        ["YAML reads 0123 as the number 83", 'quote it, "0123"'],
        id="octal-number",
    ),
    pytest.param(
        rule_with("PatientID: 12345"), 4, 18, "rules[0].match.PatientID",
        ["the number 12345", 'quote it, "12345"'],
        id="number",
    ),
    pytest.param(
        rule_with("PatientID: 12:30"), 4, 18, "rules[0].match.PatientID",
        ["the number 750", 'quote it, "12:30"'],
        id="sexagesimal",
    ),
    pytest.param(
        rule_with("SliceThickness: 1.5"), 4, 23, "rules[0].match.SliceThickness",
        ["the number 1.5", 'quote it, "1.5"'],
        id="float",
    ),
    pytest.param(
        rule_with("Modality: NO"), 4, 17, "rules[0].match.Modality",
        ["YAML reads NO as the boolean false", 'quote it, "NO"'],
        id="boolean-no",
    ),
    pytest.param(
        rule_with("StationName: on"), 4, 20, "rules[0].match.StationName",
        ["the boolean true", 'quote it, "on"'],
        id="boolean-on",
    ),
    pytest.param(
        rule_with("StudyDate: 2024-01-05"), 4, 18, "rules[0].match.StudyDate",
        ["the date 2024-01-05", 'quote it, "2024-01-05"'],
        id="date",
    ),
    pytest.param(
        rule_with("SOPClassUID: {in: [1.2, '1.2.3']}"), 4, 26, "rules[0].match.SOPClassUID.in[0]",
        ["the number 1.2", 'quote it, "1.2"'],
        id="number-in-list",
    ),
    pytest.param(
        rule_with("AccessionNumber:"), 4, 23, "rules[0].match.AccessionNumber",
        ["no value given", "exists: false"],
        id="null-value",
    ),
    pytest.param(
        rule_with("Modality: [CT, MR]"), 4, 17, "rules[0].match.Modality", ["{in: [...]}"],
        id="plain-list",
    ),
    pytest.param(
        rule_with("source_ip: {cidr: 10.20.0.1/16}"), 4, 25, "rules[0].match.source_ip.cidr",
        ["invalid address or network '10.20.0.1/16'", "did you mean 10.20.0.0/16"],
        id="cidr-host-bits",
    ),
    pytest.param(
        rule_with("source_ip: {cidr: 10.300.0.0/16}"), 4, 25, "rules[0].match.source_ip.cidr",
        ["invalid address or network '10.300.0.0/16'"],
        id="cidr-invalid",
    ),
    pytest.param(
        rule_with("source_ip: somehost"), 4, 18, "rules[0].match.source_ip",
        ["invalid address or network 'somehost'"],
        id="source-ip-not-an-address",
    ),
    pytest.param(
        rule_with("StationName: {cidr: 10.0.0.0/8}"), 4, 27, "rules[0].match.StationName.cidr",
        ["cidr tests source_ip only"],
        id="cidr-on-keyword",
    ),
    pytest.param(
        rule_with("AccessionNumber: {exists: 'yes'}"), 4, 33, "rules[0].match.AccessionNumber.exists",
        ["true or false"],
        id="exists-not-boolean",
    ),
    pytest.param(
        rule_with("SOPClassUID: {in: []}"), 4, 25, "rules[0].match.SOPClassUID.in",
        ["non-empty list"],
        id="empty-in",
    ),
    pytest.param(
        rule_with("ReferencedStudySequence: x"), 4, 7, "rules[0].match.ReferencedStudySequence",
        ["sequence (SQ)"],
        id="sequence-keyword",
    ),
    pytest.param(
        rule_with("calling_ae: A_VERY_LONG_AE_TITLE_X"), 4, 19, "rules[0].match.calling_ae",
        ["longer than an AE title"],
        id="ae-too-long",
    ),
    pytest.param(
        rule_with("Modality: {}"), 4, 17, "rules[0].match.Modality", ["exactly one operator"],
        id="empty-operator",
    ),
    pytest.param(
        "rules:\n  - name: r\n    match:\n    destinations: [PACS_TEST]\n",
        3, 11, "rules[0].match", ["'match' is empty", "remove it to match every instance"],
        id="null-match",
    ),
    pytest.param(
        "rules:\n  - name: r\n    match: Modality\n    destinations: [PACS_TEST]\n",
        3, 12, "rules[0].match", ["mapping of field: condition"],
        id="match-not-a-mapping",
    ),
    pytest.param(
        "rules:\n  - name: r\n    destinations: PACS_TEST\n",
        3, 19, "rules[0].destinations", ["must be a list", "destinations: [PACS_TEST]"],
        id="destinations-not-a-list",
    ),
    pytest.param(
        "rules:\n  - name: r\n", 2, 5, "rules[0].destinations", ["missing 'destinations'"],
        id="missing-destinations",
    ),
    pytest.param(
        "rules:\n  - destinations: [PACS_TEST]\n", 2, 5, "rules[0].name", ["missing 'name'"],
        id="missing-name",
    ),
    pytest.param(
        "rules:\n  - name: 2024\n    destinations: []\n", 2, 11, "rules[0].name",
        ["the number 2024", 'quote it, "2024"'],
        id="numeric-name",
    ),
    pytest.param(
        "rules:\n  - name: us room 3\n    destinations: []\n", 2, 11, "rules[0].name",
        ["not a valid rule name"],
        id="bad-name",
    ),
    pytest.param(
        "rules:\n  - name: r\n    destinations: []\n    colour: red\n",
        4, 5, "rules[0].colour",
        ["unknown rule key 'colour'", "name, description, match, destinations, stop"],
        id="unknown-rule-key",
    ),
    pytest.param(
        "rule:\n  - name: r\n    destinations: []\n", 1, 1, "rule",
        ["unknown top-level key 'rule'", "did you mean 'rules'"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        "rules:\n  - name: r\n    destinations: []\n    stop: 'true'\n", 4, 11, "rules[0].stop",
        ["true or false"],
        id="stop-not-boolean",
    ),
    pytest.param(
        "rules:\n  - name: r\n    match: {Modality: US, Modality: CT}\n    destinations: []\n",
        3, 27, "rules[0].match.Modality", ["duplicate key (first at line 3)"],
        id="duplicate-key",
    ),
    pytest.param(
        "rules:\n  - name: [x\n    destinations: []\n", 3, 17, "",
        ["YAML syntax error", "flow sequence", "it began at line 2"],
        id="yaml-syntax",
    ),
    pytest.param(
        "rules:\n  - name: a\n\tdestinations: []\n", 3, 1, "", ["YAML syntax error", "tab"],
        id="yaml-tab",
    ),
    pytest.param(
        "rules:\n  - name: r\n    destinations: []\n    <<: {stop: true}\n", 4, 5, "rules[0]",
        ["merge keys (<<) are not supported"],
        id="merge-key",
    ),
    pytest.param(
        rule_with("Modality: &c {not: *c}"), 4, 17, "rules[0].match.Modality" + ".not" * 5,
        ["nested too deeply", "alias refers to itself"],
        id="recursive-alias",
    ),
    pytest.param("- name: r\n", 1, 1, "", ["top level must be a mapping"], id="top-level-list"),
    pytest.param("rules: r\n", 1, 8, "rules", ["must be a list of rules"], id="rules-not-a-list"),
    pytest.param("rules:\n  - r\n", 2, 5, "rules[0]", ["each rule must be a mapping"], id="rule-str"),
]


@pytest.mark.parametrize(("text", "line", "column", "field", "words"), PROBLEMS)
def test_each_problem_names_file_line_field_and_what_to_do(
    text: str, line: int, column: int, field: str, words: list[str]
) -> None:
    problem = only_problem(text)
    assert (problem.file, problem.line, problem.column, problem.field) == (
        Path("rules/t.yaml"), line, column, field
    )
    for word in words:
        assert word in problem.message
    shown = str(problem)
    assert shown.startswith(f"rules/t.yaml:{line}:{column}: ")
    assert field in shown


def test_unknown_destination_when_none_are_configured() -> None:
    problem = only_problem("rules:\n  - name: r\n    destinations: [PACS_PROD]\n", destinations=())
    assert "no destinations are configured" in problem.message


def test_yaml_1e3_is_text_not_a_number() -> None:
    rules = compile_rules([RuleFile(Path("t.yaml"), rule_with("PatientID: 1e3").encode())], DESTINATIONS)
    assert route(Header("A", "B", "::1", {"PatientID": ("1e3",)}), rules).matched == ("r",)


def test_quoted_values_are_text() -> None:
    text = rule_with('PatientID: "0123"') + "  - name: s\n    match: {Modality: 'NO'}\n    destinations: []\n"
    rules = compile_rules([RuleFile(Path("t.yaml"), text.encode())], DESTINATIONS)
    assert route(Header("A", "B", "::1", {"PatientID": ("0123",)}), rules).matched == ("r",)
    assert route(Header("A", "B", "::1", {"Modality": ("NO",)}), rules).matched == ("s",)


def test_not_utf8_is_a_problem() -> None:
    with pytest.raises(RuleSetInvalid) as caught:
        compile_rules([RuleFile(Path("t.yaml"), b"rules:\n  - name: \xff\n")], DESTINATIONS)
    (problem,) = caught.value.problems
    assert "not UTF-8" in problem.message and problem.file == Path("t.yaml")


def test_duplicate_rule_names_across_files_say_where_the_first_is(tmp_path: Path) -> None:
    write(tmp_path, "10-a.yaml", "rules:\n  - name: prod\n    destinations: [PACS_PROD]\n")
    write(tmp_path, "20-b.yaml", "# second\nrules:\n  - name: prod\n    destinations: []\n")
    with pytest.raises(RuleSetInvalid) as caught:
        load_rules(tmp_path, DESTINATIONS)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.field) == (tmp_path / "20-b.yaml", 3, "rules[0].name")
    assert f"first used at {tmp_path / '10-a.yaml'}:2" in problem.message


def test_every_problem_of_every_file_is_reported_at_once_in_order(tmp_path: Path) -> None:
    write(tmp_path, "10-a.yaml", "rules:\n  - name: a\n    match: {Modality: NO}\n    destinations: [X]\n")
    write(tmp_path, "20-b.yaml", "rules:\n  - name: [\n")
    write(
        tmp_path,
        "30-c.yaml",
        "rules:\n  - name: c\n    colour: red\n    match: {Modalty: CT}\n    destinations: [PACS_PROD]\n",
    )
    with pytest.raises(RuleSetInvalid) as caught:
        load_rules(tmp_path, DESTINATIONS)
    where = [(p.file.name, p.line) for p in caught.value.problems]
    assert where == [
        ("10-a.yaml", 3), ("10-a.yaml", 4), ("20-b.yaml", 3), ("30-c.yaml", 3), ("30-c.yaml", 4)
    ]
    message = str(caught.value)
    assert message.startswith("5 problem(s) in the rule files:")
    assert all(str(p) in message for p in caught.value.problems)


def test_a_thousand_rules_load_and_route_correctly(tmp_path: Path) -> None:
    lines = ["rules:"]
    for i in range(1000):
        lines += [
            f"  - name: r{i}",
            "    match:",
            f"      calling_ae: AE{i}",
            "      Modality: {in: [CT, MR]}",
            f"      StudyDescription: {{regex: '(?i)study{i}$'}}",
            f"    destinations: [{'PACS_TEST' if i % 2 else 'PACS_PROD'}]",
        ]
    lines += ["  - name: last", "    destinations: [PACS_PROD]"]
    write(tmp_path, "10-many.yaml", "\n".join(lines) + "\n")
    rules = load_rules(tmp_path, DESTINATIONS)
    assert len(rules.rules) == 1001
    hit = Header("AE777", "GW", "127.0.0.1", {"Modality": ("MR",), "StudyDescription": ("STUDY777",)})
    assert route(hit, rules) == Decision(("PACS_TEST", "PACS_PROD"), ("r777", "last"))
    near = Header("AE777", "GW", "127.0.0.1", {"Modality": ("MR",), "StudyDescription": ("study7770",)})
    assert route(near, rules) == Decision(("PACS_PROD",), ("last",))


def test_warnings_for_unreachable_rules_and_unused_destinations() -> None:
    text = (
        "rules:\n  - name: all\n    destinations: [PACS_TEST]\n    stop: true\n"
        "  - name: never\n    match: {Modality: CT}\n    destinations: [PACS_TEST]\n"
    )
    rules = compile_rules([RuleFile(Path("t.yaml"), text.encode())], DESTINATIONS)
    warnings = ruleset_warnings(rules, DESTINATIONS)
    assert any("'never'" in w and "can never apply" in w and "'all'" in w for w in warnings)
    assert any("'PACS_PROD' is configured but no rule sends to it" in w for w in warnings)
    assert not any("no rules" in w for w in warnings)


def test_read_rule_files_returns_exact_bytes_by_name(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", "rules: []\n")
    write(tmp_path, "a.yml", "# a\n")
    files = read_rule_files(tmp_path)
    assert [(f.path.name, f.content) for f in files] == [("a.yml", b"# a\n"), ("b.yaml", b"rules: []\n")]


def test_a_file_replaced_while_reading_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "10-a.yaml", "rules: []\n")
    write(tmp_path, "20-b.yaml", "# b\n")
    real_read_bytes = Path.read_bytes
    vanished: list[Path] = []

    def read_bytes_once_vanishing(path: Path) -> bytes:
        if path.name == "10-a.yaml" and not vanished:
            vanished.append(path)
            raise FileNotFoundError(path)
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes_once_vanishing)
    files = read_rule_files(tmp_path)
    assert vanished and [f.path.name for f in files] == ["10-a.yaml", "20-b.yaml"]


# --- shipped files and the schema -------------------------------------------------------------


def test_shipped_default_rules_send_everything_to_prod() -> None:
    rules = load_rules(REPO / "rules", DESTINATIONS)
    assert route(Header("ANY", "DICOMGW", "10.0.0.1"), rules).destinations == ("PACS_PROD",)


def test_demo_rules_send_us_demo_to_test_only_and_the_rest_to_prod() -> None:
    rules = load_rules(REPO / "gateway" / "demo" / "rules", DESTINATIONS)
    assert route(Header("US_DEMO", "DICOMGW", "127.0.0.1"), rules).destinations == ("PACS_TEST",)
    assert route(Header("CT_DEMO", "DICOMGW", "127.0.0.1"), rules).destinations == ("PACS_PROD",)


def test_docs_schema_file_is_rules_schema() -> None:
    on_disk = json.loads((REPO / "docs" / "rules.schema.json").read_text(encoding="utf-8"))
    assert on_disk == rules_schema(), "regenerate: dicom-gateway rules schema > docs/rules.schema.json"


def test_schema_is_valid_and_agrees_with_the_loader_on_examples() -> None:
    schema = rules_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in (REPO / "rules" / "00-default.yaml", REPO / "gateway/demo/rules/10-demo.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))))
    assert not list(validator.iter_errors(yaml.safe_load(EXAMPLE)))
    for bad in (
        "rules:\n  - name: r\n    destinations: PACS_TEST\n",
        "rules:\n  - name: r\n    match: {Modality: NO}\n    destinations: []\n",
        "rules:\n  - name: r\n    match: {Modality: {regexp: x}}\n    destinations: []\n",
        "rules:\n  - name: r\n    match: {StationName: {cidr: 10.0.0.0/8}}\n    destinations: []\n",
        "rules:\n  - destinations: []\n",
        "rule: []\n",
    ):
        assert list(validator.iter_errors(yaml.safe_load(bad))), bad
        with pytest.raises(RuleSetInvalid):
            compile_rules([RuleFile(Path("t.yaml"), bad.encode())], DESTINATIONS)
