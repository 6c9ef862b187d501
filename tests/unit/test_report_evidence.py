"""Evidence from job findings and headers, and the text reading the guardrails rely on."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from pacs_ai.analyze.base import (
    AlgorithmInfo,
    AnalysisResult,
    Code,
    FindingSpec,
    MeasurementSpec,
    SegmentSpec,
)
from pacs_ai.analyze.lung import (
    DCM_ATTENUATION_COEFFICIENT,
    DCM_MORPHOLOGICAL_OPERATIONS,
    LOCAL_SCHEME,
    SCT_ANATOMICAL_STRUCTURE,
    SCT_LEFT_LUNG,
    SCT_LUNG,
    SCT_MEAN,
    SCT_RIGHT_LUNG,
    SCT_VOLUME,
    UCUM_HU,
    UCUM_ML,
    UCUM_PERCENT,
)
from pacs_ai.jobs.run import _findings
from pacs_ai.report.evidence import (
    EvidenceError,
    age_band,
    evidence_from_findings,
    evidence_from_findings_text,
    patient_age_years,
    study_context,
)
from pacs_ai.report.text import find_mentions, find_numbers
from pacs_ai.report.vocabulary import term_for_name, term_patterns

LAA = Code("LAA950", LOCAL_SCHEME, "Percentage of low attenuation area below -950 HU")
PERC15 = Code("PERC15", LOCAL_SCHEME, "15th percentile of lung density")
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
EFFUSION = Code("60046008", "SCT", "Pleural effusion")


def chest_ct_job(laa_whole: float = 6.7, pneumothorax: float = 0.91, effusion: float = 0.12) -> dict:
    """The findings JSON the job runner stores, made by the runner's own function from an AnalysisResult."""
    rows = [
        (1, SCT_RIGHT_LUNG, 2512.4, -862.3, 8.23, -934.2),
        (2, SCT_LEFT_LUNG, 2301.0, -851.0, 5.1, -921.0),
        (None, SCT_LUNG, 4813.4, -857.0, laa_whole, -928.0),
    ]
    measurements = []
    for segment, site, volume, mean, laa, perc in rows:
        measurements += [
            MeasurementSpec(SCT_VOLUME, volume, UCUM_ML, segment, site),
            MeasurementSpec(DCM_ATTENUATION_COEFFICIENT, mean, UCUM_HU, segment, site, derivation=SCT_MEAN),
            MeasurementSpec(LAA, laa, UCUM_PERCENT, segment, site),
            MeasurementSpec(PERC15, perc, UCUM_HU, segment, site),
        ]
    result = AnalysisResult(
        algorithm=AlgorithmInfo("pacs-ai CT chest lung", "1.0.0", DCM_MORPHOLOGICAL_OPERATIONS),
        labels=None,
        segments=[
            SegmentSpec(1, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG),
            SegmentSpec(2, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG),
        ],
        measurements=measurements,
        findings=[
            FindingSpec(PNEUMOTHORAX, pneumothorax, 0.5, finding_site=SCT_LEFT_LUNG),
            FindingSpec(EFFUSION, effusion, 0.5),
        ],
    )
    return _findings(result)


def chest_ct_header() -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "CT CHEST WO"
    ds.PatientAge = "067Y"
    ds.PatientSex = "F"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-12345"
    return ds


def test_evidence_from_the_runners_findings_json():
    evidence = evidence_from_findings(chest_ct_header(), chest_ct_job(), prior_report="Prior: clear lungs.")
    assert evidence.context.modality == "CT" and evidence.context.age_band == "sixties"
    assert evidence.context.patient_sex == "F"
    assert len(evidence.measurements) == 12 and len(evidence.segments) == 2
    right_volume = evidence.measurements[0]
    assert (right_volume.name, right_volume.unit, right_volume.side) == ("Volume", "mL", "right")
    assert [m.side for m in evidence.measurements[8:]] == ["both"] * 4
    pneumothorax, effusion = evidence.findings
    assert pneumothorax.present and pneumothorax.side == "left" and pneumothorax.probability == 0.91
    assert not effusion.present and effusion.side is None
    assert evidence.algorithms == ("pacs-ai CT chest lung 1.0.0",)
    assert evidence.prior_report == "Prior: clear lungs."


def test_evidence_holds_no_direct_identifiers():
    text = repr(evidence_from_findings(chest_ct_header(), chest_ct_job()).to_dict())
    assert "Doe" not in text and "MRN-12345" not in text


def test_age_from_birth_date_when_patient_age_is_missing():
    ds = Dataset()
    ds.PatientBirthDate = "19580310"
    ds.StudyDate = "20250309"
    assert patient_age_years(ds) == 66
    ds.StudyDate = "20250310"
    assert patient_age_years(ds) == 67
    assert evidence_from_findings(ds, []).context.age_band == "sixties"


def _identifying_header() -> Dataset:
    ds = chest_ct_header()
    ds.StudyDescription = "CT CHEST for Doe^Jane MRN-12345 born 19580310"
    ds.SeriesDescription = "Jane Doe 1958-03-10"
    ds.PatientBirthDate = "19580310"
    ds.AccessionNumber = "ACC-998877"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "24627-2", "LN", "CT chest of Jane Doe"
    ds.ProcedureCodeSequence = [code]
    return ds


