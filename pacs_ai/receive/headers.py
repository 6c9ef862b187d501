"""The attributes of a received instance that the index and the router need."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import RE_VALID_UID, UID

from pacs_ai.index.ingest import InstanceHeader

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
class ReceivedBytes:
    """The start of a received Part 10 file, as the listener kept it in memory.

    ``data`` is the file's first bytes (``whole`` when that is all of it).  The
    listener writes the file meta itself, so it also knows where the data set
    starts (``data_set_offset``) and its transfer syntax (``transfer_syntax_uid``):
    given both, the header is parsed without the preamble and file meta, about
    half of pydicom's work for a CT header.
    """

    data: bytes | bytearray
    whole: bool = False
    data_set_offset: int | None = None
    transfer_syntax_uid: str | None = None


#: The attributes read, by keyword; tags looked up once here (a lookup by keyword per access costs more).
_TAGS = {
    keyword: Tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
        "StudyDescription",
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "SeriesNumber",
        "InstanceNumber",
        "ImageType",
        "SliceThickness",
    )
}


#: The tags read from a data set: pydicom skips the others' values (and Specific Character Set
#: is always read with them).  Plain integers: pydicom's ``BaseTag`` compares in Python code,
#: and pydicom looks up every element's tag among these.
HEADER_TAGS: list[int] = sorted(int(tag) for tag in _TAGS.values())

_VALID_UID = re.compile(RE_VALID_UID)


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a valid UID (PS3.5 9.1): pydicom's rule, without a trailing newline."""
    return len(value) <= 64 and _VALID_UID.fullmatch(value) is not None


def _text(ds: Dataset, keyword: str, limit: int | None = 64) -> str | None:
    """The value as text, as pydicom decodes it, cut to the index column's width.

    ``limit`` None keeps it whole.  Every DICOM character set encodes the
    printable ASCII characters as ASCII does (ISO 2022 switches sets only
    with ESC), so a single value in plain ASCII is decoded here directly,
    trailing padding removed as pydicom does; about 10 microseconds per
    element and instance in the listener.  Anything else goes through
    pydicom's character-set-aware conversion.
    """
    element = ds.get_item(_TAGS[keyword])
    raw = None if element is None else element.value
    if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw and b"\\" not in raw:
        return raw.decode("ascii").rstrip("\0 ")[:limit] or None
    element = ds.get(_TAGS[keyword])  # by tag, pydicom returns the element, not its value
    value = None if element is None else element.value
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _plain(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    """The value of a CS, DA, IS or DS element as text, leading and trailing padding removed."""
    text = _raw_text(ds, keyword, strip_leading=True)
    return None if text is None else text[:limit]


def _uid(ds: Dataset, keyword: str) -> str | None:
    """A UID, never truncated: one longer than 64 characters is refused, not shortened into another.

    Only trailing padding is removed: a leading space makes the UID invalid, as it is.
    """
    return _raw_text(ds, keyword, strip_leading=False)


def _raw_text(ds: Dataset, keyword: str, *, strip_leading: bool) -> str | None:
    """The value of a UI, CS, DA, IS or DS element read from its raw bytes, padding removed.

    These value representations allow only the default character repertoire,
    so the raw bytes are the text: reading them directly spares pydicom's
    conversion, about 10 microseconds per element and instance in the
    listener.  An element pydicom has converted already is taken as it is.
    """
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes | bytearray):
        decoded = value.decode("ascii", "replace")
        text = decoded.strip("\0 ") if strip_leading else decoded.rstrip("\0 ")
    elif isinstance(value, MultiValue):
        text = "\\".join(str(item) for item in value)
    else:
        text = "" if value is None else str(value)
    return text or None


def _integer(ds: Dataset, keyword: str) -> int | None:
    number = _decimal(ds, keyword)
    return int(number) if number is not None and number.is_integer() else None


def _decimal(ds: Dataset, keyword: str) -> float | None:
    text = _plain(ds, keyword)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:  # multi-valued or not a number: not recorded
        return None
    return number if math.isfinite(number) else None


