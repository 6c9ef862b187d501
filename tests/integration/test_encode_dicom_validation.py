"""SEG and SR from pacs_ai.encode, checked by the validators hospitals trust.

A synthetic 12-slice chest CT with full CT Image IOD headers is written to
disk and read back without Pixel Data (as ``load_series`` delivers it), a
two-lung label map and lung-analyzer-like measurements are encoded, and the
files are checked by dicom3tools' dciodvfy (zero "Error" lines) and DCMTK's
dsrdump (exit 0, nothing on stderr), plus structural checks with pydicom and
highdicom's own parsers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from pacs_ai.analyze.base import AnalysisResult
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode import (
    EquipmentInfo,
    build_measurement_report,
    build_segmentation,
    derived_uid,
    write_dataset,
)
from tests import peers
from tests.integration.synthetic_ct import (
    UCUM_HU,
    UCUM_ML,
    UCUM_PERCENT,
    load_volume,
    lung_labels,
    lung_result,
    make_ct_series,
    write_series,
)

UID_PREFIX = "1.2.826.0.1.3680043.8.498.77."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")


@dataclass
class Encoded:
    volume: Volume
    result: AnalysisResult
    seg: hd.seg.Segmentation
    sr: hd.sr.Comprehensive3DSR
    seg_path: Path
    sr_path: Path


def encode(volume: Volume, result: AnalysisResult, out_dir: Path) -> Encoded:
    """Encode SEG and SR with UIDs derived the way the pipeline derives them."""
    source_series = volume.headers[0].SeriesInstanceUID
    key = (source_series, "lung-profile", result.algorithm.name, result.algorithm.version)
    seg = build_segmentation(
        volume,
        result,
        series_instance_uid=derived_uid(*key, "seg-series", prefix=UID_PREFIX),
        sop_instance_uid=derived_uid(*key, "seg-instance", prefix=UID_PREFIX),
        series_number=901,
        instance_number=1,
        equipment=EQUIPMENT,
        uid_prefix=UID_PREFIX,
    )
    sr = build_measurement_report(
        volume,
        result,
        seg,
        series_instance_uid=derived_uid(*key, "sr-series", prefix=UID_PREFIX),
        sop_instance_uid=derived_uid(*key, "sr-instance", prefix=UID_PREFIX),
        series_number=902,
        instance_number=1,
        equipment=EQUIPMENT,
        uid_prefix=UID_PREFIX,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = write_dataset(seg, out_dir / "seg.dcm")
    sr_path = write_dataset(sr, out_dir / "sr.dcm")
    return Encoded(volume, result, seg, sr, seg_path, sr_path)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    paths = write_series(make_ct_series(12, 64, 64), tmp_path_factory.mktemp("ct"))
    return load_volume(paths)


@pytest.fixture(scope="module")
def result(volume: Volume) -> AnalysisResult:
    return lung_result(volume, lung_labels(volume.voxels.shape))


@pytest.fixture(scope="module")
def encoded(volume: Volume, result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    return encode(volume, result, tmp_path_factory.mktemp("out"))


def require_validator(tool: str) -> None:
    """Skip (not fail) when a validator is not installed, saying how to install it."""
    if tool == "dciodvfy":
        if not peers.DCIODVFY_BINARY.is_file():
            pytest.skip(f"{peers.DCIODVFY_BINARY} not found; install it with: apt-get install dicom3tools")
        return
    try:
        peers.dcmtk(tool)
    except peers.PeerError as exc:
        pytest.skip(f"validator not available: {exc}")


def _content_items(item: Dataset):
    """All content items below ``item``, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _content_items(child)


