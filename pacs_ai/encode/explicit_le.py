"""Encoding the data sets pacs-ai builds as Explicit VR Little Endian, byte for byte as pydicom does.

pydicom's writer handles every encoding, character set and quirk a file read
from anywhere can have, and pays for that generality on every element: a
buffer, a character-set conversion and an ambiguous-VR pass per element or
item.  A 300-slice SEG has about 10,000 elements in 4,000 items and took
0.25 s to write; its SR as long again, on the path between the analyzer and
the PACS.

The objects pacs-ai writes are built in memory by highdicom, in Explicit VR
Little Endian, with ASCII text.  For those, this module encodes each element
directly (tag, VR, length, value) in about a sixth of the time.  It is not a
second DICOM writer: anything outside that narrow case is handed to pydicom,

* element by element (:func:`pydicom.filewriter.write_data_element`) for a
  value it does not encode itself (non-ASCII text, person names, dates held
  as date objects, attribute tags, raw or buffered values, values too long
  for a 16-bit length), and
* wholesale (``None`` from :func:`encode_file`, and the caller uses
  ``Dataset.save_as``) for another transfer syntax, an ambiguous VR pydicom
  could not resolve, or a sequence item of undefined length.

Ambiguous VRs ("OB or OW" Pixel Data, "US or SS") are resolved by pydicom's
own ``correct_ambiguous_vr``, where and as its writer does.  The tests compare
the output with pydicom's, byte for byte, for every kind of object pacs-ai
writes.
"""

from __future__ import annotations

import functools
from collections.abc import MutableSequence
from copy import deepcopy
from struct import Struct, pack
from struct import error as StructError

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

__all__ = ["encode_file"]

_SHORT_HEADER = Struct("<HH2sH")  # tag, VR, 16-bit length
_LONG_HEADER = Struct("<HH2sHL")  # tag, VR, reserved, 32-bit length
_ITEM_HEADER = Struct("<HHL")  # (FFFE,E000), length
_LENGTH = Struct("<L")
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
#: Padding of the string VRs pydicom writes with ``write_string`` (UI with NUL, the others with space).
_STRING_PADDING = {"UI": "\0", "CS": " ", "AE": " ", "AS": " ", "UR": " ", "DA": " ", "TM": " ", "DT": " "}
#: Text VRs whose bytes depend on the character set (pydicom's ``write_text``).
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_NUMBER_FORMATS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_PREAMBLE = b"\x00" * 128
_PRINTABLE_ASCII = "".join(chr(code) for code in range(32, 127)) + "\t\n\r\f"


class _UsePydicom(Exception):
    """The data set needs pydicom's writer as a whole (see the module docstring)."""


@functools.lru_cache(maxsize=64)
def _ascii_compatible(encodings: tuple[str, ...]) -> bool:
    """True if every Python codec in ``encodings`` encodes ASCII text as ASCII bytes."""
    try:
        return all(_PRINTABLE_ASCII.encode(codec) == _PRINTABLE_ASCII.encode("ascii") for codec in encodings)
    except (LookupError, UnicodeError):
        return False


def _joined(value: object) -> str | None:
    """A string value, or the values of a multi-valued one joined by backslashes; None for others."""
    if isinstance(value, str):
        return value
    if isinstance(value, MultiValue | list | tuple) and all(isinstance(v, str) for v in value):
        return "\\".join(value)
    return None


def _ascii_bytes(value: object, padding: str) -> bytes | None:
    text = _joined(value)
    if text is None or not text.isascii():
        return None
    if len(text) % 2:
        text += padding
    return text.encode("ascii")


def _number_string_bytes(value: object) -> bytes:
    """DS and IS as pydicom's ``write_number_string`` writes them (the original string when kept)."""
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(x.original_string if hasattr(x, "original_string") else str(x) for x in value)
    else:
        text = value.original_string if hasattr(value, "original_string") else str(value)
    if len(text) % 2:
        text += " "
    return text.encode("iso8859")


def _is_empty(value: object) -> bool:
    """pydicom's ``DataElement.is_empty`` for the value types encoded here (VM 0)."""
    if value is None:
        return True
    if isinstance(value, str | bytes | bytearray | MultiValue | list | tuple):
        return len(value) == 0
    return False


def _value_bytes(vr: str, value: object, text_is_ascii: bool) -> bytes | bytearray | None:
    """The encoded value of a non-sequence element, or None to let pydicom encode the element."""
    if vr in _STRING_PADDING:
        return _ascii_bytes(value, _STRING_PADDING[vr])
    if vr in _TEXT_VRS:
        return _ascii_bytes(value, " ") if text_is_ascii else None
    if vr in ("DS", "IS"):
        return _number_string_bytes(value)
    number_format = _NUMBER_FORMATS.get(vr)
    if number_format is not None:
        try:
            if isinstance(value, MultiValue | list | tuple):
                return pack(f"<{len(value)}{number_format}", *value)
            return pack(f"<{number_format}", value)
        except StructError:
            return None  # pydicom reports the bad value
    if vr in ("OB", "OW") and isinstance(value, bytes | bytearray):
        if len(value) % 2 == 0:
            return value
        return bytes(value) + b"\x00" if vr == "OB" else None
    return None


