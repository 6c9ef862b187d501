"""Routing rules: every operator, every combinator, validation messages, fallback and shadow rules."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError
from pydicom import Dataset

from pacs_ai.route.rules import (
    Condition,
    OffPeakWindow,
    RoutingFacts,
    Rule,
    RulesError,
    evaluate_rules,
    facts_from_dataset,
    find_rules_file,
    load_rules,
)

CONDITION = TypeAdapter(Condition)

FACTS = RoutingFacts(
    attributes={
        "Modality": "CT",
        "BodyPartExamined": "CHEST",
        "SeriesDescription": "Thorax 1.0 B60f",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SliceThickness": 1.0,
        "ContrastBolusAgent": "",
    },
    calling_ae_title="CT_SCANNER_1",
    peer_address="10.1.2.3",
)


def holds(spec: object, facts: RoutingFacts = FACTS) -> bool:
    return CONDITION.validate_python(spec).evaluate(facts).holds


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"attribute": "Modality", "equals": "CT"}, True),
        ({"attribute": "Modality", "equals": "MR"}, False),
        ({"attribute": "Modality", "equals": "ct"}, False),  # code strings are case-sensitive
        ({"attribute": "BodyPartExamined", "in": ["THORAX", "CHEST"]}, True),
        ({"attribute": "BodyPartExamined", "in": ["HEAD"]}, False),
        ({"attribute": "SeriesDescription", "regex": "(?i)thorax"}, True),
        ({"attribute": "SeriesDescription", "regex": "^Lung"}, False),
        ({"attribute": "ImageType", "equals": "AXIAL"}, True),  # any value of a multi-valued attribute
        ({"attribute": "ImageType", "regex": "LOCALIZER"}, False),
        ({"attribute": "SliceThickness", "range": {"max": 2.5}}, True),
        ({"attribute": "SliceThickness", "range": {"min": 2.0, "max": 5.0}}, False),
        ({"attribute": "SliceThickness", "equals": 1.0}, True),
        ({"attribute": "ContrastBolusAgent", "exists": True}, False),  # present but empty
        ({"attribute": "ContrastBolusAgent", "exists": False}, True),
        ({"attribute": "PatientAge", "exists": False}, True),
        ({"attribute": "PatientAge", "regex": "."}, False),  # missing never matches a value test
        ({"calling_ae": ["CT_SCANNER_1", "CT_SCANNER_2"]}, True),
        ({"calling_ae": ["MR_1"]}, False),
        ({"peer_address": ["10.1.0.0/16"]}, True),
        ({"peer_address": ["10.1.2.3"]}, True),
        ({"peer_address": ["192.168.0.0/24", "fd00::/8"]}, False),
    ],
)
def test_operators(spec: object, expected: bool) -> None:
    assert holds(spec) is expected


def test_unknown_sender_matches_no_sender_condition() -> None:
    anonymous = RoutingFacts(attributes={"Modality": "CT"})
    assert not holds({"calling_ae": ["CT_SCANNER_1"]}, anonymous)
    assert not holds({"peer_address": ["0.0.0.0/0"]}, anonymous)


def test_combinators() -> None:
    ct = {"attribute": "Modality", "equals": "CT"}
    mr = {"attribute": "Modality", "equals": "MR"}
    assert holds({"all": [ct, {"attribute": "BodyPartExamined", "equals": "CHEST"}]})
    assert not holds({"all": [ct, mr]})
    assert holds({"any": [mr, ct]})
    assert not holds({"any": [mr, {"calling_ae": ["X"]}]})
    assert holds({"not": mr})
    assert not holds({"not": ct})
    assert holds({"all": [ct, {"not": {"any": [mr, {"attribute": "ImageType", "equals": "LOCALIZER"}]}}]})


def test_verdict_explains_each_test() -> None:
    condition = CONDITION.validate_python(
        {
            "all": [
                {"attribute": "Modality", "equals": "CT"},
                {"not": {"attribute": "SliceThickness", "range": {"min": 3}}},
            ]
        }
    )
    verdict = condition.evaluate(FACTS)
    assert verdict.holds
    assert verdict.reasons[0] == "Modality equals CT: yes (CT)"
    assert any("SliceThickness in range [3.0, ]: no (1.0)" in reason for reason in verdict.reasons)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"attribute": "Modallity", "equals": "CT"}, "not a DICOM attribute keyword"),
        ({"attribute": "Modality", "equals": "CT", "regex": "C"}, "exactly one of"),
        ({"attribute": "Modality"}, "exactly one of"),
        ({"attribute": "Modality", "regex": "(unclosed"}, "invalid regular expression"),
        ({"attribute": "Modality", "range": {"min": 1}}, "not numeric"),
        ({"attribute": "SliceThickness", "range": {}}, "needs min, max or both"),
        ({"attribute": "SliceThickness", "range": {"min": 5, "max": 1}}, "above max"),
        ({"peer_address": ["not-an-ip"]}, "not an IP address"),
    ],
)
def test_invalid_conditions_say_what_is_wrong(spec: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CONDITION.validate_python(spec)


def rule(name: str, **fields: object) -> Rule:
    return Rule.model_validate({"name": name, "actions": [{"process": "p"}], **fields})


def test_fallback_applies_only_when_nothing_else_matched() -> None:
    chest = rule("chest", when={"attribute": "BodyPartExamined", "equals": "CHEST"})
    head = rule("head", when={"attribute": "BodyPartExamined", "equals": "HEAD"})
    fallback = Rule.model_validate(
        {"name": "rest", "fallback": True, "actions": [{"discard": "unsupported"}]}
    )

    decision = evaluate_rules([fallback, chest, head], FACTS)
    assert [r.name for r in decision.applied] == ["chest"]

    decision = evaluate_rules([fallback, head], FACTS)
    assert [r.name for r in decision.applied] == ["rest"]
    assert "rest [fallback]: matches" in decision.explain()


def test_shadow_rules_are_reported_but_not_applied() -> None:
    live = rule("live", when={"attribute": "Modality", "equals": "CT"})
    trial = rule("trial", when={"attribute": "Modality", "equals": "CT"}, shadow=True)
    fallback = Rule.model_validate({"name": "rest", "fallback": True, "actions": [{"discard": "x"}]})
    decision = evaluate_rules([trial, fallback], FACTS)
    # A shadow match must not stop the fallback: the shadow rule changes nothing.
    assert [r.name for r in decision.applied] == ["rest"]
    assert [r.name for r in decision.shadowed] == ["trial"]
    decision = evaluate_rules([live, trial], FACTS)
    assert [r.name for r in decision.applied] == ["live"]


def test_disabled_rules_and_other_triggers_are_skipped() -> None:
    disabled = rule("off", when={"attribute": "Modality", "equals": "CT"}, enabled=False)
    per_study = rule("study", when={"attribute": "Modality", "equals": "CT"}, trigger="study")
    assert evaluate_rules([disabled, per_study], FACTS, trigger="series").applied == []
    assert [r.name for r in evaluate_rules([per_study], FACTS, trigger="study").applied] == ["study"]
    # Without a trigger (what the router does once the study is quiet) both kinds are evaluated.
    assert [r.name for r in evaluate_rules([disabled, per_study], FACTS).applied] == ["study"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give 'when' conditions, or 'fallback: true'"),
        ({"fallback": True, "when": {"attribute": "Modality", "equals": "CT"}}, "drop 'when'"),
        (
            {
                "when": {"attribute": "Modality", "equals": "CT"},
                "actions": [{"discard": "x"}, {"process": "p"}],
            },
            "cannot be combined",
        ),
        ({"when": {"attribute": "Modality", "equals": "CT"}, "priority": "urgent"}, "priority"),
        ({"when": {"attribute": "Modality", "equals": "CT"}, "actions": [{"notify": "ftp://x"}]}, "notify"),
    ],
)
def test_invalid_rules(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Rule.model_validate({"name": "r", "actions": [{"process": "p"}], **fields})


def test_off_peak_window_wraps_midnight() -> None:
    night = OffPeakWindow(start=time(20, 0), end=time(6, 0))
    assert night.contains(time(23, 30)) and night.contains(time(5, 59))
    assert not night.contains(time(6, 0)) and not night.contains(time(12, 0))
    lunch = OffPeakWindow(start=time(12, 0), end=time(13, 0))
    assert lunch.contains(time(12, 30)) and not lunch.contains(time(13, 0))


def test_load_rules_file(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        """
off_peak: {start: "22:00", end: "05:00"}
rules:
  - name: chest-ct
    when:
      all:
        - {attribute: Modality, equals: CT}
        - not: {attribute: ImageType, regex: LOCALIZER}
    actions: [{process: ct-chest-lungs}, {forward_results: [pacs]}]
  - name: rest
    fallback: true
    actions: [{discard: "no AI service for this series"}]
