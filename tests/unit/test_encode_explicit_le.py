"""The Explicit VR Little Endian encoder gives pydicom's bytes, or leaves the data set to pydicom.

Every comparison is with ``Dataset.save_as(..., enforce_file_format=True)``,
which is what :func:`pacs_ai.encode.io.write_dataset` wrote before: the SEG and
SR of an analysis, report SRs (UTF-8 text, a signed version built from a file
read back), a data set read from disk, and a data set made of the awkward
cases (empty values of every VR, person names, dates as date objects,
multi-valued numbers, odd lengths, nested character sets, undefined lengths).
"""

from __future__ import annotations

import copy
import datetime
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA

from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.explicit_le import encode_file
from pacs_ai.encode.report_sr import (
    DraftingModel,
    ReportText,
    Verifier,
    build_draft_sr,
    build_signed_sr,
    draft_sr_uids,
    signed_sr_uids,
)
from pacs_ai.encode.results import build_results
from tests.integration.synthetic_ct import load_volume, lung_labels, lung_result, make_ct_series, write_series

PREFIX = "1.2.826.0.1.3680043.8.498.79."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")


def pydicom_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_same_as_pydicom(dataset: Dataset) -> None:
    # Both writers change the data set they write (raw values converted, ambiguous VRs resolved):
    # pydicom writes a copy, so that neither sees what the other did.
    theirs = pydicom_bytes(copy.deepcopy(dataset))
    parts = encode_file(dataset)
    assert parts is not None, "the encoder left a data set to pydicom that it should encode"
    ours = b"".join(parts)
    if ours != theirs:
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
        pytest.fail(
            f"bytes differ from pydicom's at offset {at}: "
            f"{ours[at - 16 : at + 16]!r} vs {theirs[at - 16 : at + 16]!r}"
        )


