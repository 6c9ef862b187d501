"""The report as a FHIR R4 DiagnosticReport: status, codes, identifiers, AI marking, validation."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from pacs_ai.encode.fhir_report import (
    DICOM_UID_SYSTEM,
    VERIFICATION_TAG_SYSTEM,
    ReportFacts,
    build_diagnostic_report,
)
from pacs_ai.encode.report_sr import ReportText

DRAFT = ReportFacts(
    resource_id="pacs-ai-report-7",
    status="partial",
    study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    sr_instance_uid="1.2.826.0.1.3680043.8.498.2",
    patient_id="PAT-1",
    patient_id_issuer="HOSP",
    accession_number="ACC9",
    study_date="20260102",
    text=ReportText("Lungs clear <no effusion>.", "Normal chest & heart."),
    drafted_by="llm qwen2.5",
    issued=datetime(2026, 1, 2, 12, 0, tzinfo=UTC),
)


def test_draft_is_partial_marked_ai_and_unverified() -> None:
    report = build_diagnostic_report(DRAFT)
    assert report["status"] == "partial"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    assert report["meta"]["security"][0]["code"] == "AIAST"
    assert report["meta"]["tag"] == [
        {
            "system": VERIFICATION_TAG_SYSTEM,
            "code": "unverified",
            "display": "AI draft, not verified by a physician",
        }
    ]
    assert "resultsInterpreter" not in report
    assert report["conclusion"] == "Normal chest & heart."
    assert report["effectiveDateTime"] == "2026-01-02"


def test_study_patient_and_sr_are_referenced_by_identifier() -> None:
    report = build_diagnostic_report(DRAFT)
    assert report["imagingStudy"][0]["identifier"] == {
        "system": DICOM_UID_SYSTEM,
        "value": "urn:oid:1.2.826.0.1.3680043.8.498.1",
    }
    assert {"system": DICOM_UID_SYSTEM, "value": "urn:oid:1.2.826.0.1.3680043.8.498.2"} in report[
        "identifier"
    ]
    assert report["subject"]["identifier"]["value"] == "PAT-1"
    assert report["subject"]["identifier"]["assigner"] == {"display": "HOSP"}


def test_presented_form_carries_both_sections_and_the_narrative_is_escaped() -> None:
    report = build_diagnostic_report(DRAFT)
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode("utf-8")
    assert "FINDINGS:\nLungs clear <no effusion>." in text
    assert "IMPRESSION:\nNormal chest & heart." in text
    assert "&lt;no effusion&gt;" in report["text"]["div"]
    assert "<no effusion>" not in report["text"]["div"]


def test_final_names_the_radiologist_and_validates_as_r4() -> None:
    final = replace(DRAFT, status="final", signed_by="Doe^Jane", signed_by_login="jdoe")
    report = build_diagnostic_report(final)
    assert report["status"] == "final"
    assert report["resultsInterpreter"][0]["display"] == "Jane Doe"
    assert report["performer"][0]["display"] == "Jane Doe"
    assert report["meta"]["tag"][0]["code"] == "verified"
    parsed = DiagnosticReport.model_validate(report)
    assert parsed.status == "final"


def test_final_without_a_radiologist_is_refused() -> None:
    with pytest.raises(ValueError, match="signed_by"):
        build_diagnostic_report(replace(DRAFT, status="final"))


def test_an_invalid_resource_id_is_refused() -> None:
    with pytest.raises(ValueError, match="does not validate"):
        build_diagnostic_report(replace(DRAFT, resource_id="not valid!"))
