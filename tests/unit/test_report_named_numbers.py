"""A number written after a measurement's name must be that measurement's value, on the side stated.

Hand-written sentences against evidence built by the job runner's own
function from the lung analyzer's measurements (its names and codes: Volume,
Attenuation Coefficient (Mean), LAA950, PERC15).  The values are those of the
chest phantom in the integration tests, where every lung has a mean lung
density of -857 HU and a Perc15 of -869 HU: a small model once wrote the left
lung's Perc15 as -857 HU, which "any -857 HU of the evidence" let through.
"""

from __future__ import annotations

from test_report_evidence import LAA, PERC15, chest_ct_header, chest_ct_job

from pacs_ai.analyze.base import AlgorithmInfo, AnalysisResult, MeasurementSpec
from pacs_ai.analyze.lung import (
    DCM_ATTENUATION_COEFFICIENT,
    DCM_MORPHOLOGICAL_OPERATIONS,
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
from pacs_ai.report.drafters.template import TemplateDrafter
from pacs_ai.report.evidence import Evidence, evidence_from_findings
from pacs_ai.report.guardrails import check_draft, check_text, reference_names
from pacs_ai.report.text import find_numbers
from tests.drafter_models import model_report

#: (volume mL, mean lung density HU, %LAA-950, Perc15 HU) of the right lung, the left lung, both lungs.
PHANTOM = ((490.0, -856.95, 5.21, -869.0), (411.0, -857.36, 5.71, -869.0), (901.0, -857.14, 5.44, -869.0))


def lung_evidence(rows: tuple[tuple[float, float, float, float], ...] = PHANTOM) -> Evidence:
    """Evidence of the lung analyzer's twelve measurements with these values (rows as :data:`PHANTOM`)."""
    measurements = []
    for (segment, site), (volume, mean, laa, perc) in zip(
        ((1, SCT_RIGHT_LUNG), (2, SCT_LEFT_LUNG), (None, SCT_LUNG)), rows, strict=True
    ):
        measurements += [
            MeasurementSpec(SCT_VOLUME, volume, UCUM_ML, segment, site),
            MeasurementSpec(DCM_ATTENUATION_COEFFICIENT, mean, UCUM_HU, segment, site, derivation=SCT_MEAN),
            MeasurementSpec(LAA, laa, UCUM_PERCENT, segment, site),
            MeasurementSpec(PERC15, perc, UCUM_HU, segment, site),
        ]
    result = AnalysisResult(
        algorithm=AlgorithmInfo("pacs-ai CT chest lung", "1.0.0", DCM_MORPHOLOGICAL_OPERATIONS),
        labels=None,
        segments=[],
        measurements=measurements,
        findings=[],
    )
    return evidence_from_findings(None, [_findings(result)])


def reasons(text: str, evidence: Evidence) -> list[tuple[str, str]]:
    return [(v.check, v.message) for v in check_text(text, evidence).violations]


def test_names_come_from_the_measurement_and_the_analyzers_codes():
    by_label = {sorted(reference_names(m))[0]: reference_names(m) for m in lung_evidence().measurements[:4]}
    assert by_label["volume"] == {"volume"}
    assert {"mean lung density", "mld", "attenuation coefficient"} <= by_label["attenuation coefficient"]
    assert {"%laa-950", "laa-950", "laa950"} <= by_label["%laa-950"]
    assert {"perc15", "15th percentile of lung density"} <= by_label["15th percentile of lung density"]


def test_the_clause_before_a_number_is_kept_with_it():
    numbers = find_numbers("Left lung: volume 411 mL, mean lung density -857 HU and Perc15 -869 HU.")
    assert [n.lead for n in numbers] == [" volume ", " mean lung density ", " and Perc15 "]


def test_a_value_swapped_between_two_measurements_of_one_side_is_rejected():
    evidence = lung_evidence()
    moved = "Left lung: volume 411 mL, mean lung density -857 HU, %LAA-950 5.7%, Perc15 -857 HU."
    assert reasons(moved, evidence) == [
        ("numbers", "'-857 HU' is given for Perc15 of the left lung; the evidence has -869 HU")
    ]
    swapped = "Right lung: mean lung density -869 HU, Perc15 -857 HU."
    assert reasons(swapped, evidence) == [
        ("numbers", "'-869 HU' is given for mean lung density of the right lung; the evidence has -857 HU"),
        ("numbers", "'-857 HU' is given for Perc15 of the right lung; the evidence has -869 HU"),
    ]
    # Other names of the same measurements bind too.
    assert reasons("Left lung: MLD -869 HU; LAA950 5.7%.", evidence) == [
        ("numbers", "'-869 HU' is given for MLD of the left lung; the evidence has -857 HU")
    ]
    [(check, message)] = reasons("The 15th percentile of lung density is -857 HU.", evidence)
    assert check == "numbers" and message == (
        "'-857 HU' is given for 15th percentile of lung density; "
        "the evidence has -869 HU (right lung), -869 HU (left lung), -869 HU (both lungs)"
    )


def test_a_value_two_measurements_share_passes_for_either():
    # The left lung's mean lung density rounds to the same -869 HU as its Perc15.
    shared = lung_evidence(((490.0, -856.95, 5.21, -869.0), (411.0, -869.2, 5.71, -869.0), PHANTOM[2]))
    text = "Left lung: mean lung density -869 HU, Perc15 -869 HU. Right lung: Perc15 -869 HU."
    assert reasons(text, shared) == []
    # Every lung's Perc15 is -869 HU in the phantom: the same value on each side is no laterality slip.
    assert reasons("Perc15 -869 HU in the right lung and -869 HU in the left lung.", lung_evidence()) == []


def test_a_value_for_the_wrong_side_is_rejected():
    # The right lung's Perc15 (-880 HU) given for the left lung, whose mean lung density is -880 HU:
    # some -880 HU of the left lung exists, so only binding the name finds it.
    rows = ((490.0, -856.95, 5.21, -880.0), (411.0, -880.1, 5.71, -869.0), PHANTOM[2])
    assert reasons("Left lung: Perc15 -880 HU.", lung_evidence(rows)) == [
        ("numbers", "'-880 HU' is given for Perc15 of the left lung; the evidence has -869 HU")
    ]
    # A value only the other side has is the laterality check's (one violation, not two).
    assert reasons("Right lung: %LAA-950 5.7%.", lung_evidence()) == [
        (
            "laterality",
            "'5.7%' is stated for the right but is the value of "
            "Left lung Percentage of low attenuation area below -950 HU",
        )
    ]


def test_numbers_with_no_measurement_named_keep_the_value_rule():
    evidence = lung_evidence()
    assert reasons("Left lung: 411 mL, -857 HU and -869 HU.", evidence) == []
    # A name whose measurements have another unit binds nothing: the threshold in %LAA-950's name.
    assert reasons("%LAA-950 (voxels below -950 HU) of the left lung 5.7%.", evidence) == []
    [(check, message)] = reasons("Left lung: 412 mL.", evidence)
    assert check == "numbers" and message.startswith("'412 mL' matches no value in the evidence")


def test_probability_and_threshold_are_bound_to_their_names():
    evidence = evidence_from_findings(chest_ct_header(), chest_ct_job())  # pneumothorax 91%, threshold 50%
    assert reasons("Left pneumothorax (probability 91%, threshold 50%).", evidence) == []
    assert reasons("Left pneumothorax (probability 50%, threshold 91%).", evidence) == [
        (
            "numbers",
            "'50%' is given for probability of the left side; the evidence has 91% (pneumothorax), "
            "12% (pleural effusion)",
        ),
        (
            "numbers",
            "'91%' is given for threshold of the left side; the evidence has 50% (pneumothorax), "
            "50% (pleural effusion)",
        ),
    ]


def test_the_template_and_the_test_models_report_pass():
    for evidence in (lung_evidence(), evidence_from_findings(chest_ct_header(), chest_ct_job())):
        draft = TemplateDrafter().draft_report(evidence)
        assert check_draft(draft.findings, draft.impression, evidence).violations == ()
        assert check_text(model_report(evidence), evidence).violations == ()
