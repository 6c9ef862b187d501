"""The attributes of a received instance that the index and the router need."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

#: Storage statuses (PS3.4 B.2.3) the listener answers with.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


class InstanceRejected(Exception):
    """The instance cannot be accepted; ``status`` is the DICOM status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    """What is recorded about one instance.  Patient name is stored, never logged."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    image_type: str | None
    slice_thickness: float | None


def _text(ds: Dataset, keyword: str, limit: int | None = 64) -> str | None:
    """The value as text, cut to the index column's width (``limit``; None keeps it whole)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _number(ds: Dataset, keyword: str, kind: type) -> int | float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _multi_valued_text(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return "\\".join(str(item) for item in value)[:limit]
    return str(value)[:limit]


def header_from_prefix(prefix: bytes | bytearray, *, whole: bool = False) -> Dataset | None:
    """Parse a received file's attributes up to Pixel Data from its first bytes, if they hold them all.

    ``prefix`` is the start of the Part 10 file (preamble, file meta, data
    set), kept in memory as it was received, so most instances are parsed
    without reading their file back; ``whole`` says the prefix is the whole
    file.  Returns None when the attributes before Pixel Data may run past the
    prefix (large private data, say) or the prefix cannot be parsed: the
    caller then reads the file, whose errors are the ones worth reporting.
    """
    stream = BytesIO(prefix)
    try:
        ds = dcmread(stream, stop_before_pixels=True)
    except Exception:  # truncated inside an element: decided on the whole file instead
        return None
    # pydicom stops (and steps back) at Pixel Data: the attributes before it are all here.
    # Reaching the end instead means the prefix may have cut the data set short.
    return ds if whole or stream.tell() < len(prefix) else None


def read_header(
    path: Path,
    *,
    command_sop_class: str,
    command_sop_instance: str,
    prefix: bytes | bytearray | None = None,
    prefix_is_whole: bool = False,
) -> InstanceHeader:
    """Read and check the identifying attributes of a received file.

    ``prefix``, the file's first bytes if the caller still has them, spares
    reading the file back when it holds every attribute before Pixel Data
    (:func:`header_from_prefix`; ``prefix_is_whole`` when it is the whole
    file).  Raises :class:`InstanceRejected` with the status to answer when
    the data set is unreadable, lacks a UID needed to file it, or disagrees
    with the C-STORE command that carried it.
    """
    try:
        ds = header_from_prefix(prefix, whole=prefix_is_whole) if prefix is not None else None
        if ds is None:
            ds = dcmread(path, stop_before_pixels=True)
        tsyntax = str(ds.file_meta.TransferSyntaxUID)
        # Never truncated: a UID longer than 64 characters is refused, not shortened into another UID.
        uids = {
            keyword: _text(ds, keyword, limit=None)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
    except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError, EOFError) as exc:
        raise InstanceRejected(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}") from exc

    for keyword, value in uids.items():
        if not value:
            raise InstanceRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} (Type 1) is missing")
        if not UID(value).is_valid:
            raise InstanceRejected(STATUS_CANNOT_UNDERSTAND, f"{keyword} {value!r} is not a valid UID")
    if uids["SOPInstanceUID"] != command_sop_instance:
        raise InstanceRejected(
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the C-STORE "
            f"AffectedSOPInstanceUID {command_sop_instance}",
        )
    if uids["SOPClassUID"] != command_sop_class:
        raise InstanceRejected(
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID {uids['SOPClassUID']} differs from the C-STORE "
            f"AffectedSOPClassUID {command_sop_class}",
        )

    return InstanceHeader(
        sop_class_uid=str(uids["SOPClassUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_instance_uid=str(uids["StudyInstanceUID"]),
        series_instance_uid=str(uids["SeriesInstanceUID"]),
        transfer_syntax_uid=tsyntax,
        # PatientID is Type 2: an empty value is legal and filed under "".
        patient_id=_text(ds, "PatientID") or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID") or "",
        patient_name=_text(ds, "PatientName", 324),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription"),
        modality=_text(ds, "Modality", 16),
        body_part_examined=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_number(ds, "SeriesNumber", int),  # type: ignore[arg-type]
        instance_number=_number(ds, "InstanceNumber", int),  # type: ignore[arg-type]
        image_type=_multi_valued_text(ds, "ImageType"),
        slice_thickness=_number(ds, "SliceThickness", float),  # type: ignore[arg-type]
    )
