"""Reading a received instance's header from the bytes the listener kept, or from its file."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from pacs_ai.receive.filemeta import encode_file_meta
from pacs_ai.receive.headers import (
    HEADER_TAGS,
    STATUS_CANNOT_UNDERSTAND,
    InstanceRejected,
    ReceivedBytes,
    header_from_prefix,
    read_header,
)
from pacs_ai.receive.server import HEADER_PREFIX_BYTES
from tests.peers import data_set_bytes, require_shared_data

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
#: The header's attributes and Specific Character Set, which pydicom always reads with them.
_READ_TAGS = {*HEADER_TAGS, 0x00080005}


def _pixel_data_offset(data: bytes) -> int:
    """Where the Pixel Data element starts in a little-endian Part 10 file."""
    offset = data.find(b"\xe0\x7f\x10\x00")
    assert offset > 0
    return offset


def _sr_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A small instance without Pixel Data (as an SR is), written as a Part 10 file."""
    ds = Dataset()
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, path.read_bytes()


def test_a_prefix_reaching_pixel_data_gives_the_same_header_as_the_file() -> None:
    path = require_shared_data("ct-head-ge") / "01.dcm"
    data = path.read_bytes()
    prefix = data[: _pixel_data_offset(data) + 100]

    from_prefix = header_from_prefix(ReceivedBytes(prefix))

    assert from_prefix is not None
    from_file = dcmread(path, stop_before_pixels=True)
    assert [e.tag for e in from_prefix] == [e.tag for e in from_file if e.tag in _READ_TAGS]
    assert from_prefix.SOPInstanceUID == from_file.SOPInstanceUID
    assert from_prefix.PatientName == from_file.PatientName


@pytest.mark.parametrize("cut", [200, 600, -10, -3])
def test_a_prefix_ending_before_pixel_data_is_not_trusted(cut: int) -> None:
    """Cut inside the file meta, inside the data set, or just before the Pixel Data tag."""
    data = (require_shared_data("ct-head-ge") / "01.dcm").read_bytes()
    end = cut if cut > 0 else _pixel_data_offset(data) + cut

    assert header_from_prefix(ReceivedBytes(data[:end])) is None


def test_a_prefix_that_is_the_whole_file_is_enough_without_pixel_data(tmp_path: Path) -> None:
    path, data = _sr_file(tmp_path)

    assert header_from_prefix(ReceivedBytes(data)) is None  # could have been cut at an element boundary
    whole = header_from_prefix(ReceivedBytes(data, whole=True))
    assert whole is not None and whole.Modality == "SR"


def test_read_header_falls_back_to_the_file_when_the_prefix_is_short() -> None:
    path = require_shared_data("ct-head-ge") / "01.dcm"
    expected = dcmread(path, stop_before_pixels=True)

    header = read_header(
        path,
        command_sop_class=expected.SOPClassUID,
        command_sop_instance=expected.SOPInstanceUID,
        received=ReceivedBytes(path.read_bytes()[:300]),
    )

    assert header.series_instance_uid == expected.SeriesInstanceUID
    assert header.modality == "CT"


def test_read_header_refuses_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)

    with pytest.raises(InstanceRejected) as refused:
        read_header(
            junk,
            command_sop_class=COMPREHENSIVE_SR,
            command_sop_instance="1.2.3",
            received=ReceivedBytes(junk.read_bytes(), whole=True),
        )
    assert refused.value.status == STATUS_CANNOT_UNDERSTAND


def test_header_from_prefix_never_raises_on_garbage() -> None:
    assert header_from_prefix(ReceivedBytes(b"not dicom")) is None
    assert header_from_prefix(ReceivedBytes(b"not dicom", whole=True)) is None


def _converted_by_pydicom(ds: Dataset, keyword: str) -> object:
    """What pydicom makes of an attribute, in the form the index records it."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword in ("SeriesNumber", "InstanceNumber"):
        return int(value)
    if keyword == "SliceThickness":
        return float(value)
    if keyword == "ImageType":
        return "\\".join(str(item) for item in value) if isinstance(value, MultiValue) else str(value)
    return str(value)


def _dicom_headers(folder: str, *, files: int) -> list[tuple[Path, Dataset]]:
    """The DICOM files among the first ``files`` of a shared-data folder, with pydicom's header of each."""
    paths = [path for path in sorted(require_shared_data(folder).rglob("*")) if path.is_file()]
    headers = []
    for path in paths[:files]:
        try:
            headers.append((path, dcmread(path, stop_before_pixels=True)))
        except Exception:
            continue  # README and other non-DICOM files
    return headers