def file_meta(sop_class: str, sop_instance: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    return meta


@pytest.fixture(scope="module")
def analysis_objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    out = tmp_path_factory.mktemp("explicit-le")
    volume = load_volume(write_series(make_ct_series(n_slices=12, rows=64, columns=64), out / "ct"))
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    objects = dict(build_results(volume, result, key="job-key", equipment=EQUIPMENT, uid_prefix=PREFIX))
    drafter = DraftingModel("template", "pacs-ai-template-1")
    series_uid, sop_uid = draft_sr_uids("study|report|job-key", 1, PREFIX)
    draft = build_draft_sr(
        evidence=[*volume.headers, *objects.values()],
        text=ReportText("Kein Erguss – “unauffällig”.", "肺野清晰"),  # non-ASCII: ISO_IR 192
        drafter=drafter,
        equipment=EQUIPMENT,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        uid_prefix=PREFIX,
    )
    stored_draft = pydicom.dcmread(write_dataset(draft, out / "draft.dcm", fsync=False))
    signed_series, signed_sop = signed_sr_uids(str(stored_draft.SOPInstanceUID), PREFIX)
    signed = build_signed_sr(
        stored_draft,  # read from a file: its items keep raw elements
        text=ReportText("Edited.", "No acute abnormality."),
        drafter=drafter,
        verifier=Verifier("Doe^Jane", "jdoe", "Test Hospital", datetime.datetime.now(datetime.UTC)),
        equipment=EQUIPMENT,
        series_instance_uid=signed_series,
        sop_instance_uid=signed_sop,
        uid_prefix=PREFIX,
    )
    first_slice = sorted((out / "ct").iterdir())[0]
    return {
        **objects,
        "draft SR": draft,
        "signed SR": signed,
        "CT read from disk": pydicom.dcmread(first_slice),
    }


@pytest.mark.parametrize("kind", ["SEG", "SR", "draft SR", "signed SR", "CT read from disk"])
def test_objects_pacs_ai_writes_are_encoded_as_pydicom_encodes_them(
    analysis_objects: dict[str, Dataset], kind: str
) -> None:
    assert_same_as_pydicom(analysis_objects[kind])


def test_write_dataset_writes_pydicoms_file(analysis_objects: dict[str, Dataset], tmp_path: Path) -> None:
    seg = analysis_objects["SEG"]
    path = write_dataset(seg, tmp_path / "seg.dcm", fsync=False)
    assert path.read_bytes() == pydicom_bytes(seg)


def test_large_values_are_passed_on_not_copied(analysis_objects: dict[str, Dataset]) -> None:
    seg = analysis_objects["SEG"]
    seg_copy = Dataset(seg)
    seg_copy.file_meta = seg.file_meta
    seg_copy.PixelData = bytes(2 * 1024 * 1024)  # beyond _Encoder.LARGE_VALUE
    parts = encode_file(seg_copy)
    assert parts is not None
    assert any(part is seg_copy.PixelData for part in parts)
    assert b"".join(parts) == pydicom_bytes(seg_copy)


def awkward_dataset() -> Dataset:
    """One element of each kind the encoder must get exactly right, or hand to pydicom."""
    ds = Dataset()
    ds.file_meta = file_meta("1.2.840.10008.5.1.4.1.1.7", generate_uid())
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = DA(datetime.date(2026, 11, 25))  # a date object: pydicom formats it
    ds.SeriesDate = "20261125"
    ds.StudyTime = ""
    ds.AccessionNumber = None
    ds.Modality = "OT"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstitutionName = "Hôpital Saint-Éloi"  # Latin-1 text: pydicom encodes it
    ds.ReferringPhysicianName = "Doe^John"
    ds.StudyDescription = "odd"
    ds.PatientWeight = "70.5"
    ds.PatientSize = None
    ds.ImagePositionPatient = ["-1.5", "2", "3.25"]
    ds.InstanceNumber = 7
    ds.Rows, ds.Columns = 2, 3
    ds.add(DataElement(0x00280106, "SS", -5))  # Smallest Image Pixel Value
    ds.RescaleIntercept = "-1024"
    ds.add(DataElement(0x00209165, "AT", [0x00200032, 0x00280030]))  # Dimension Index Pointer as AT
    ds.add(DataElement(0x00181310, "US", [0, 64, 64, 0]))  # Acquisition Matrix, multi-valued
    ds.add(DataElement(0x0018602C, "FD", 0.25))
    ds.add(DataElement(0x00189219, "FD", [1.0, 2.5]))
    ds.add(DataElement(0x00189220, "FL", []))
    ds.add(DataElement(0x00091010, "LO", "Private creator"))
    ds.add(DataElement(0x00091011, "OB", b"\x01\x02\x03"))  # odd length
    ds.add(DataElement(0x00091012, "UN", b"\x00\x01"))
    ds.add(DataElement(0x00091013, "UT", "long text " * 10))
    ds.add(DataElement(0x00091014, "UI", "1.2.3"))  # odd length: NUL padding
    ds.add(DataElement(0x00091015, "OW", b""))
    ds.add(DataElement(0x00091016, "UL", 2**32 - 1))
    ds.add(DataElement(0x00091017, "UC", ["a", "bc"]))
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 192"  # a nested character set
    item.CodeMeaning = "Lunge – links"
    item.CodeValue = "123"
    item.CodingSchemeDesignator = "99TEST"
    plain = Dataset()
    plain.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    plain.ReferencedSOPInstanceUID = generate_uid()
    ds.ConceptNameCodeSequence = [item]
    ds.ReferencedImageSequence = [plain, Dataset()]
    ds.ReferencedSeriesSequence = []
    undefined = Sequence([Dataset()])
    ds.add(DataElement(0x00081250, "SQ", undefined, is_undefined_length=True))  # Related Series Sequence
    ds.PixelData = b"\x00\x01" * 3  # "OB or OW" until resolved
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 1
    ds.add(DataElement(0x00280107, "US or SS", -3))  # Largest Image Pixel Value, resolved to SS
    return ds


def test_awkward_values_are_encoded_as_pydicom_encodes_them() -> None:
    assert_same_as_pydicom(awkward_dataset())


def test_an_ambiguous_vr_pydicom_cannot_resolve_fails_as_in_pydicom() -> None:
    ds = awkward_dataset()
    del ds.PixelRepresentation  # "US or SS" depends on it
    with pytest.raises(AttributeError, match="Failed to resolve ambiguous VR"):
        encode_file(ds)
    with pytest.raises(AttributeError, match="Failed to resolve ambiguous VR"):
        pydicom_bytes(ds)


def test_values_too_long_for_a_16_bit_length_are_left_to_pydicom() -> None:
    ds = awkward_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyDescription = "x" * 70_000  # pydicom writes it as UN, with a warning
        parts = encode_file(ds)
        assert parts is not None
        assert b"".join(parts) == pydicom_bytes(ds)


@pytest.mark.parametrize(
    "character_set", [*sorted(python_encoding), ["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 149"]]
)
def test_ascii_text_in_every_character_set_is_encoded_as_pydicom_encodes_it(
    character_set: str | list[str],
) -> None:
    ds = awkward_dataset()
    ds.SpecificCharacterSet = character_set
    ds.InstitutionName = "General Hospital ~ North \\ Annex"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of character sets it handles only in part
        assert_same_as_pydicom(ds)


def file_read_back(dataset: Dataset, replace: tuple[bytes, bytes]) -> Dataset:
    """``dataset`` written by pydicom, with some bytes replaced (same length), and read again."""
    encoded = pydicom_bytes(dataset)
    assert encoded.count(replace[0]) == 1 and len(replace[0]) == len(replace[1])
    return pydicom.dcmread(io.BytesIO(encoded.replace(*replace)))


def test_data_sets_read_from_a_file_keep_their_values_as_read() -> None:
    """A UID padded with a space (common in the wild) stays so, as pydicom keeps it, at any depth."""
    ds = awkward_dataset()
    ds.FrameOfReferenceUID = "1.2.7"
    ds.ReferencedImageSequence[0].FrameOfReferenceUID = "1.2.777"
    read = file_read_back(ds, (b"1.2.7\x00", b"1.2.7 "))
    assert_same_as_pydicom(read)
    read = file_read_back(ds, (b"1.2.777\x00", b"1.2.777 "))
    in_memory = awkward_dataset()
    in_memory.ReferencedImageSequence = [read.ReferencedImageSequence[0]]  # an item read from a file
    assert_same_as_pydicom(in_memory)


@pytest.mark.parametrize(
    "change",
    ["implicit VR syntax", "undefined-length item", "file meta in the data set"],
)
def test_cases_outside_the_narrow_path_are_left_to_pydicom_whole(change: str, tmp_path: Path) -> None:
    ds = awkward_dataset()
    if change == "implicit VR syntax":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif change == "undefined-length item":
        ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
    else:
        ds.add(DataElement(0x00020016, "AE", "SOURCE"))
    assert encode_file(ds) is None
    if change == "file meta in the data set":
        with pytest.raises(ValueError, match="File Meta Information"):
            write_dataset(ds, tmp_path / "bad.dcm", fsync=False)
    else:
        path = write_dataset(ds, tmp_path / "fallback.dcm", fsync=False)
        assert path.read_bytes() == pydicom_bytes(ds)
