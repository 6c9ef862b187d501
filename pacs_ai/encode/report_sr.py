"""A report draft and its signed version as TID 2000 Basic Diagnostic Imaging Reports (Enhanced SR).

Two documents describe one report's life:

* the **draft** (:func:`build_draft_sr`): written by pacs-ai from an AI
  analysis, Completion Flag PARTIAL, Verification Flag UNVERIFIED, Preliminary
  Flag PRELIMINARY.  Its observer context names a *device* observer, the
  drafting model on this pacs-ai installation, and its Contributing Equipment
  names pacs-ai and that model;
* the **signed** version (:func:`build_signed_sr`): a new instance written
  when a radiologist accepts the draft, possibly edited: COMPLETE / VERIFIED /
  FINAL, the radiologist as person observer and in the Verifying Observer
  Sequence, and the draft in the Predecessor Documents Sequence, so a PACS or
  viewer can tell which preliminary document this one replaces.

Content tree (TID 2000, with the sections of TID 2002 "Report Narrative")::

    CONTAINER (LN 18748-4 "Diagnostic Imaging Report")          TID 2000
      HAS CONCEPT MOD  CODE  Language of Content = en            TID 1204
      HAS OBS CONTEXT  (person and/or device observer)           TID 1001-1004
      CONTAINS CONTAINER (LN 59776-5 "Findings")                 CID 7001
        CONTAINS TEXT (DCM 121106 "Comment") = draft status      draft only
        CONTAINS TEXT (DCM 121071 "Finding") = one paragraph     CID 7002
      CONTAINS CONTAINER (LN 19005-8 "Impressions")
        CONTAINS TEXT (DCM 121073 "Impression") = one paragraph

The section headings are the current CID 7001 codes (LOINC); the DCM
121070/121072 headings of older editions are retired.  Each blank-line
separated paragraph of the text is one TEXT item, so a receiver that renders
item by item keeps the paragraphs.  Containers are SEPARATE (not CONTINUOUS):
OHIF, for one, then shows each item on its own line with its concept name, so
the observer context reads as labelled fields.  A draft's Findings start with
a Comment saying "AI draft, not verified" (:data:`DRAFT_STATUS`), so the status
is in the text a radiologist reads, not only in the flags and series label.

Enhanced SR (not Comprehensive) because the tree uses only by-value
relationships and no spatial coordinates: the most widely supported SR class
that fits.  The evidence (source images, the SEG and the measurement SR the
draft was written from) is listed in the Current Requested Procedure Evidence
Sequence.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.valuerep import DT

from pacs_ai.encode.copied import drop_invalid_optional_attributes
from pacs_ai.encode.equipment import EquipmentInfo, contributing_equipment
from pacs_ai.encode.uids import derived_uid

__all__ = [
    "DIAGNOSTIC_IMAGING_REPORT",
    "DRAFT_SR_DESCRIPTION",
    "DRAFT_SR_SERIES_NUMBER",
    "DRAFT_STATUS",
    "SIGNED_SR_DESCRIPTION",
    "SIGNED_SR_SERIES_NUMBER",
    "DraftingModel",
    "ReportText",
    "Verifier",
    "build_draft_sr",
    "build_signed_sr",
    "draft_sr_uids",
    "read_report_text",
    "signed_sr_uids",
]

#: LN 18748-4 "Diagnostic Imaging Report" (CID 7000), the TID 2000 document title.
DIAGNOSTIC_IMAGING_REPORT: PydicomCode = codes.cid7000.DiagnosticImagingReport
_FINDINGS_SECTION: PydicomCode = codes.cid7001.Findings  # LN 59776-5
_IMPRESSIONS_SECTION: PydicomCode = codes.cid7001.Impressions  # LN 19005-8
_FINDING: PydicomCode = codes.cid7002.Finding  # DCM 121071
_IMPRESSION: PydicomCode = codes.cid7002.Impression  # DCM 121073
_ENGLISH = hd.sr.CodedConcept(value="en", scheme_designator="RFC5646", meaning="English")

#: Series numbers next to the analysis results (SEG 9001, measurement SR 9002).
DRAFT_SR_SERIES_NUMBER = 9003
SIGNED_SR_SERIES_NUMBER = 9004
#: Series Descriptions (LO, 64 characters) saying what a reader is looking at.
DRAFT_SR_DESCRIPTION = "AI draft report (unverified)"
SIGNED_SR_DESCRIPTION = "Radiology report (verified)"

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

#: DCM 121106 "Comment" (CID 7002): the draft's status, first in its Findings section, so a viewer
#: that shows only the text still shows that nobody has verified it.
_COMMENT = hd.sr.CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")
#: The status words of a draft, in its text.
DRAFT_STATUS = "AI draft, not verified"


@dataclass(frozen=True)
class ReportText:
    """The two narrative sections of a report."""

    findings: str
    impression: str

    def __post_init__(self) -> None:
        for name in ("findings", "impression"):
            if not _paragraphs(getattr(self, name)):
                raise ValueError(
                    f"the report's {name} section is empty; a report needs text in both sections"
                )


@dataclass(frozen=True)
class DraftingModel:
    """What wrote the draft text: the drafter backend (``"template"``, ``"llm"`` ...) and its model id."""

    backend: str
    model_id: str

    @property
    def label(self) -> str:
        """``"<backend> <model id>"``, at most 64 characters (it goes into LO attributes)."""
        label = f"{self.backend} {self.model_id}".strip()
        if not label or len(label) > 64 or "\\" in label:
            raise ValueError(
                f"drafting model {label!r} must be 1-64 characters without backslash "
                "(it is written to DICOM LO attributes); shorten the backend or model id"
            )
        return label


@dataclass(frozen=True)
class Verifier:
    """The radiologist who signs a report.

    ``name`` is a DICOM person name (``"Family^Given"``); ``login`` is their
    user name in pacs-ai, recorded as the person observer's login so the SR
    can be matched with the audit trail.
    """

    name: str
    login: str
    organization: str
    verified_at: datetime

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.organization.strip():
            raise ValueError("a verifier needs a name and an organization (both are Type 1 in DICOM)")
        if self.verified_at.tzinfo is None:
            raise ValueError("Verifier.verified_at must be timezone-aware")


def draft_sr_uids(key: str, version: int, prefix: str | None = None) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the draft SR of report ``key`` at ``version``.

    ``key`` identifies the report (e.g. the study UID and the jobs it was
    drafted from); a re-run of the same draft gets the same identities, so a
    PACS replaces rather than duplicates it.
    """
    return (
        derived_uid(key, "report-draft-series", prefix=prefix),
        derived_uid(key, "report-draft-instance", str(version), prefix=prefix),
    )