@pytest.mark.parametrize("folder", ["ct-head-ge", "ct-chest-slices", "cxr-cr"])
def test_attributes_read_from_raw_bytes_equal_pydicom_conversions(folder: str) -> None:
    """Real files from three vendors: the UI, CS, DA, IS and DS values read without pydicom's conversion."""
    checked = 0
    for path, reference in _dicom_headers(folder, files=20):
        header = read_header(
            path, command_sop_class=reference.SOPClassUID, command_sop_instance=reference.SOPInstanceUID
        )
        for keyword, field in [
            ("StudyInstanceUID", "study_instance_uid"),
            ("SeriesInstanceUID", "series_instance_uid"),
            ("PatientBirthDate", "patient_birth_date"),
            ("PatientSex", "patient_sex"),
            ("StudyDate", "study_date"),
            ("Modality", "modality"),
            ("BodyPartExamined", "body_part_examined"),
            ("SeriesNumber", "series_number"),
            ("InstanceNumber", "instance_number"),
            ("ImageType", "image_type"),
            ("SliceThickness", "slice_thickness"),
            ("PatientName", "patient_name"),
            ("PatientID", "patient_id"),
            ("AccessionNumber", "accession_number"),
            ("StudyDescription", "study_description"),
            ("SeriesDescription", "series_description"),
        ]:
            expected = _converted_by_pydicom(reference, keyword)
            if keyword == "PatientID":
                expected = expected or ""  # Type 2: filed under "" when empty or absent
            assert getattr(header, field) == expected, (path, keyword)
        checked += 1
    assert checked


def test_numbers_that_are_not_one_number_are_not_recorded(tmp_path: Path) -> None:
    path, _ = _sr_file(tmp_path)
    ds = dcmread(path)
    ds.add_new(0x00200011, "IS", "1\\2")  # SeriesNumber, two values
    ds.add_new(0x00200013, "IS", "7.0")  # InstanceNumber written as a decimal
    ds.add_new(0x00180050, "DS", "NaN")  # SliceThickness
    ds.ImageType = ["DERIVED", " SECONDARY "]
    ds.save_as(path)
    header = read_header(path, command_sop_class=ds.SOPClassUID, command_sop_instance=ds.SOPInstanceUID)
    assert header.series_number is None
    assert header.instance_number == 7
    assert header.slice_thickness is None
    assert header.image_type == "DERIVED\\SECONDARY"


def _as_the_listener_keeps_it(path: Path, *, cut: int = HEADER_PREFIX_BYTES) -> ReceivedBytes:
    """The file meta the listener writes for ``path``'s data set, then the data set, cut as it keeps it."""
    ds = dcmread(path, stop_before_pixels=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    encoded = meta + data_set_bytes(path)
    return ReceivedBytes(encoded[:cut], len(encoded) <= cut, len(meta), syntax)


@pytest.mark.parametrize("folder", ["ct-head-ge", "ct-chest-slices", "cxr-cr"])
def test_the_data_set_after_the_listeners_file_meta_gives_the_same_header(folder: str) -> None:
    """Three vendors, explicit and implicit VR, a JPEG radiograph: read past the file meta or not, alike."""
    checked = 0
    for path, reference in _dicom_headers(folder, files=10):
        commands = {
            "command_sop_class": str(reference.SOPClassUID),
            "command_sop_instance": str(reference.SOPInstanceUID),
        }
        received = _as_the_listener_keeps_it(path)
        from_received = header_from_prefix(received)
        assert from_received is not None, path
        assert [e.tag for e in from_received] == [e.tag for e in reference if e.tag in _READ_TAGS]
        assert read_header(path, received=received, **commands) == read_header(path, **commands)
        checked += 1
    assert checked


def _first_element_past_the_header(received: ReceivedBytes) -> int:
    """Where the first element after the last of :data:`HEADER_TAGS` starts, in the received bytes."""
    stream = BytesIO(bytes(received.data))
    stream.seek(received.data_set_offset or 0)
    read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag > max(HEADER_TAGS))
    return stream.tell()


