"""Keeping malformed optional values of the source out of the objects pacs-ai creates.

highdicom copies the Patient, Patient Study and General Study modules from the
source images into SEG and SR, values as they are.  Sources from the field
carry malformed optional values (a Patient's Age of ``"62"`` instead of
``"062Y"`` is common), which then make *our* object fail validation.  The
Type 3 attributes among them are optional, so one whose value is invalid for
its VR is left out of the new object: guessing a repair (years? months?)
would put a value in the record that nobody wrote.  Identifying (Type 1/2)
attributes are never touched: receivers match studies and patients on them.
"""

from __future__ import annotations

import logging

from pydicom import Dataset
from pydicom.config import RAISE
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

__all__ = [
    "OPTIONAL_COPIED_KEYWORDS",
    "REFERENCE_SEQUENCES",
    "drop_incomplete_references",
    "drop_invalid_optional_attributes",
]

log = logging.getLogger(__name__)

#: Type 3 attributes with values (no sequences) of the Patient, Patient Study
#: and General Study modules, which highdicom copies from the source.
OPTIONAL_COPIED_KEYWORDS: tuple[str, ...] = (
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "ReasonForVisit",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    # Patient
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "PatientBirthTime",
    "OtherPatientNames",
    "PatientComments",
    "PatientIdentityRemoved",
    # General Study
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
)


def _is_valid(vr: str, value: object) -> bool:
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        for item in values:
            validate_value(vr, item, RAISE)
    except ValueError:
        return False
    return True


def drop_invalid_optional_attributes(dataset: Dataset) -> list[str]:
    """Delete the attributes of :data:`OPTIONAL_COPIED_KEYWORDS` whose value is invalid for their VR.

    Incomplete items of the copied reference sequences go too
    (:func:`drop_incomplete_references`).  Returns the deleted keywords
    (logged too; values are not, they may identify the patient).
    """
    drop_incomplete_references(dataset)
    dropped = [
        keyword
        for keyword in OPTIONAL_COPIED_KEYWORDS
        if keyword in dataset and not _is_valid(dataset[keyword].VR, dataset[keyword].value)
    ]
    for keyword in dropped:
        del dataset[keyword]
    if dropped:
        log.warning(
            "left out of %s: source attribute(s) %s with values invalid for their VR",
            dataset.get("Modality", "the result"),
            ", ".join(dropped),
        )
    return dropped


#: Type 3 reference sequences of the Patient and General Study modules that highdicom copies from
#: the source; each item needs a Referenced SOP Class UID and Instance UID (Type 1 within the item).
REFERENCE_SEQUENCES: tuple[str, ...] = ("ReferencedStudySequence", "ReferencedPatientSequence")


def _is_complete_reference(item: Dataset) -> bool:
    return all(
        keyword in item and item[keyword].value and _is_valid("UI", item[keyword].value)
        for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")
    )


def drop_incomplete_references(dataset: Dataset) -> list[str]:
    """Remove items of :data:`REFERENCE_SEQUENCES` missing a Type 1 UID (and a sequence left empty).

    A scanner's header with a Referenced Study Sequence item without its
    Referenced SOP Class UID would otherwise make every result fail
    validation; the reference cannot be repaired (the class is unknown), and
    the sequence is optional, so the incomplete item is left out.
    Returns the keywords of the sequences changed.
    """
    changed = []
    for keyword in REFERENCE_SEQUENCES:
        if keyword not in dataset:
            continue
        items = list(dataset[keyword].value or [])
        kept = [item for item in items if _is_complete_reference(item)]
        if len(kept) == len(items):
            continue
        changed.append(keyword)
        if kept:
            dataset[keyword].value = kept
        else:
            del dataset[keyword]
    if changed:
        log.warning("left out of the result: incomplete item(s) of source %s", ", ".join(changed))
    return changed
