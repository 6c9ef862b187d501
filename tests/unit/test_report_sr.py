"""TID 2000 draft and signed report SRs: structure, flags, observers, predecessor, evidence, identities.

Built in memory from header-only synthetic CT datasets (no files, no peers);
the validators run in ``tests/integration/test_report_sr_validation.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydicom import Dataset
from pydicom.uid import EnhancedSRStorage

from pacs_ai.encode.equipment import EquipmentInfo
from pacs_ai.encode.report_sr import (
    DraftingModel,
    ReportText,
    Verifier,
    build_draft_sr,
    build_signed_sr,
    draft_sr_uids,
    read_report_text,
    signed_sr_uids,
)
from tests.integration.synthetic_ct import make_ct_series

PREFIX = "1.2.826.0.1.3680043.8.498.77."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")
DRAFTER = DraftingModel("llm", "qwen2.5-0.5b-instruct-q4")
TEXT = ReportText(
    findings="Right lung volume 2400 mL.\nLeft lung volume 2100 mL.\n\nNo focal consolidation.",
    impression="No acute cardiopulmonary abnormality.",
)
VERIFIED_AT = datetime(2026, 3, 4, 10, 30, 15, tzinfo=UTC)


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodingSchemeDesignator, code.CodeValue)


def _children(item: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    return [child for child in item.ContentSequence if _concept(child) == concept]


@pytest.fixture(scope="module")
def evidence() -> list[Dataset]:
    return make_ct_series(n_slices=4, rows=16, columns=16, with_pixels=False)


@pytest.fixture(scope="module")
def draft(evidence: list[Dataset]) -> Dataset:
    series_uid, sop_uid = draft_sr_uids("study|report|job-1", 1, PREFIX)
    return build_draft_sr(
        evidence=evidence,
        text=TEXT,
        drafter=DRAFTER,
        equipment=EQUIPMENT,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        uid_prefix=PREFIX,
    )


@pytest.fixture(scope="module")
def signed(draft: Dataset) -> Dataset:
    series_uid, sop_uid = signed_sr_uids(str(draft.SOPInstanceUID), PREFIX)
    return build_signed_sr(
        draft,
        text=ReportText(TEXT.findings + "\n\nEdited by the radiologist.", TEXT.impression),
        drafter=DRAFTER,
        verifier=Verifier("Doe^Jane", "jdoe", "Test Hospital", VERIFIED_AT),
        equipment=EQUIPMENT,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        uid_prefix=PREFIX,
    )


def test_draft_is_an_unverified_preliminary_partial_enhanced_sr(draft: Dataset) -> None:
    assert draft.SOPClassUID == EnhancedSRStorage
    assert (draft.CompletionFlag, draft.VerificationFlag, draft.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert "VerifyingObserverSequence" not in draft
    assert "PredecessorDocumentsSequence" not in draft
    assert draft.SeriesDescription == "AI draft report (unverified)"


def test_draft_content_follows_tid_2000(draft: Dataset) -> None:
    assert _concept(draft) == ("LN", "18748-4")
    assert draft.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert draft.ContentTemplateSequence[0].MappingResource == "DCMR"
    language = _children(draft, ("DCM", "121049"))
    assert [item.ConceptCodeSequence[0].CodeValue for item in language] == ["en"]
    findings = _children(draft, ("LN", "59776-5"))
    impressions = _children(draft, ("LN", "19005-8"))
    assert len(findings) == len(impressions) == 1
    finding_texts = [item.TextValue for item in _children(findings[0], ("DCM", "121071"))]
    # One TEXT per paragraph, lines kept with DICOM's CR LF.
    assert finding_texts == [
        "Right lung volume 2400 mL.\r\nLeft lung volume 2100 mL.",
        "No focal consolidation.",
    ]
    assert [item.TextValue for item in _children(impressions[0], ("DCM", "121073"))] == [TEXT.impression]


def test_draft_observer_is_the_drafting_device_and_no_person(draft: Dataset) -> None:
    context = [item for item in draft.ContentSequence if item.RelationshipType == "HAS OBS CONTEXT"]
    observer_types = [
        item.ConceptCodeSequence[0].CodeValue for item in context if _concept(item) == ("DCM", "121005")
    ]
    assert observer_types == ["121007"]  # Device only
    names = [item.TextValue for item in context if _concept(item) == ("DCM", "121013")]
    assert names == [DRAFTER.label]


def test_draft_contributing_equipment_names_pacs_ai_and_the_model(draft: Dataset) -> None:
    processing = [
        item
        for item in draft.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and item.Manufacturer == "pacs-ai project"
    ]
    assert len(processing) == 1
    assert list(processing[0].SoftwareVersions) == [f"pacs-ai {EQUIPMENT.software_version}", DRAFTER.label]
    assert "not verified" in processing[0].ContributionDescription


def test_draft_lists_its_evidence_and_copies_patient_and_study(
    draft: Dataset, evidence: list[Dataset]
) -> None:
    referenced = {
        instance.ReferencedSOPInstanceUID
        for study in draft.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in evidence}
    assert draft.StudyInstanceUID == evidence[0].StudyInstanceUID
    assert draft.PatientID == evidence[0].PatientID


def test_signed_version_is_final_verified_and_references_the_draft(draft: Dataset, signed: Dataset) -> None:
    assert (signed.CompletionFlag, signed.VerificationFlag, signed.PreliminaryFlag) == (
        "COMPLETE",
        "VERIFIED",
        "FINAL",
    )
    observer = signed.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Doe^Jane"
    assert observer.VerifyingOrganization == "Test Hospital"
    assert str(observer.VerificationDateTime).startswith("20260304103015")
    predecessor = signed.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == draft.StudyInstanceUID
    assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == draft.SeriesInstanceUID
    reference = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        draft.SOPClassUID,
        draft.SOPInstanceUID,
    )
    assert signed.SOPInstanceUID != draft.SOPInstanceUID
    assert signed.StudyInstanceUID == draft.StudyInstanceUID


def test_signed_version_has_the_radiologist_as_person_observer(signed: Dataset) -> None:
    context = [item for item in signed.ContentSequence if item.RelationshipType == "HAS OBS CONTEXT"]
    observer_types = [
        item.ConceptCodeSequence[0].CodeValue for item in context if _concept(item) == ("DCM", "121005")
    ]
    assert observer_types == ["121006", "121007"]  # the person, then the drafting device
    assert [str(item.PersonName) for item in context if _concept(item) == ("DCM", "121008")] == ["Doe^Jane"]


def test_signed_version_keeps_the_draft_evidence_and_the_new_text(draft: Dataset, signed: Dataset) -> None:
    def evidence_of(ds: Dataset) -> set[str]:
        return {
            instance.ReferencedSOPInstanceUID
            for study in ds.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for instance in series.ReferencedSOPSequence
        }

    assert evidence_of(signed) == evidence_of(draft)
    assert read_report_text(signed).findings.endswith("Edited by the radiologist.")
    assert read_report_text(draft) == ReportText(TEXT.findings, TEXT.impression)
    descriptions = [
        item.ContributionDescription
        for item in signed.ContributingEquipmentSequence
        if "ContributionDescription" in item
    ]
    assert any("signed by a physician" in text for text in descriptions)


def test_signing_a_signed_report_is_refused(signed: Dataset) -> None:
    with pytest.raises(ValueError, match="not an unverified draft"):
        build_signed_sr(
            signed,
            text=TEXT,
            drafter=DRAFTER,
            verifier=Verifier("Doe^Jane", "jdoe", "Test Hospital", VERIFIED_AT),
            equipment=EQUIPMENT,
            series_instance_uid=PREFIX + "1",
            sop_instance_uid=PREFIX + "2",
        )


def test_identities_are_deterministic_and_distinct() -> None:
    assert draft_sr_uids("k", 1, PREFIX) == draft_sr_uids("k", 1, PREFIX)
    series_1, instance_1 = draft_sr_uids("k", 1, PREFIX)
    series_2, instance_2 = draft_sr_uids("k", 2, PREFIX)
    assert series_1 == series_2 and instance_1 != instance_2  # a re-draft is a new instance of the series
    assert signed_sr_uids(instance_1, PREFIX) != signed_sr_uids(instance_2, PREFIX)
    assert all(len(uid) <= 64 for uid in (*draft_sr_uids("k", 1), *signed_sr_uids(instance_1)))


@pytest.mark.parametrize(("findings", "impression"), [("", "x"), ("x", " \n\n "), ("", "")])
def test_empty_sections_are_refused(findings: str, impression: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        ReportText(findings, impression)


def test_a_naive_verification_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        Verifier("Doe^Jane", "jdoe", "Hospital", datetime(2026, 1, 1))


def test_evidence_from_two_studies_is_refused(evidence: list[Dataset]) -> None:
    other = make_ct_series(n_slices=3, rows=16, columns=16, with_pixels=False)
    with pytest.raises(ValueError, match="one study"):
        build_draft_sr(
            evidence=[*evidence, *other],
            text=TEXT,
            drafter=DRAFTER,
            equipment=EQUIPMENT,
            series_instance_uid=PREFIX + "1",
            sop_instance_uid=PREFIX + "2",
        )


@pytest.mark.parametrize(
    ("impression", "expected"),
    [
        ("Plain ASCII.", "ISO_IR 100"),
        ("Ümlaut in Latin-1.", "ISO_IR 100"),
        ("“Quoted” – dash.", "ISO_IR 192"),
    ],
)
def test_character_set_widens_to_utf8_only_when_the_text_needs_it(
    evidence: list[Dataset], impression: str, expected: str
) -> None:
    assert evidence[0].SpecificCharacterSet == "ISO_IR 100"
    draft = build_draft_sr(
        evidence=evidence,
        text=ReportText("Findings.", impression),
        drafter=DRAFTER,
        equipment=EQUIPMENT,
        series_instance_uid=PREFIX + "1",
        sop_instance_uid=PREFIX + "2",
    )
    assert draft.SpecificCharacterSet == expected
    assert read_report_text(draft).impression == impression