def test_a_data_set_cut_short_after_the_listeners_file_meta_is_trusted_only_past_the_header() -> None:
    path = require_shared_data("ct-head-ge") / "01.dcm"
    received = _as_the_listener_keeps_it(path)
    boundary = _first_element_past_the_header(received)
    assert boundary < _pixel_data_offset(bytes(received.data))

    for cut in (received.data_set_offset or 0) + 40, boundary - 1, boundary + 4:
        assert header_from_prefix(_as_the_listener_keeps_it(path, cut=cut)) is None, cut
    # Once the next element's tag can be read, every attribute the index needs is there.
    enough = header_from_prefix(_as_the_listener_keeps_it(path, cut=boundary + 8))
    assert enough is not None
    assert enough.InstanceNumber == dcmread(path, stop_before_pixels=True).InstanceNumber


def test_a_header_with_tags_out_of_order_is_read_from_the_whole_file(tmp_path: Path) -> None:
    """The early read stops at the first tag past the header's; a UID written after it is not lost."""
    path, _ = _sr_file(tmp_path)
    ds = dcmread(path)
    ds.add_new(0x00280010, "US", 1)  # Rows, a tag past the header's
    ds.save_as(path, enforce_file_format=True)
    data_set = bytearray(data_set_bytes(path))
    # Move the SeriesInstanceUID element (0020,000E) to the end, after Rows.
    start = data_set.index(b"\x20\x00\x0e\x00UI")
    length = int.from_bytes(data_set[start + 6 : start + 8], "little")
    element = bytes(data_set[start : start + 8 + length])
    del data_set[start : start + 8 + length]
    syntax = str(ds.file_meta.TransferSyntaxUID)
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    path.write_bytes(meta + bytes(data_set) + element)
    received = ReceivedBytes(path.read_bytes(), True, len(meta), syntax)
    early = header_from_prefix(received)
    assert early is not None and "SeriesInstanceUID" not in early

    header = read_header(
        path, command_sop_class=ds.SOPClassUID, command_sop_instance=ds.SOPInstanceUID, received=received
    )

    assert header.series_instance_uid == ds.SeriesInstanceUID


def test_a_deflated_data_set_is_read_by_pydicom_in_full(tmp_path: Path) -> None:
    """Deflated bytes cannot be read as they are: the whole-file reader inflates them."""
    path, _ = _sr_file(tmp_path)
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    received = _as_the_listener_keeps_it(path)
    assert received.whole

    from_received = header_from_prefix(received)

    assert from_received is not None and from_received.Modality == "SR"
    assert from_received.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


@pytest.mark.parametrize(
    ("character_set", "patient_name", "description"),
    [
        (None, " Doe^John  ", "  Chest  CT "),
        ("ISO_IR 100", "M\u00fcller^J\u00f6rg", "Thorax nativ"),
        ("ISO_IR 192", "\u5c71\u7530^\u592a\u90ce", "\u80f8\u90e8CT"),
        ("\\ISO 2022 IR 87", "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce", "Chest"),
        (None, "Doe^John", "Chest\\Abdomen"),  # two values where one is expected
    ],
)
def test_text_attributes_are_decoded_as_pydicom_decodes_them(
    tmp_path: Path, character_set: str | None, patient_name: str, description: str
) -> None:
    """ASCII values are read from their raw bytes; any other character set goes through pydicom."""
    path, _ = _sr_file(tmp_path)
    ds = dcmread(path)
    if character_set:
        ds.SpecificCharacterSet = character_set
    ds.PatientName = patient_name
    ds.StudyDescription = description
    ds.AccessionNumber = "A1 "
    ds.save_as(path)
    reference = dcmread(path)
    commands = {"command_sop_class": ds.SOPClassUID, "command_sop_instance": ds.SOPInstanceUID}

    from_file = read_header(path, **commands)
    from_received = read_header(path, received=_as_the_listener_keeps_it(path), **commands)

    for header in from_file, from_received:
        assert header.patient_name == str(reference.PatientName)
        assert header.study_description == str(reference.StudyDescription)
        assert header.accession_number == "A1"