def _report(path: Path) -> hd.sr.MeasurementReport:
    """The TID 1500 content of an SR file, parsed by highdicom."""
    content = hd.sr.srread(path).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def _concept(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def _child(item: Dataset, meaning: str) -> Dataset:
    """The one child content item of ``item`` named ``meaning``."""
    found = [child for child in item.get("ContentSequence", []) if _concept(child) == meaning]
    assert len(found) == 1, f"{len(found)} items {meaning!r} under {_concept(item)!r}"
    return found[0]


def _measurement_groups(sr: Dataset) -> list[Dataset]:
    return [item for item in _content_items(sr) if _concept(item) == "Measurement Group"]


# --- the validators -------------------------------------------------------------------------


def test_source_headers_have_no_pixel_data(volume: Volume) -> None:
    # The encoders must work from header-only datasets, as load_series delivers them.
    assert all("PixelData" not in header for header in volume.headers)


def test_seg_passes_dciodvfy(encoded: Encoded) -> None:
    require_validator("dciodvfy")
    assert peers.dciodvfy_errors(encoded.seg_path) == []


def test_sr_passes_dciodvfy(encoded: Encoded) -> None:
    require_validator("dciodvfy")
    assert peers.dciodvfy_errors(encoded.sr_path) == []


def test_sr_parses_with_dsrdump(encoded: Encoded) -> None:
    require_validator("dsrdump")
    completed = peers.dsrdump(encoded.sr_path)
    assert completed.returncode == 0, completed.stderr
    assert "error" not in completed.stderr.lower()
    assert "warning" not in completed.stderr.lower()
    assert "Imaging Measurement Report" in completed.stdout
    assert "Completion Flag     : PARTIAL" in completed.stdout
    assert "Verification Flag   : UNVERIFIED" in completed.stdout


# --- SEG structure --------------------------------------------------------------------------


def test_seg_frames_reference_their_source_slice(encoded: Encoded) -> None:
    seg = pydicom.dcmread(encoded.seg_path)
    headers = encoded.volume.headers
    labels = encoded.result.labels
    by_position = {tuple(round(float(v), 3) for v in h.ImagePositionPatient): h for h in headers}
    expected_frames = sum(1 for k in range(labels.shape[0]) for n in (1, 2) if np.any(labels[k] == n))
    assert int(seg.NumberOfFrames) == expected_frames  # empty frames omitted
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == by_position[position].SOPInstanceUID
        assert source.ReferencedSOPClassUID == by_position[position].SOPClassUID


def test_seg_pixels_match_labels_per_source_instance(encoded: Encoded) -> None:
    seg = hd.seg.segread(encoded.seg_path)
    uids = [h.SOPInstanceUID for h in encoded.volume.headers]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, encoded.result.labels)


def test_seg_segments_describe_the_result(encoded: Encoded) -> None:
    seg = pydicom.dcmread(encoded.seg_path)
    assert seg.SegmentationType == "BINARY"
    for item, spec in zip(seg.SegmentSequence, encoded.result.segments, strict=True):
        assert item.SegmentNumber == spec.number
        assert item.SegmentLabel == spec.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == spec.type.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == spec.category.value
        assert spec.recommended_display_cielab is not None
        assert tuple(item.RecommendedDisplayCIELabValue) == spec.recommended_display_cielab
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == encoded.result.algorithm.name
        assert algorithm.AlgorithmVersion == encoded.result.algorithm.version


def test_seg_is_marked_ai_and_unverified(encoded: Encoded) -> None:
    seg = pydicom.dcmread(encoded.seg_path)
    assert "AI" in seg.SeriesDescription and "unverified" in seg.SeriesDescription
    assert "AI-generated" in seg.ContentDescription and "unverified" in seg.ContentDescription


# --- SR structure ---------------------------------------------------------------------------


def test_sr_flags_are_partial_unverified_preliminary(encoded: Encoded) -> None:
    sr = pydicom.dcmread(encoded.sr_path)
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert "AI" in sr.SeriesDescription and "unverified" in sr.SeriesDescription


