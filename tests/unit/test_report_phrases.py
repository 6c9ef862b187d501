"""Guardrails on words outside the vocabulary and on the words a finding is phrased with.

The matched IU X-ray probe set (tests/iu_probes.py) showed edits the concept reading let through: a side,
size or time word qualifying a structure the vocabulary does not know ("prosthetic left shoulder",
"nipple ring on right", "large chronic changes", "upper limits of normal but new"), a negation removed
where the findings state the concept in other words elsewhere ("No XXXX infiltrates" beside a persistent
infiltrate) or from a sentence naming no concept ("No displacement of the fissure"), a hedged reading of
a certain finding made definite ("rib deformities, possibly old fractures" -> "old fractures"), and
phrases the vocabulary lacked.  The sentences here are written for these tests."""

from __future__ import annotations

import pytest

from pacs_ai.report.consistency import check_against_findings


def checks(impression: str, findings: str) -> set[str]:
    return {v.check for v in check_against_findings(impression, findings)}


@pytest.mark.parametrize(
    ("findings", "faithful", "swapped"),
    [
        (
            "Prosthetic right shoulder. Loose body near the left shoulder.",
            "Prosthetic right shoulder.",
            "Prosthetic left shoulder.",
        ),
        (
            "Nipple marker on the left. Clear lungs.",
            "Nipple marker on the left.",
            "Nipple marker on the right.",
        ),
        (
            "The gastric bubble and cardiac apex are right-sided. Clear lungs.",
            "The gastric bubble and cardiac apex are right-sided.",
            "The gastric bubble and cardiac apex are left-sided.",
        ),
        (
            "Calcified bilateral hilar nodes, greater on the right.",
            "Calcified bilateral hilar nodes, greater on the right.",
            "Calcified bilateral hilar nodes, greater on the left.",
        ),
        (
            "Embolization material overlying the left upper quadrant. Clear lungs.",
            "Embolization material overlying the left upper quadrant.",
            "Embolization material overlying the right upper quadrant.",
        ),
    ],
)
def test_a_side_of_a_structure_outside_the_vocabulary_must_be_the_findings_side(
    findings: str, faithful: str, swapped: str
) -> None:
    assert not checks(faithful, findings)
    assert "laterality" in checks(swapped, findings)


def test_two_sides_named_in_one_phrase_keep_each_its_own_words():
    findings = "Clear left lung. In the right lower lobe there is a rounded density."
    assert not checks("Clear left lung. In the right lower lobe there is a rounded density.", findings)
    assert "laterality" in checks(
        "Clear right lung. In the left lower lobe there is a rounded density.", findings
    )


def test_a_side_phrase_matched_by_one_word_of_several_or_named_as_a_pair_is_left_open():
    # "chronic" alone (a time word, not a structure) ties nothing to the right basilar markings.
    findings = "Chronic appearing right basilar interstitial markings. The left lung is hyperlucent."
    assert "laterality" not in checks("Unchanged chronic appearance of the left lung.", findings)
    findings = "Two nodules in the left lower lobe. Another nodule near the right hilum."
    assert "laterality" not in checks("Nodules in both the left and right lungs.", findings)
    # A recommendation shares only words that name nothing ("may").
    findings = "Lucency under the right hemidiaphragm may represent free air."
    assert "laterality" not in checks("A left lateral decubitus view may be helpful.", findings)


def test_a_size_word_of_a_phrase_outside_the_vocabulary_must_be_the_findings_size():
    findings = "There are mild chronic changes without focal consolidation. No effusion."
    assert not checks("There are mild chronic changes without focal consolidation.", findings)
    assert not checks("Minimal chronic changes.", findings)  # trace ~ small
    assert "severity" in checks("There are large chronic changes without focal consolidation.", findings)