class _Encoder:
    """Encodes one data set into ``parts``: a growing buffer, with large values kept as they are."""

    #: Values at least this long are not copied into the buffer (Pixel Data, mostly).
    LARGE_VALUE = 1 << 20

    def __init__(self) -> None:
        self.parts: list[bytes | bytearray] = []
        self.buffer = bytearray()

    def top_level(self, dataset: Dataset) -> list[bytes | bytearray]:
        self._dataset(dataset, dataset.get("SpecificCharacterSet", "iso8859"), resolved=False, top=True)
        self.parts.append(self.buffer)
        return self.parts

    def _dataset(
        self, dataset: Dataset, encodings: str | MutableSequence[str], *, resolved: bool, top: bool = False
    ) -> None:
        # As pydicom's write_dataset: a data set read in this very encoding keeps its raw elements
        # (written as read); any other, such as one built in memory, has them converted and its
        # ambiguous VRs ("US or SS", "OB or OW") resolved, with its items, by pydicom's own
        # correct_ambiguous_vr.  Once done for a data set, its items need it no more ("resolved").
        as_read = dataset.original_encoding == (False, True) and (
            dataset.original_character_set == dataset._character_set
        )
        if not as_read and not resolved:
            correct_ambiguous_vr(dataset, True)
            resolved = True
        text_is_ascii = _ascii_compatible(tuple(convert_encodings(encodings)))
        buffer = self.buffer
        for tag in sorted(dataset.keys()):
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                continue  # retired group lengths, which pydicom does not write
            element = dataset.get_item(tag) if as_read else dataset[tag]
            if isinstance(element, RawDataElement):
                buffer += _pydicom_element(element, encodings)
                continue
            vr = element.VR
            if len(vr) != 2:
                raise _UsePydicom(f"pydicom reports the ambiguous VR {vr} of {tag} it could not resolve")
            if vr == "SQ":
                self._sequence(tag, element, encodings, resolved)
                continue
            value = element.value
            data = None
            if not element.is_buffered and not element.is_undefined_length:
                data = b"" if _is_empty(value) else _value_bytes(vr, value, text_is_ascii)
            if data is None or (vr not in _LONG_VRS and len(data) > 0xFFFF):
                buffer += _pydicom_element(element, encodings)
            elif vr in _LONG_VRS:
                buffer += _LONG_HEADER.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(data))
                if top and len(data) >= self.LARGE_VALUE:
                    self.parts.append(buffer)
                    self.parts.append(data)
                    buffer = self.buffer = bytearray()
                else:
                    buffer += data
            else:
                buffer += _SHORT_HEADER.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(data))
                buffer += data

    def _sequence(
        self, tag: BaseTag, element: DataElement, encodings: str | MutableSequence[str], resolved: bool
    ) -> None:
        buffer = self.buffer
        undefined = element.is_undefined_length
        start = len(buffer)
        buffer += _LONG_HEADER.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF if undefined else 0)
        item_encodings = convert_encodings(encodings)
        for item in element.value:
            if getattr(item, "is_undefined_length_sequence_item", False):
                raise _UsePydicom("sequence items of undefined length are written by pydicom")
            item_start = len(buffer)
            buffer += _ITEM_HEADER.pack(0xFFFE, 0xE000, 0)
            self._dataset(item, item.get("SpecificCharacterSet", item_encodings), resolved=resolved)
            buffer[item_start + 4 : item_start + 8] = _LENGTH.pack(len(buffer) - item_start - 8)
        if undefined:
            buffer += _ITEM_HEADER.pack(0xFFFE, 0xE0DD, 0)
        else:
            buffer[start + 8 : start + 12] = _LENGTH.pack(len(buffer) - start - 12)


def _explicit_le_buffer() -> DicomBytesIO:
    """A buffer that pydicom's writing functions encode into as Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _pydicom_element(element: DataElement | RawDataElement, encodings: str | MutableSequence[str]) -> bytes:
    """One element as pydicom encodes it in Explicit VR Little Endian."""
    fp = _explicit_le_buffer()
    write_data_element(fp, element, encodings)  # type: ignore[arg-type]
    return fp.getvalue()


def _file_meta(dataset: Dataset) -> FileMetaDataset:
    """The File Meta Information as ``dcmwrite(..., enforce_file_format=True)`` writes it."""
    file_meta = deepcopy(dataset.file_meta)
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        in_meta, in_dataset = file_meta.get(meta_keyword), dataset.get(keyword)
        if in_meta is None or (in_dataset and in_dataset != in_meta):
            setattr(file_meta, meta_keyword, in_dataset)
    return file_meta


def encode_file(dataset: Dataset) -> list[bytes | bytearray] | None:
    """The DICOM file of ``dataset`` (preamble, File Meta Information, data set) as byte strings.

    The same bytes as ``dataset.save_as(fp, enforce_file_format=True)`` for a
    data set whose File Meta Information says Explicit VR Little Endian, in
    pieces to be written one after the other (large values are not copied).
    None when pydicom's writer must write the whole data set: another transfer
    syntax, no File Meta Information, or a case named in the module docstring.

    Like ``dcmwrite``, this validates the File Meta Information (raising
    ``AttributeError`` or ``ValueError`` as it does) and marks native Pixel
    Data as of defined length.
    """
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None or file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return None
    if any(tag >> 16 in (0, 2) for tag in dataset.keys()):  # noqa: SIM118 - iterating yields elements
        return None  # command or file meta elements in the data set: pydicom's error
    if (
        getattr(dataset, "is_implicit_VR", None) is True
        or getattr(dataset, "is_little_endian", None) is False
    ):
        return None  # an encoding that contradicts the syntax: pydicom's error, not ours
    preamble = getattr(dataset, "preamble", None)
    if preamble is not None and len(preamble) not in (0, 128):
        return None  # pydicom's error
    meta_bytes = _explicit_le_buffer()
    write_file_meta_info(meta_bytes, _file_meta(dataset), enforce_standard=True)
    if "PixelData" in dataset:
        dataset["PixelData"].is_undefined_length = False
    try:
        body = _Encoder().top_level(dataset)
    except _UsePydicom:
        return None
    return [preamble or _PREAMBLE, b"DICM", meta_bytes.getvalue(), *body]