def test_only_the_allow_listed_header_facts_are_kept():
    context = study_context(_identifying_header())
    assert (context.modality, context.body_part, context.procedure_code) == ("CT", "CHEST", "24627-2 (LN)")
    assert (context.age_band, context.patient_sex, context.patient_age_years) == ("sixties", "F", None)
    text = repr(evidence_from_findings(_identifying_header(), chest_ct_job()).to_dict())
    for identifier in ("Doe", "Jane", "MRN-12345", "1958", "ACC-998877", "CT CHEST", "067"):
        assert identifier not in text


def test_the_allow_list_setting_shortens_the_context_and_refuses_unknown_fields():
    context = study_context(_identifying_header(), ["modality"])
    assert context == type(context)(modality="CT")
    with pytest.raises(ValueError, match="study_description"):
        study_context(_identifying_header(), ["modality", "study_description"])


def test_values_that_are_not_code_strings_are_left_out():
    ds = _identifying_header()
    ds.BodyPartExamined = "chest of Mrs Doe"
    ds.ProcedureCodeSequence[0].CodeValue = "Doe, Jane"
    context = study_context(ds)
    assert context.body_part is None and context.procedure_code is None


@pytest.mark.parametrize(
    ("years", "band"),
    [
        (0, "infant"),
        (11, "child"),
        (17, "adolescent"),
        (29, "young adult"),
        (67, "sixties"),
        (95, "ninety or older"),
    ],
)
def test_age_bands_are_words(years, band):
    assert age_band(years) == band


def test_malformed_findings_are_refused_with_the_entry_named():
    job = chest_ct_job()
    job["measurements"][0]["value"] = "n/a"
    with pytest.raises(EvidenceError, match="measurement 'Volume'.*not a number"):
        evidence_from_findings(None, job)
    with pytest.raises(EvidenceError, match="not a mapping"):
        evidence_from_findings(None, [["not", "a", "mapping"]])


def test_classifier_labels_map_to_vocabulary_terms():
    assert term_for_name("Effusion") == "pleural effusion"
    assert term_for_name("Pleural_Thickening") == "pleural thickening"
    assert term_for_name("Lung Opacity") == "lung opacity"
    assert term_for_name("Spleen lesion") == "spleen lesion"


@pytest.mark.parametrize(
    ("sentence", "negated"),
    [
        ("No pneumothorax.", True),
        ("There is no focal consolidation, pleural effusion, or pneumothorax.", True),
        ("No evidence of focal airspace disease, pleural effusion, or pneumothorax.", True),
        ("Pneumothorax is not seen.", True),
        ("Pneumothorax: not detected by AI (probability 12%).", True),
        ("Small left pneumothorax.", False),
        ("Pneumothorax cannot be excluded.", False),
        ("No pleural effusion, but a small pneumothorax is present.", False),
    ],
)
def test_negation_of_pneumothorax(sentence, negated):
    mentions = [m for m in find_mentions(sentence, term_patterns()) if m.term == "pneumothorax"]
    assert len(mentions) == 1
    assert mentions[0].negated is negated


@pytest.mark.parametrize(
    ("sentence", "side"),
    [
        ("Small left pleural effusion.", "left"),
        ("Right-sided pneumothorax.", "right"),
        ("Pleural effusion at the right base.", "right"),
        ("Bilateral pleural effusions.", "both"),
        ("Pleural effusion.", None),
    ],
)
def test_side_of_a_finding(sentence, side):
    (mention,) = find_mentions(sentence, term_patterns())
    assert mention.side == side


def test_numbers_with_units_precision_and_side():
    numbers = find_numbers(
        "Right lung: volume 2,512 mL, %LAA-950 4.3%, Perc15 -934 HU. Total 4.8 L; 15th percentile 3."
    )
    shown = [(n.text, n.value, n.unit, n.tolerance, n.side) for n in numbers]
    assert shown[0] == ("2,512 mL", 2512.0, "mL", 0.5, "right")
    assert shown[1][1:4] == (4.3, "%", pytest.approx(0.05))
    assert shown[2][1:3] == (-934.0, "HU")
    assert shown[3][1:4] == (4800.0, "mL", pytest.approx(50.0))
    # "15th", "LAA-950" and "Perc15" are names, not values; "Total" earlier in the sentence sets the side.
    assert shown[4] == ("3", 3.0, None, 0.5, "both")
    assert len(numbers) == 5


def test_numbered_list_markers_are_not_values():
    assert [n.text for n in find_numbers("1. Mild emphysema.\n2) Volume 12.5 mL.")] == ["12.5 mL"]


def test_evidence_from_findings_text():
    evidence = evidence_from_findings_text(
        "No pneumothorax. Small left pleural effusion. 5 mm nodule in the right upper lobe. Heart normal."
    )
    by_term = {f.term: f for f in evidence.findings}
    assert not by_term["pneumothorax"].present
    assert by_term["pleural effusion"].present and by_term["pleural effusion"].side == "left"
    assert by_term["nodule"].present
    assert [(m.value, m.unit) for m in evidence.measurements] == [(5.0, "mm")]
    assert evidence.source == "findings text"