def test_a_time_word_of_a_phrase_outside_the_vocabulary_must_be_the_findings_course():
    findings = "Heart size is upper limits of normal but stable. No effusion."
    assert not checks("Heart size is upper limits of normal but stable.", findings)
    assert "time" in checks("Heart size is upper limits of normal but new.", findings)
    # "increased" describes the volumes, "stable" is their course: "new" is not it.
    findings = "Stable increased lung volumes consistent with emphysema."
    assert not checks("Stable increased lung volumes consistent with emphysema.", findings)
    assert "time" in checks("New increased lung volumes consistent with emphysema.", findings)
    # Ruled out, a time word states no course.
    assert "time" not in checks("No new increased lung volumes.", findings)


def test_a_sentence_naming_no_concept_keeps_the_findings_negation():
    findings = "Opacity in the right lower lobe. No displacement of the minor fissure."
    assert not checks("No displacement of the minor fissure.", findings)
    assert "negation" in checks("Displacement of the minor fissure.", findings)
    findings = "Displacement of the minor fissure. Clear lungs."
    assert "negation" in checks("No displacement of the minor fissure.", findings)
    # A negation after the words ("not seen") is one too; one of other words ("negative for
    # fracture") is not about them.
    assert not checks("Discrete projectile not seen.", "No discrete projectile visualized.")
    assert not checks("Right shoulder.", "Right shoulder: negative for dislocation.")


@pytest.mark.parametrize("qualifier", ["XXXX", "other", "additional"])
def test_a_negated_phrase_made_positive_is_caught_when_the_concept_is_stated_in_other_words(qualifier: str):
    findings = f"Persistent patchy infiltrate in the right middle lobe. No {qualifier} infiltrates."
    assert "negation" in checks(f"{qualifier.capitalize()} infiltrates.", findings)
    assert not checks("Persistent patchy infiltrate in the right middle lobe.", findings)
    assert not checks(f"Right middle lobe infiltrate. No {qualifier} infiltrates.", findings)


def test_a_hedged_reading_of_a_certain_finding_stays_hedged():
    findings = "Deformities of several left ribs are noted, possibly old fractures. Clear lungs."
    assert "certainty" in checks("Deformities of several left ribs are noted, old fractures.", findings)
    assert not checks("Deformities of several left ribs, possibly old fractures.", findings)
    findings = "A paraspinal foreign body is seen which may represent a bullet fragment."
    assert "certainty" in checks("Paraspinal foreign body which is a bullet fragment.", findings)
    assert not checks("Paraspinal foreign body.", findings)
    assert not checks("Paraspinal foreign body, possibly a bullet fragment.", findings)


@pytest.mark.parametrize(
    ("findings", "faithful", "unfaithful", "check"),
    [
        # "pleural air" is a pneumothorax.
        (
            "Bullae in both apices. No pleural air collection.",
            "No pleural air collection.",
            "Pleural air.",
            "negation",
        ),
        # "active pulmonary disease" is the acute summary, not any lung disease.
        (
            "Emphysema. No active pulmonary disease.",
            "Emphysema. No active pulmonary disease.",
            "Emphysema. Active pulmonary disease.",
            "unsupported",
        ),
        (
            "Probable nerve stimulator in the back.",
            "Probable nerve stimulator.",
            "Nerve stimulator.",
            "certainty",
        ),
        (
            "Mild haziness in the right lung. No effusion.",
            "Mild haziness in the right lung.",
            "Large haziness in the right lung.",
            "severity",
        ),
        (
            "Mild haziness in the right lung. No effusion.",
            "Mild haziness in the right lung.",
            "Mild haziness in the left lung.",
            "laterality",
        ),
        (
            "Stable chronic interstitial changes. Clear lungs otherwise.",
            "Stable chronic interstitial changes.",
            "New chronic interstitial changes.",
            "time",
        ),
        # An old granulomatous infection is granulomas, not a pneumonia supporting airspace disease.
        (
            "There is no focal airspace disease. Calcified nodules, old granulomatous infection.",
            "No focal airspace disease.",
            "Focal airspace disease.",
            "negation",
        ),
    ],
)
def test_phrases_the_vocabulary_now_knows(findings: str, faithful: str, unfaithful: str, check: str) -> None:
    assert not checks(faithful, findings)
    assert check in checks(unfaithful, findings)
