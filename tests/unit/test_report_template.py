"""The template drafter's wording and the key-image rendering for multimodal drafters."""

from __future__ import annotations

import numpy as np
import pytest
from test_report_evidence import chest_ct_header, chest_ct_job

from pacs_ai.analyze.volume import Volume
from pacs_ai.report.draft import UNVERIFIED_HEADER, draft_report
from pacs_ai.report.drafters.template import NORMAL_IMPRESSION, format_value, impression_from_findings_text
from pacs_ai.report.evidence import evidence_from_findings
from pacs_ai.report.guardrails import check_draft
from pacs_ai.report.images import render_key_images
from pacs_ai.report.quantitative import laa950_band


@pytest.mark.parametrize(
    ("percent", "band"),
    [
        (0.0, "normal"),
        (5.99, "normal"),
        (6.0, "mild"),
        (13.9, "mild"),
        (14.0, "moderate"),
        (24.9, "moderate"),
        (25.0, "severe"),
        (60.0, "severe"),
    ],
)
def test_laa950_bands(percent, band):
    assert laa950_band(percent).name == band


def test_values_are_printed_with_units_at_a_fixed_precision():
    assert format_value(2512.44, "mL") == "2512 mL"
    assert format_value(12.34, "mL") == "12.3 mL"
    assert format_value(-862.3, "[hnsf'U]") == "-862 HU"
    assert format_value(4.26, "%") == "4.3%"
    assert format_value(1500.0, "mm3") == "1.5 mL"


def test_report_wording():
    draft = draft_report(
        evidence_from_findings(chest_ct_header(), chest_ct_job(), prior_report="Old report.")
    )
    assert draft.backend == "template" and draft.guardrails.passed and draft.fallback_reason is None
    assert draft.text.splitlines()[0] == UNVERIFIED_HEADER
    findings = draft.findings.splitlines()
    assert findings[0] == "Examination: CT, CHEST. Patient: female, age band sixties."
    assert (
        findings[1] == "Right lung: volume 2512 mL, mean lung density -862 HU, %LAA-950 8.2%, Perc15 -934 HU."
    )
    assert findings[3].startswith("Both lungs: volume 4813 mL")
    assert (
        "6.7%, in keeping with mild emphysema-like low attenuation; bands depend on the CT protocol"
        in findings[4]
    )
    assert "Pneumothorax (left lung): AI-detected, unverified (probability 91%, threshold 50%)." in findings
    assert "Pleural effusion: not detected by AI (probability 12%, threshold 50%)." in findings
    assert "Segmentations (DICOM SEG): Right lung, Left lung." in findings
    assert "Prior report: supplied" in draft.findings
    assert draft.impression.splitlines() == [
        "AI-detected, unverified: Pneumothorax (left lung), probability 91%.",
        "Mild emphysema-like low attenuation on quantitative CT (%LAA-950 6.7%).",
        "Total lung volume 4813 mL.",
    ]


@pytest.mark.parametrize("laa", [2.0, 6.0, 15.0, 40.0])
@pytest.mark.parametrize("pneumothorax", [0.1, 0.9])
def test_template_drafts_always_pass_the_guardrails(laa, pneumothorax):
    evidence = evidence_from_findings(
        chest_ct_header(), chest_ct_job(laa_whole=laa, pneumothorax=pneumothorax)
    )
    draft = draft_report(evidence)
    assert check_draft(draft.findings, draft.impression, evidence).passed, draft.guardrails.reason


def test_no_results_is_said_plainly():
    draft = draft_report(evidence_from_findings(None, []))
    assert draft.findings == "No analyzer results are available for this study."
    assert draft.guardrails.passed


def test_extractive_impression():
    assert impression_from_findings_text("The lungs are clear. No pneumothorax or pleural effusion.") == (
        NORMAL_IMPRESSION
    )
    findings = "Heart size normal. Small left pleural effusion. Stable calcified granuloma. No pneumothorax."
    assert impression_from_findings_text(findings) == "Small left pleural effusion."


def test_key_image_of_a_ct_volume_is_the_middle_slice_in_lung_window():
    voxels = np.full((5, 4, 8), -1350, dtype=np.int16)
    voxels[2, :, 4:] = 150  # middle slice: right half at the window's top
    voxels[2, 0, 0] = -600  # the window centre
    volume = Volume(voxels, (1.0, 1.0, 0.5), (0.0, 0.0, 0.0), np.eye(3), [], [])
    (image,) = render_key_images(volume, max_size=64)
    assert image.mode == "RGB" and image.size == (64, 64)  # 8 x 0.5 mm by 4 x 1 mm: square in mm
    small = np.asarray(render_key_images(volume, max_size=16)[0])[:, :, 0]
    assert small[8, 0] == 0 and small[8, 15] == 255


def test_key_image_of_a_radiograph_keeps_its_display_values():
    voxels = np.linspace(0.0, 1.0, 20 * 10, dtype=np.float32).reshape(1, 20, 10)
    volume = Volume(voxels, (1.0, 0.2, 0.2), (0.0, 0.0, 0.0), np.eye(3), [], [])
    (image,) = render_key_images(volume, max_size=20)
    pixels = np.asarray(image)[:, :, 0]
    assert image.size == (10, 20) and pixels[0, 0] == 0 and pixels[-1, -1] == 255
