"""Guardrail readings the real IU X-ray edits showed were missing: side, zone and certainty bound to one
finding, sides of a sentence, changes stated of no concept, sentence ends, phrasings of cardiomegaly."""

from __future__ import annotations

import pytest

from pacs_ai.report.consistency import check_against_findings

CLEAR = "The heart is normal in size. The lungs are clear. No pneumothorax or pleural effusion."


def checks(impression: str, findings: str) -> set[str]:
    return {v.check for v in check_against_findings(impression, findings)}


def test_a_sentence_ended_by_two_full_stops_ends_there():
    assert checks("No acute cardiopulmonary abnormality.. Small left pneumothorax.", CLEAR)
    assert not checks("No acute cardiopulmonary abnormality..", CLEAR)


def test_side_zone_and_certainty_must_hold_for_one_finding():
    findings = "There is a 3 cm mass in the right upper lobe. A mass on the left cannot be excluded."
    assert "laterality" in checks("Left upper lobe mass.", findings)
    assert not checks("Right upper lobe mass.", findings)


def test_an_unsided_finding_in_a_one_sided_sentence_keeps_the_findings_side():
    findings = "Irregularity of the posterior right 6th rib with underlying pleural thickening."
    assert "laterality" in checks("Irregularity of the left 6th rib with pleural thickening.", findings)
    assert not checks("Irregularity of the right 6th rib with pleural thickening.", findings)


@pytest.mark.parametrize(
    ("impression", "flagged"),
    [
        ("New appearance of the chest.", True),
        ("Worsened appearance of the chest.", True),
        ("Stable appearance of the chest.", False),
        ("No new abnormality.", False),
        ("New normal chest.", True),
    ],
)
def test_a_change_stated_of_no_concept_needs_something_new(impression: str, flagged: bool):
    findings = "Stable right upper lobe scarring. " + CLEAR
    assert ("time" in checks(impression, findings)) is flagged


def test_a_summary_may_not_turn_chronic_into_new():
    findings = "Hyperexpansion of the lungs suggestive of chronic emphysematous lung disease."
    assert "time" in checks("Possible new emphysematous lung disease.", findings)
    assert "time" not in checks("Possible chronic emphysematous lung disease.", findings)


def test_a_leading_grade_before_a_comma_grades_the_finding_and_a_slash_shares_the_words():
    findings = "Mild bibasilar atelectasis/airspace disease."
    assert "severity" in checks("Large, bibasilar airspace disease.", findings)
    assert not checks("Mild, bibasilar airspace disease.", findings)
    assert not checks("Mild bibasilar airspace disease.", findings)


def test_the_heart_described_as_enlarged_is_cardiomegaly_with_its_grade():
    findings = "Heart size is mildly enlarged. The lungs are clear."
    assert not checks("Mild cardiomegaly.", findings)
    assert "severity" in checks("Moderate cardiomegaly.", findings)
    assert "negation" in checks("No cardiomegaly.", findings)


def test_a_normal_mediastinum_does_not_rule_out_cardiomegaly():
    findings = "The heart is moderately enlarged. The mediastinum is normal."
    assert not checks("Moderate cardiomegaly.", findings)


def test_atelectasis_may_be_suggested_from_an_opacity_only_hedged():
    findings = "Left basilar patchy opacities."
    assert not checks("Left basilar patchy opacities, which may represent atelectasis.", findings)
    assert "certainty" in checks("Left basilar atelectasis.", findings)


def test_a_pertinent_negative_follows_from_ruling_out_its_finding():
    assert not checks("No evidence of pneumonia.", "No focal consolidation. No pleural effusion.")
    assert "unsupported" in checks("No evidence of pneumonia.", "The heart is normal in size.")
    assert checks("No evidence of pneumonia.", "Right lower lobe consolidation.")
    assert checks(
        "No evidence of pneumonia.", "No consolidation on the left. Right lower lobe consolidation."
    )


def test_an_interpretation_of_an_opacity_shares_its_zone():
    findings = "Persistent right basilar opacity, likely atelectasis. No pleural effusion."
    assert not checks("Possible right basilar atelectasis.", findings)
    assert "location" in checks("Possible right upper lobe atelectasis.", findings)