def signed_sr_uids(draft_sop_instance_uid: str, prefix: str | None = None) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the signed version of a draft.

    Both derive from the draft instance: one signed document per draft, and a
    retried sign-off re-creates the same identities instead of a second report.
    """
    return (
        derived_uid(draft_sop_instance_uid, "report-signed-series", prefix=prefix),
        derived_uid(draft_sop_instance_uid, "report-signed-instance", prefix=prefix),
    )


def _paragraphs(text: str) -> list[str]:
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    return [part.strip() for part in _PARAGRAPH_BREAK.split(normalised) if part.strip()]


def _character_set(source: Dataset, texts: Sequence[str]) -> str | list[str] | None:
    """The Specific Character Set for a report with ``texts``: the source's when it can hold them, else UTF-8.

    Keeping the source's set where possible keeps the report readable by
    receivers that handle only what they already get; drafted or edited text
    with characters outside it (typographic quotes, other scripts) needs
    ISO_IR 192 (UTF-8), or pydicom would write replacement characters.
    """
    declared = source.get("SpecificCharacterSet")
    values = [declared] if isinstance(declared, str) else [str(v) for v in declared or []]
    if not values or values == ["ISO_IR 6"] or values == [""]:
        if all(text.isascii() for text in texts):
            return declared or None
        values = ["ISO_IR 100"]  # ASCII is a subset: widen to Latin-1 before going to UTF-8
    if len(values) == 1 and values[0] in ("ISO_IR 100", "ISO_IR 192"):
        codec = "latin-1" if values[0] == "ISO_IR 100" else "utf-8"
        try:
            for text in texts:
                text.encode(codec)
        except UnicodeEncodeError:
            return "ISO_IR 192"
        return values[0]
    # Other (or code-extension) sets: keep them for pure ASCII text, else UTF-8.
    return (values[0] if len(values) == 1 else values) if all(t.isascii() for t in texts) else "ISO_IR 192"


def _section(
    heading: PydicomCode, entry: PydicomCode, text: str, status: str | None = None
) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(
        name=heading,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,  # SEPARATE: each paragraph and the status stand on their own
    )
    notes = (
        [
            hd.sr.TextContentItem(
                name=_COMMENT, value=status, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        ]
        if status
        else []
    )
    section.ContentSequence = hd.sr.ContentSequence(
        notes
        + [
            # TEXT is UT; DICOM text uses CR LF line ends.
            hd.sr.TextContentItem(
                name=entry,
                value=paragraph.replace("\n", "\r\n"),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for paragraph in _paragraphs(text)
        ]
    )
    return section


def _device_observer(
    equipment: EquipmentInfo, drafter: DraftingModel, uid_prefix: str | None
) -> hd.sr.ObserverContext:
    # Stable across reports: "this drafting model on this installation".
    uid = derived_uid(
        "report-drafter",
        equipment.manufacturer,
        equipment.model_name,
        equipment.device_serial_number,
        drafter.backend,
        drafter.model_id,
        prefix=uid_prefix,
    )
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid,
            name=drafter.label,
            manufacturer_name=equipment.manufacturer,
            model_name=f"{equipment.model_name} {equipment.software_version}",
            serial_number=equipment.device_serial_number,
        ),
    )


def _person_observer(verifier: Verifier) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=verifier.name, login_name=verifier.login, organization_name=verifier.organization
        ),
    )


def _document(
    text: ReportText, context: hd.sr.ObservationContext, status: str | None = None
) -> hd.sr.ContainerContentItem:
    # SEPARATE: viewers show each item with its concept name ("Device Observer Name: ...") on
    # its own line; CONTINUOUS would run the observer context's values together as one sentence.
    root = hd.sr.ContainerContentItem(
        name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000", is_content_continuous=False
    )
    root.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.LanguageOfContentItemAndDescendants(language=_ENGLISH)[0],  # type: ignore[list-item]
            *context,
            _section(_FINDINGS_SECTION, _FINDING, text.findings, status),
            _section(_IMPRESSIONS_SECTION, _IMPRESSION, text.impression),
        ]
    )
    return root


def _drafting_equipment(
    equipment: EquipmentInfo, drafter: DraftingModel, description: str
) -> hd.ContributingEquipment:
    """Contributing Equipment naming pacs-ai and the drafting model (Software Versions holds both)."""
    return contributing_equipment(equipment, software=drafter.label, description=description)


def build_draft_sr(
    *,
    evidence: Sequence[Dataset],
    text: ReportText,
    drafter: DraftingModel,
    equipment: EquipmentInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = DRAFT_SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str = DRAFT_SR_DESCRIPTION,
    uid_prefix: str | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.EnhancedSR:
    """The AI draft as a PARTIAL / UNVERIFIED / PRELIMINARY TID 2000 Enhanced SR.

    Parameters
    ----------
    evidence:
        What the draft was written from, all of one study: the source images'
        headers first (patient and study are copied from ``evidence[0]``, and
        its acquisition equipment is recorded as contributing equipment), then
        the SEG and measurement SR of the analysis.  Pixel data is not needed.
    text:
        Findings and impression as the drafter wrote them.
    drafter:
        The backend and model that wrote the text; the device observer and the
        Contributing Equipment name it.
    equipment:
        The pacs-ai installation (General Equipment and Contributing Equipment).
    series_instance_uid, sop_instance_uid:
        Identities, usually from :func:`draft_sr_uids`.
    previous_versions:
        Earlier drafts of the study this one supersedes (a reprocessed study is
        drafted again): they go into the Predecessor Documents Sequence.
    """
    if not evidence:
        raise ValueError("a draft report needs evidence: at least the headers of the source images")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ValueError(f"the evidence of one report must be of one study, got {sorted(studies)}")
    context = hd.sr.ObservationContext(
        observer_device_context=_device_observer(equipment, drafter, uid_prefix)
    )
    character_set = _character_set(evidence[0], [text.findings, text.impression, drafter.label])
    status = f"{DRAFT_STATUS}: drafted by {drafter.label}; a radiologist must review and sign it."
    sr = hd.sr.EnhancedSR(
        evidence=list(evidence),
        content=_document(text, context, status),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        **equipment.general_equipment(),
        series_description=series_description,
        specific_character_set=character_set,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=list(previous_versions) or None,
        contributing_equipment=[
            _drafting_equipment(
                equipment, drafter, f"Report draft by {drafter.label}; not verified by a physician"
            )
        ],
    )
    drop_invalid_optional_attributes(sr)
    return sr


def _evidence_items(draft: Dataset) -> list[Dataset]:
    """The draft's evidence as the minimal datasets highdicom needs, each carrying the draft's patient/study.

    The signed version reports on the same evidence as the draft; the source
    files may have left the spool by the time a radiologist signs, so the
    references are rebuilt from the draft's Current Requested Procedure
    Evidence Sequence instead of being read again.
    """
    context = Dataset()
    for keyword in (
        "SpecificCharacterSet",
        "StudyInstanceUID",
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        if keyword in draft:
            context[keyword] = copy.deepcopy(draft[keyword])
    items: list[Dataset] = []
    for study in draft.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for instance in series.get("ReferencedSOPSequence", []):
                item = copy.deepcopy(context)
                item.StudyInstanceUID = study.StudyInstanceUID
                item.SeriesInstanceUID = series.SeriesInstanceUID
                item.SOPClassUID = instance.ReferencedSOPClassUID
                item.SOPInstanceUID = instance.ReferencedSOPInstanceUID
                items.append(item)
    if not items:
        raise ValueError(
            f"draft SR {draft.get('SOPInstanceUID')} lists no evidence; it was not built by build_draft_sr"
        )
    return items


def build_signed_sr(
    draft: Dataset,
    *,
    text: ReportText,
    drafter: DraftingModel,
    verifier: Verifier,
    equipment: EquipmentInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = SIGNED_SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str = SIGNED_SR_DESCRIPTION,
    uid_prefix: str | None = None,
) -> hd.sr.EnhancedSR:
    """The radiologist's signed report: COMPLETE / VERIFIED / FINAL, with the draft as predecessor.

    Parameters
    ----------
    draft:
        The draft SR (as read from its file) this version replaces; it goes
        into the Predecessor Documents Sequence and its evidence is carried over.
    text:
        The text as signed (the draft's, or the radiologist's edit of it).
    drafter:
        The model that wrote the draft; it stays in the observer context and
        Contributing Equipment, because the signed text started as its output.
    verifier:
        The signing radiologist: person observer and Verifying Observer.
    """
    if str(draft.get("VerificationFlag", "")) != "UNVERIFIED":
        raise ValueError(
            f"SR {draft.get('SOPInstanceUID')} is {draft.get('VerificationFlag')}, not an unverified draft"
        )
    context = hd.sr.ObservationContext(
        observer_person_context=_person_observer(verifier),
        observer_device_context=_device_observer(equipment, drafter, uid_prefix),
    )
    character_set = _character_set(
        draft,
        [text.findings, text.impression, drafter.label, verifier.name, verifier.login, verifier.organization],
    )
    # Acquisition equipment the draft recorded (the scanner) is kept; pacs-ai's item is rewritten.
    acquisition = [
        copy.deepcopy(item)
        for item in draft.get("ContributingEquipmentSequence", [])
        if item.PurposeOfReferenceCodeSequence[0].CodeValue != codes.DCM.ProcessingEquipment.value
    ]
    sr = hd.sr.EnhancedSR(
        evidence=_evidence_items(draft),
        content=_document(text, context),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        **equipment.general_equipment(),
        series_description=series_description,
        specific_character_set=character_set,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=verifier.name,
        verifying_organization=verifier.organization,
        previous_versions=[draft],
        contributing_equipment=[
            _drafting_equipment(
                equipment, drafter, f"Draft by {drafter.label}; reviewed and signed by a physician"
            )
        ],
    )
    sr.ContributingEquipmentSequence = [*acquisition, *sr.ContributingEquipmentSequence]
    # highdicom stamps "now"; the sign-off time is the one the worklist recorded.
    sr.VerifyingObserverSequence[0].VerificationDateTime = DT(verifier.verified_at)
    drop_invalid_optional_attributes(sr)
    return sr


def read_report_text(sr: Dataset) -> ReportText:
    """Findings and impression of a TID 2000 SR written by this module (paragraphs joined by a blank line)."""
    sections: dict[tuple[str, str], list[str]] = {}
    for item in sr.get("ContentSequence", []):
        if item.ValueType != "CONTAINER":
            continue
        concept = item.ConceptNameCodeSequence[0]
        texts = [
            str(child.TextValue).replace("\r\n", "\n")
            for child in item.get("ContentSequence", [])
            if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeValue != _COMMENT.value
        ]
        sections[(concept.CodingSchemeDesignator, concept.CodeValue)] = texts

    def joined(code: PydicomCode) -> str:
        return "\n\n".join(sections.get((code.scheme_designator, code.value), []))

    return ReportText(findings=joined(_FINDINGS_SECTION), impression=joined(_IMPRESSIONS_SECTION))