def _multi_valued(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    text = _plain(ds, keyword, limit=1024)
    if text is None:
        return None
    return "\\".join(item.strip() for item in text.split("\\"))[:limit]


def header_from_prefix(received: ReceivedBytes) -> Dataset | None:
    """Parse a received file's :data:`HEADER_TAGS` from its first bytes, if they hold them all.

    Most instances are parsed this way, without reading their file back.
    Returns None when those attributes may run past the received bytes
    (large private data before Pixel Data, say) or they cannot be parsed:
    the caller then reads the file, whose errors are the ones worth reporting.
    """
    stream = BytesIO(received.data)
    try:
        ds = _data_set_after_file_meta(stream, received)
        if ds is None:
            ds = dcmread(stream, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception:  # truncated inside an element: decided on the whole file instead
        return None
    # pydicom stops (and steps back) at Pixel Data, or at the first tag past the header's after
    # the listener's file meta: the attributes before it are all here.  Reaching the end
    # instead means the bytes may have cut the data set short.
    return ds if received.whole or stream.tell() < len(received.data) else None


#: The last tag :data:`HEADER_TAGS` holds: data sets are in ascending tag order, so reading
#: the data set after the listener's file meta stops at the first tag past it.
_LAST_HEADER_TAG = max(HEADER_TAGS)


def _past_header_tags(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int.__gt__(tag, _LAST_HEADER_TAG)  # not BaseTag's comparison, in Python code


def _data_set_after_file_meta(stream: BytesIO, received: ReceivedBytes) -> Dataset | None:
    """The data set read from ``received.data_set_offset``, or None if that cannot be done here.

    Only for a known transfer syntax whose data set pydicom reads as it is
    (a deflated one must be inflated first, which :func:`dcmread` does).
    """
    if received.data_set_offset is None or received.transfer_syntax_uid is None:
        return None
    syntax = UID(received.transfer_syntax_uid)
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return None
    stream.seek(received.data_set_offset)
    ds = read_dataset(
        stream,
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        stop_when=_past_header_tags,
        specific_tags=HEADER_TAGS,
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


#: The UIDs an instance is filed by (Type 1).
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def read_header(
    path: Path,
    *,
    command_sop_class: str,
    command_sop_instance: str,
    received: ReceivedBytes | None = None,
) -> InstanceHeader:
    """Read and check the identifying attributes of a received file.

    ``received``, the file's first bytes if the caller still has them, spares
    reading the file back when they hold every attribute before Pixel Data
    (:func:`header_from_prefix`).  Raises :class:`InstanceRejected` with the
    status to answer when the data set is unreadable, lacks a UID needed to
    file it, or disagrees with the C-STORE command that carried it.
    """
    try:
        ds = header_from_prefix(received) if received is not None else None
        if ds is None or any(_TAGS[keyword] not in ds for keyword in _REQUIRED_UIDS):
            # A UID missing from the received bytes' header may only have been out of tag
            # order, past where the early read stopped: the whole file decides.
            ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        tsyntax = str(ds.file_meta.TransferSyntaxUID)
        # Never truncated: a UID longer than 64 characters is refused, not shortened into another UID.
        uids = {keyword: _uid(ds, keyword) for keyword in _REQUIRED_UIDS}
    except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError, EOFError) as exc:
        raise InstanceRejected(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}"[:200]) from exc
    except Exception as exc:  # whatever else a decoder raises on hostile input: zlib.error, RecursionError
        raise InstanceRejected(
            STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}: {exc}"[:200]
        ) from exc

    for keyword, value in uids.items():
        if not value:
            raise InstanceRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} (Type 1) is missing")
        if not is_valid_uid(value):
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
        patient_birth_date=_plain(ds, "PatientBirthDate", 8),
        patient_sex=_plain(ds, "PatientSex", 16),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_plain(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription"),
        modality=_plain(ds, "Modality", 16),
        body_part_examined=_plain(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_integer(ds, "SeriesNumber"),
        instance_number=_integer(ds, "InstanceNumber"),
        image_type=_multi_valued(ds, "ImageType"),
        slice_thickness=_decimal(ds, "SliceThickness"),
    )