""",
        encoding="utf-8",
    )
    path = find_rules_file(tmp_path)
    assert path == tmp_path / "rules.yaml"
    rules = load_rules(path)
    assert [r.name for r in rules.rules] == ["chest-ct", "rest"]
    assert rules.off_peak.start == time(22, 0)


def test_load_rules_reports_every_problem_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        """
rules:
  - name: a
    when: {attribute: Modallity, equals: CT}
    actions: [{process: p}]
  - name: a
    fallback: true
    actions: [{discard: x}]
""",
        encoding="utf-8",
    )
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    assert str(path) in str(raised.value)
    assert "Modallity" in str(raised.value)
    path.write_text("rules: [\n", encoding="utf-8")
    with pytest.raises(RulesError, match="cannot read YAML"):
        load_rules(path)
    assert find_rules_file(tmp_path / "nowhere") is None


def test_facts_from_a_dicom_header() -> None:
    dataset = Dataset()
    dataset.Modality = "CT"
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    dataset.SliceThickness = "1.25"
    dataset.PatientName = "Doe^Jane"
    dataset.ReferencedImageSequence = [Dataset()]
    facts = facts_from_dataset(dataset, calling_ae_title="CT1", peer_address="127.0.0.1")
    assert facts.attributes["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert "ReferencedImageSequence" not in facts.attributes
    assert holds({"attribute": "SliceThickness", "range": {"min": 1.0, "max": 1.5}}, facts)
    assert holds({"all": [{"calling_ae": ["CT1"]}, {"peer_address": ["127.0.0.0/8"]}]}, facts)
