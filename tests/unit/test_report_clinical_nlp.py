"""The medspaCy reading of report text and the findings -> impression comparison, on the issue's cases."""

from __future__ import annotations

import pytest

from pacs_ai.report.clinical_nlp import read_text, split_sections
from pacs_ai.report.consistency import check_against_findings
from pacs_ai.report.vocabulary import VocabularyError, parse_vocabulary, vocabulary


def checks(impression: str, findings: str) -> list[str]:
    return sorted({v.check for v in check_against_findings(impression, findings)})


def test_the_vocabulary_has_200_concepts_in_a_hierarchy():
    vocab = vocabulary()
    assert len(vocab.concepts) >= 200
    assert {"airspace opacity", "lung opacity"} <= vocab.ancestors("consolidation")
    assert "consolidation" in vocab.descendants("lung opacity")
    for acute in ("pneumothorax", "pulmonary embolism", "aortic dissection", "pneumoperitoneum", "fracture"):
        assert "acute cardiopulmonary abnormality" in vocab.ancestors(acute)
    assert vocab.concepts["pneumonia"].may_follow_from == (
        "consolidation",
        "airspace opacity",
        "infiltration",
    )


def test_a_phrase_given_to_two_concepts_is_refused():
    with pytest.raises(VocabularyError, match="'effusion' is given to both"):
        parse_vocabulary({"concepts": {"a": {"synonyms": ["effusion"]}, "b": {"synonyms": ["effusion"]}}})
    with pytest.raises(VocabularyError, match="unknown concept 'nothing'"):
        parse_vocabulary({"concepts": {"a": {"is_a": ["nothing"]}}})


def test_context_qualifiers_are_read_per_concept():
    claims = read_text(
        "FINDINGS: No pneumothorax. Small right pleural effusion and large left pneumothorax. "
        "Possible right lower lobe consolidation. History of rib fracture. The effusion is unchanged."
    ).claims
    by = [(c.concept, c.present, set(c.sides), set(c.zones), set(c.severity), c.uncertain) for c in claims]
    assert by[0] == ("pneumothorax", False, set(), set(), set(), False)
    assert by[1] == ("pleural effusion", True, {"right"}, set(), {2}, False)
    assert by[2] == ("pneumothorax", True, {"left"}, set(), {4}, False)
    assert by[3] == ("consolidation", True, {"right"}, {"lower"}, set(), True)
    assert claims[4].historical and claims[5].time == {"stable"}


def test_the_issue_cases_are_caught():
    # Findings outside the old 23-term vocabulary.
    for added in ("Aortic dissection.", "Pulmonary embolism.", "Metastatic disease.", "Tuberculosis."):
        # Unsupported, or ruled out where "the lungs are clear" covers it (metastases are lung lesions).
        assert checks(f"No pneumothorax. {added}", "No pneumothorax. The lungs are clear.") in (
            ["unsupported"],
            ["negation"],
        )
    # Negation by a synonym.
    assert checks("Cardiomegaly.", "Heart size is normal. The lungs are clear.") == ["negation"]
    # A value given for the other side, equal to that side's value.
    findings = "Right pleural effusion measures 3 cm. Left pleural effusion measures 1 cm."
    assert checks("Left pleural effusion measuring 3 cm.", findings) == ["laterality"]
    # Bilateral turned into one side.
    assert checks("Small left pleural effusion.", "Small bilateral pleural effusions.") == ["laterality"]
    # Severity, certainty, time.
    assert checks("Large left pleural effusion.", "Small left pleural effusion.") == ["severity"]
    assert checks("Left pneumothorax.", "Possible small left pneumothorax.") == ["certainty"]
    assert checks("New left pleural effusion.", "Stable left pleural effusion.") == ["time"]
    # No acute abnormality over an acute finding.
    assert checks("No acute cardiopulmonary abnormality.", "Small right pneumothorax.") == ["negation"]


def test_faithful_impressions_pass():
    assert (
        checks("Right lower lobe consolidation, may represent pneumonia.", "Right lower lobe consolidation.")
        == []
    )
    assert checks("Left basilar airspace disease.", "Consolidation in the left lower lobe.") == []
    assert (
        checks("No acute cardiopulmonary abnormality.", "The heart is normal in size. The lungs are clear.")
        == []
    )
    assert (
        checks("Stable 8 mm right upper lobe nodule.", "Unchanged 0.8 cm nodule in the right upper lobe.")
        == []
    )
    assert checks("Possible small right pleural effusion.", "Small right pleural effusion.") == []


def test_pneumonia_follows_from_consolidation_only_hedged_and_on_its_side():
    findings = "Right lower lobe consolidation. No pleural effusion."
    assert checks("Right lower lobe pneumonia.", findings) == ["certainty"]
    assert checks("Right lower lobe consolidation concerning for pneumonia.", findings) == []
    assert checks("Left lower lobe pneumonia is possible.", findings) == ["laterality"]
    assert checks("Pneumonia.", "No focal consolidation. The lungs are clear.") == ["negation"]


def test_sections_are_split_by_their_titles():
    sections = split_sections("INDICATION: cough. FINDINGS: The lungs are clear. IMPRESSION: Normal chest.")
    assert sections == {
        "indication": "cough.",
        "findings": "The lungs are clear.",
        "impression": "Normal chest.",
    }
