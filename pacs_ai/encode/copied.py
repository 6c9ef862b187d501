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

__all__ = ["OPTIONAL_COPIED_KEYWORDS", "drop_invalid_optional_attributes"]

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

    Returns the deleted keywords (logged too; values are not, they may identify the patient).
    """
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