def test_sr_references_each_seg_segment(encoded: Encoded) -> None:
    # One TID 1501 group per segment (OHIF 3.13 needs a location in every group, which TID 1411's
    # Referenced Segment excludes): each measurement is inferred from the SEG segment (IMAGE with
    # Referenced Segment Number) and from a point inside that segment (SCOORD POINT on a source image).
    sr = pydicom.dcmread(encoded.sr_path)
    labels = encoded.result.labels
    assert labels is not None
    slice_of = {h.SOPInstanceUID: k for k, h in enumerate(encoded.volume.headers)}
    referenced: dict[int, int] = {}
    for group in _measurement_groups(sr):
        if "(segment " not in _child(group, "Tracking Identifier").TextValue:
            continue
        numbers = [item for item in group.ContentSequence if item.ValueType == "NUM"]
        assert numbers
        for num in numbers:
            image = _child(num, "Source of Measurement")
            reference = image.ReferencedSOPSequence[0]
            assert reference.ReferencedSOPInstanceUID == encoded.seg.SOPInstanceUID
            assert reference.ReferencedSOPClassUID == encoded.seg.SOPClassUID
            segment = int(reference.ReferencedSegmentNumber)
            point = _child(num, "Source")
            assert point.ValueType == "SCOORD" and point.GraphicType == "POINT"
            column, row = (int(float(v) - 0.5) for v in point.GraphicData)
            k = slice_of[point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
            assert labels[k, row, column] == segment  # the label sits inside its segment
            referenced[segment] = referenced.get(segment, 0) + 1
    assert sorted(referenced) == [1, 2]
    # The SEG is listed as evidence, so a PACS can fetch it together with the SR.
    sr = pydicom.dcmread(encoded.sr_path)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert encoded.seg.SOPInstanceUID in evidence
    assert {h.SOPInstanceUID for h in encoded.volume.headers} <= evidence


def test_sr_measurements_use_ucum_and_carry_algorithm(encoded: Encoded) -> None:
    sr = pydicom.dcmread(encoded.sr_path)
    numbers = [
        item for item in _content_items(sr) if item.ValueType == "NUM" and item.RelationshipType == "CONTAINS"
    ]
    # 4 per lung + 3 whole-lung measurements; image library NUMs are HAS ACQ CONTEXT.
    assert len(numbers) == len(encoded.result.measurements) == 11
    units = set()
    for item in numbers:
        unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert unit.CodingSchemeDesignator == "UCUM"
        units.add(unit.CodeValue)
        modifiers = {_concept(child): child for child in item.get("ContentSequence", [])}
        assert modifiers["Algorithm Name"].TextValue == encoded.result.algorithm.name
        assert modifiers["Algorithm Version"].TextValue == encoded.result.algorithm.version
        if _concept(item) == "Attenuation Coefficient":
            assert modifiers["Derivation"].ConceptCodeSequence[0].CodeValue == "373098007"
    assert units == {UCUM_ML.value, UCUM_HU.value, UCUM_PERCENT.value}


def test_sr_whole_lung_group_has_finding_site(encoded: Encoded) -> None:
    groups = [
        group
        for group in _report(encoded.sr_path).get_image_measurement_groups()
        if group.finding_sites and group.finding_sites[0].value.value == "39607008"
    ]
    assert len(groups) == 1
    names = [m.name.meaning for m in groups[0].get_measurements()]
    assert names == ["Volume", "Attenuation Coefficient", "Low attenuation area below -950 HU"]


def test_sr_observer_is_the_device(encoded: Encoded) -> None:
    contexts = _report(encoded.sr_path).get_observer_contexts()
    assert len(contexts) == 1
    device = contexts[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.name == f"{encoded.result.algorithm.name} {encoded.result.algorithm.version}"
    assert device.manufacturer_name == EQUIPMENT.manufacturer


def test_sr_image_library_lists_each_source_image_once(encoded: Encoded) -> None:
    # TID 1600: one group for the series; the descriptors all slices share sit on
    # the group (row 3), each entry (TID 1601) keeps only its own position.
    sr = pydicom.dcmread(encoded.sr_path)
    libraries = [item for item in sr.ContentSequence if _concept(item) == "Image Library"]
    assert len(libraries) == 1
    groups = libraries[0].ContentSequence
    assert [_concept(group) for group in groups] == ["Image Library Group"]
    entries = [item for item in groups[0].ContentSequence if item.ValueType == "IMAGE"]
    shared = {_concept(item) for item in groups[0].ContentSequence if item.ValueType != "IMAGE"}
    headers = encoded.volume.headers
    assert [entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for entry in entries] == [
        h.SOPInstanceUID for h in headers
    ]
    assert {"Modality", "Frame of Reference UID", "Pixel Data Rows", "Slice Thickness"} <= shared
    assert "Image Position (Patient) Z" not in shared
    for entry, header in zip(entries, headers, strict=True):
        descriptors = {_concept(item): item for item in entry.ContentSequence}
        assert set(descriptors) == {"Image Position (Patient) Z"}
        z = descriptors["Image Position (Patient) Z"].MeasuredValueSequence[0].NumericValue
        assert float(z) == pytest.approx(float(header.ImagePositionPatient[2]))


def test_local_coding_scheme_is_declared(encoded: Encoded) -> None:
    sr = pydicom.dcmread(encoded.sr_path)
    designators = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert designators == ["99PACSAI"]


@pytest.mark.parametrize("which", ["seg_path", "sr_path"])
def test_contributing_equipment_names_pacs_ai_and_algorithm(encoded: Encoded, which: str) -> None:
    ds = pydicom.dcmread(getattr(encoded, which), stop_before_pixels=True)
    ours = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == EQUIPMENT.manufacturer]
    assert len(ours) == 1
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    algorithm = encoded.result.algorithm
    assert f"{algorithm.name} {algorithm.version}" in list(ours[0].SoftwareVersions)


# --- determinism ----------------------------------------------------------------------------


def _identities(ds: Dataset) -> dict[str, object]:
    ids: dict[str, object] = {
        "study": ds.StudyInstanceUID,
        "series": ds.SeriesInstanceUID,
        "sop": ds.SOPInstanceUID,
    }
    if ds.Modality == "SEG":
        ids["dimension_organization"] = [
            item.DimensionOrganizationUID
            for item in (*ds.DimensionOrganizationSequence, *ds.DimensionIndexSequence)
        ]
    if ds.Modality == "SR":
        ids["uids_in_tree"] = [item.UID for item in _content_items(ds) if item.ValueType == "UIDREF"]
        ids["segment_refs"] = [
            (
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                item.ReferencedSOPSequence[0].ReferencedSegmentNumber,
            )
            for item in _content_items(ds)
            if item.ValueType == "IMAGE" and _concept(item) == "Source of Measurement"
        ]
    return ids


def test_rebuilding_gives_the_same_uids(encoded: Encoded, tmp_path: Path) -> None:
    again = encode(encoded.volume, encoded.result, tmp_path)
    for first, second in ((encoded.seg_path, again.seg_path), (encoded.sr_path, again.sr_path)):
        a = pydicom.dcmread(first, stop_before_pixels=True)
        b = pydicom.dcmread(second, stop_before_pixels=True)
        assert _identities(a) == _identities(b)
    assert encoded.sr_path.read_bytes() != b""  # written atomically to its final name
    assert not list(tmp_path.glob(".*.tmp"))


def test_sr_rejects_a_seg_of_another_study(encoded: Encoded) -> None:
    other = pydicom.dcmread(encoded.seg_path, stop_before_pixels=True)
    other.StudyInstanceUID = "1.2.3.999"
    with pytest.raises(ValueError, match="study"):
        build_measurement_report(
            encoded.volume,
            encoded.result,
            other,
            series_instance_uid="1.2.3.4",
            sop_instance_uid="1.2.3.4.1",
            series_number=902,
            instance_number=1,
            equipment=EQUIPMENT,
        )


def test_seg_rejects_labels_of_the_wrong_shape(encoded: Encoded) -> None:
    bad = AnalysisResult(
        algorithm=encoded.result.algorithm,
        labels=encoded.result.labels[:-1],
        segments=encoded.result.segments,
        measurements=encoded.result.measurements,
    )
    with pytest.raises(ValueError, match="does not match the source series"):
        build_segmentation(
            encoded.volume,
            bad,
            series_instance_uid="1.2.3.4",
            sop_instance_uid="1.2.3.4.1",
            series_number=901,
            instance_number=1,
            equipment=EQUIPMENT,
        )


def test_empty_label_map_still_gives_valid_seg_and_sr(encoded: Encoded, tmp_path: Path) -> None:
    # "Nothing found" is a result: highdicom keeps all (empty) frames, since a SEG needs one.
    empty = AnalysisResult(
        algorithm=encoded.result.algorithm,
        labels=np.zeros_like(encoded.result.labels),
        segments=encoded.result.segments,
        measurements=encoded.result.measurements,
    )
    again = encode(encoded.volume, empty, tmp_path)
    assert int(again.seg.NumberOfFrames) == len(encoded.volume.headers) * len(empty.segments)
    require_validator("dciodvfy")
    assert peers.dciodvfy_errors(again.seg_path) == []
    assert peers.dciodvfy_errors(again.sr_path) == []
