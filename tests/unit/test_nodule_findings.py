"""A detector's nodules as findings: the job's findings JSON, the evidence, the template draft, guardrails.

The findings JSON is made by the job runner's own function from an
AnalysisResult, so the chain tested is the one a job takes.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_report_evidence import chest_ct_header

from pacs_ai.analyze.base import AlgorithmInfo, AnalysisResult, Code, DetectionSpec
from pacs_ai.analyze.monai_bundle import DCM_ARTIFICIAL_INTELLIGENCE, SCT_LEFT_LUNG, SCT_RIGHT_LUNG, box_side
from pacs_ai.analyze.volume import Volume
from pacs_ai.jobs.run import _findings
from pacs_ai.report.drafters.template import TemplateDrafter
from pacs_ai.report.evidence import evidence_from_findings
from pacs_ai.report.guardrails import check_draft, check_text
from pacs_ai.report.prompts import evidence_facts

NODULE = Code("27925004", "SCT", "Nodule")
MODEL = "Lung nodule CT detection"


def nodule(centre: tuple[float, float, float], size: float, score: float, site: Code | None) -> DetectionSpec:
    lo = tuple(c - size / 2 for c in centre)
    hi = tuple(c + size / 2 for c in centre)
    location = site.meaning.lower() if site else ""
    return DetectionSpec(NODULE, score, lo, hi, site, threshold=0.5, location=location)  # type: ignore[arg-type]


def detector_job(*detections: DetectionSpec, not_detected: tuple[Code, ...] = ()) -> dict:
    result = AnalysisResult(
        algorithm=AlgorithmInfo("nodules", "0.6.9", DCM_ARTIFICIAL_INTELLIGENCE),
        labels=None,
        segments=[],
        measurements=[],
        detections=list(detections),
        not_detected=list(not_detected),
        title=MODEL,
    )
    return _findings(result)


TWO = (
    nodule((-60.0, 10.0, 40.0), 12.0, 0.87, SCT_RIGHT_LUNG),
    nodule((55.0, -5.0, 80.0), 7.5, 0.61, SCT_LEFT_LUNG),
)


def test_each_detection_is_a_finding_with_size_score_and_site() -> None:
    job = detector_job(*TWO)
    assert [d["location"] for d in job["detections"]] == ["right lung", "left lung"]
    assert [d["diameter_mm"] for d in job["detections"]] == [12.0, 7.5]
    evidence = evidence_from_findings(None, job)
    nodules = [f for f in evidence.findings if f.kind == "detection"]
    assert [(f.term, f.present, f.side, f.size_mm, f.probability) for f in nodules] == [
        ("nodule", True, "right", 12.0, 0.87),
        ("nodule", True, "left", 7.5, 0.61),
    ]
    assert {f.model for f in nodules} == {MODEL}


def test_template_draft_states_every_nodule_and_passes_the_guardrails() -> None:
    evidence = evidence_from_findings(None, detector_job(*TWO))
    draft = TemplateDrafter().draft_report(evidence)
    assert draft.findings.splitlines()[0] == (
        f"2 pulmonary nodules detected by {MODEL} (AI-detected, unverified), "
        "largest 12.0 mm in the right lung."
    )
    assert "Right lung: pulmonary nodule 12.0 mm, score 87%." in draft.findings
    assert "Left lung: pulmonary nodule 7.5 mm, score 61%." in draft.findings
    assert draft.impression == "AI-detected, unverified: 2 pulmonary nodules, largest 12.0 mm (right lung)."
    assert check_draft(draft.findings, draft.impression, evidence).passed


def test_language_model_prompt_lists_each_nodule_and_their_number() -> None:
    facts = evidence_facts(evidence_from_findings(None, detector_job(*TWO)))
    assert "- Finding Nodule, site right lung: AI-detected (present) (size 12.0 mm, score 87%" in facts
    assert "- Finding Nodule, site left lung: AI-detected (present) (size 7.5 mm, score 61%" in facts
    assert f"- 2 pulmonary nodules detected by {MODEL}: state this number or every one of them" in facts


def test_a_nodule_on_the_midline_is_stated_without_a_side() -> None:
    evidence = evidence_from_findings(None, detector_job(*TWO, nodule((1.0, 0.0, 60.0), 20.0, 0.12, None)))
    draft = TemplateDrafter().draft_report(evidence)
    assert "Side undetermined: pulmonary nodule 20.0 mm, score 12%." in draft.findings
    assert draft.findings.startswith(f"3 pulmonary nodules detected by {MODEL} (AI-detected, unverified), ")
    assert "largest 20.0 mm." in draft.findings  # the largest has no site to name
    assert check_draft(draft.findings, draft.impression, evidence).passed


@pytest.mark.parametrize(
    ("text", "check", "says"),
    [
        # invented: one nodule too many, a size the model did not measure, a side it did not find
        ("3 pulmonary nodules, largest 12.0 mm.", "detections", "states 3 nodules; the evidence has 2"),
        ("Two pulmonary nodules, 12.0 mm and 14.0 mm.", "numbers", "'14.0 mm' matches no value"),
        ("2 pulmonary nodules, largest 12.0 mm. Left lung: nodule 12.0 mm.", "laterality", "right"),
        # the sides swapped, with the side after the number and before it (each value bound to its own lung)
        ("12.0 mm in the left lung and 7.5 mm in the right lung.", "laterality", "'12.0 mm' is stated for"),
        ("Left lung: 12.0 mm. Right lung: 7.5 mm.", "laterality", "'12.0 mm' is stated for the left"),
        ("A 7.5 mm nodule in the right upper lobe, a 12.0 mm one in the right lung.", "laterality", "7.5"),
        # dropped: fewer nodules than found, or one of them left out
        ("One pulmonary nodule of 12.0 mm.", "detections", "states 1 nodule; the evidence has 2"),
        ("A pulmonary nodule of 12.0 mm in the right lung.", "detections", "accounts for 1 of the 2"),
        ("No pulmonary nodules.", "negation", "negates nodule"),
    ],
)
def test_guardrails_flag_a_draft_that_invents_or_drops_a_nodule(text: str, check: str, says: str) -> None:
    evidence = evidence_from_findings(None, detector_job(*TWO))
    violations = [v for v in check_text(text, evidence).violations if v.check == check]
    assert violations and says in violations[0].message, check_text(text, evidence).violations


@pytest.mark.parametrize(
    "text",
    [
        "Two pulmonary nodules, the larger 12.0 mm.",
        "Pulmonary nodules of 12.0 mm and 7.5 mm.",
        "2 lung nodules: right lung 12.0 mm, left lung 7.5 mm.",
        # the side after the number governs it, not the side word of the clause before (issue 22)
        "12.0 mm in the right lung and 7.5 mm in the left lung.",
        "Nodules of 12.0 mm in the right lung and 7.5 mm in the left lung.",
        "Left lung: 7.5 mm. Right lung: 12.0 mm.",
        "A 12.0 mm nodule in the right lower lobe and a 7.5 mm nodule in the left upper lobe.",
        "Right lung 12.0 mm and left lung 7.5 mm.",
    ],
)
def test_guardrails_accept_faithful_wordings(text: str) -> None:
    evidence = evidence_from_findings(None, detector_job(*TWO))
    assert check_text(text, evidence).passed, check_text(text, evidence).violations


def test_no_nodule_is_reported_absent_unless_the_profile_asks() -> None:
    silent = evidence_from_findings(None, detector_job())
    assert not silent.findings
    draft = TemplateDrafter().draft_report(silent)
    assert "nodule" not in (draft.findings + draft.impression).lower()
    # The detector ran: the draft says so (not "no analyzer results"), stating no finding either way.
    assert draft.findings == draft.impression == "AI analysis ran on this study and reported no findings."
    assert check_draft(draft.findings, draft.impression, silent).passed
    assert evidence_facts(silent).startswith("- AI analysis ran on this study and reported no findings.")
    with_context = TemplateDrafter().draft_report(evidence_from_findings(chest_ct_header(), detector_job()))
    assert with_context.findings.splitlines()[-1] == "AI analysis ran on this study and reported no findings."

    asked = evidence_from_findings(None, detector_job(not_detected=(NODULE,)))
    draft = TemplateDrafter().draft_report(asked)
    assert draft.findings == draft.impression == f"No pulmonary nodules detected by {MODEL}."
    assert check_draft(draft.findings, draft.impression, asked).passed
    invented = check_text("A 5 mm pulmonary nodule.", asked).checks_failed()
    assert {"numbers", "negation"} <= invented


def test_box_side_is_the_patients_side_of_the_body_midline() -> None:
    # Axial slices, rows along +x: the body (40 HU) spans x = -100..+60 mm, so the midline is x = -20.
    voxels = np.full((4, 8, 64), -1000.0)
    voxels[:, :, 0:41] = 40.0
    volume = Volume(
        voxels=voxels,
        spacing_mm=(5.0, 4.0, 4.0),
        origin_mm=(-100.0, 0.0, 0.0),
        direction=np.eye(3),
        headers=[],
        paths=[],
    )
    assert box_side(volume, (-60.0, 10.0, 5.0)) == "right"  # LPS: -x is the patient's right
    assert box_side(volume, (10.0, 10.0, 5.0)) == "left"
    assert box_side(volume, (-22.0, 10.0, 5.0)) is None  # on the midline
    volume.voxels[:] = -1000.0
    assert box_side(volume, (-60.0, 10.0, 5.0)) is None  # no body on that slice
