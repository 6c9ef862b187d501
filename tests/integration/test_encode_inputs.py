"""Valid results from real and from broken inputs, and detections in the measurement SR.

What highdicom copies from the source (patient, study, references) must not
make our SEG and SRs invalid: a real scanner's de-identified header (shared
data) and headers broken on purpose (a Referenced Study Sequence item without
its SOP Class UID, a Patient's Age without unit) still give results with no
dciodvfy errors.  Detections (:class:`DetectionSpec`) become located TID 1501
groups with their own tracking identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO

from pacs_ai.analyze.base import AnalysisResult, Code, DetectionSpec
from pacs_ai.analyze.volume import Volume, load_series
from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.copied import drop_incomplete_references
from pacs_ai.encode.report_sr import DraftingModel, ReportText, build_draft_sr, draft_sr_uids
from pacs_ai.encode.results import build_results
from tests import peers
from tests.integration.synthetic_ct import lung_labels, lung_result, make_ct_series, volume_from_headers

EQUIPMENT = EquipmentInfo(device_serial_number="test-node-1")
NODULE = Code("27925004", "SCT", "Nodule")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")


def _header_only(ds: Dataset) -> Dataset:
    buffer = DicomBytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


def _write_all(volume: Volume, result: AnalysisResult, out: Path, key: str) -> list[Path]:
    """SEG, measurement SR and draft SR of ``result``, written as Part 10 files."""
    objects = build_results(volume, result, key=key, equipment=EQUIPMENT)
    series_uid, instance_uid = draft_sr_uids(key, 1)
    draft = build_draft_sr(
        evidence=[*volume.headers, *(ds for _, ds in objects)],
        text=ReportText("Lungs measured.", "No acute finding."),
        drafter=DraftingModel("template", "test"),
        equipment=EQUIPMENT,
        series_instance_uid=series_uid,
        sop_instance_uid=instance_uid,
    )
    out.mkdir(parents=True, exist_ok=True)
    named = [*((kind.lower(), ds) for kind, ds in objects), ("draft", draft)]
    return [write_dataset(ds, out / f"{name}.dcm", fsync=False) for name, ds in named]


def _require_dciodvfy() -> None:
    if not peers.DCIODVFY_BINARY.is_file():
        pytest.fail(f"{peers.DCIODVFY_BINARY} missing; install dicom3tools (scripts/test does)")


def test_results_from_a_real_scanner_header_are_valid(tmp_path: Path) -> None:
    _require_dciodvfy()
    series = peers.require_shared_data("ct-chest-lungdx-a0002/b40f-soft")
    volume = load_series(sorted(series.glob("*.dcm")))
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    for path in _write_all(volume, result, tmp_path, "real-header"):
        assert peers.dciodvfy_errors(path) == [], path.name


def _broken_series() -> list[Dataset]:
    """A synthetic series whose headers break the standard the way field data does."""
    broken = []
    for ds in make_ct_series(n_slices=8, rows=32, columns=32):
        incomplete = Dataset()
        incomplete.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # no Referenced SOP Class UID
        complete = Dataset()
        complete.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
        complete.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.ReferencedStudySequence = [incomplete, complete]
        ds.ReferencedPatientSequence = [Dataset()]  # an empty item
        ds.PatientAge = "62"  # no unit
        broken.append(ds)
    return broken


def test_the_broken_source_itself_fails_validation(tmp_path: Path) -> None:
    # Otherwise the next test would prove nothing.
    _require_dciodvfy()
    path = tmp_path / "ct.dcm"
    _broken_series()[0].save_as(path, enforce_file_format=True)
    errors = peers.dciodvfy_errors(path)
    assert any("<ReferencedSOPClassUID>" in line for line in errors), errors


def test_results_from_broken_headers_are_valid(tmp_path: Path) -> None:
    _require_dciodvfy()
    volume = volume_from_headers([_header_only(ds) for ds in _broken_series()])
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    for path in _write_all(volume, result, tmp_path, "broken-header"):
        assert peers.dciodvfy_errors(path) == [], path.name
        written = pydicom.dcmread(path, stop_before_pixels=True)
        assert [item.ReferencedSOPInstanceUID for item in written.ReferencedStudySequence] == [
            "1.2.826.0.1.3680043.8.498.2"
        ]
        assert "ReferencedPatientSequence" not in written
        assert "PatientAge" not in written
        # Identifying attributes are copied untouched.
        assert written.PatientID == volume.headers[0].PatientID
        assert written.StudyInstanceUID == volume.headers[0].StudyInstanceUID


def test_complete_references_are_kept() -> None:
    ds = Dataset()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedStudySequence = [item]
    assert drop_incomplete_references(ds) == []
    assert len(ds.ReferencedStudySequence) == 1


# --- detections --------------------------------------------------------------------------


def _children(item: Dataset, meaning: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if c.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _detection_volume() -> tuple[Volume, AnalysisResult]:
    volume = volume_from_headers(
        [_header_only(ds) for ds in make_ct_series(n_slices=10, rows=64, columns=64)]
    )
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    return volume, result


def test_detections_become_located_groups(tmp_path: Path) -> None:
    _require_dciodvfy()
    volume, result = _detection_volume()
    z = [float(h.ImagePositionPatient[2]) for h in volume.headers]
    result.detections = [
        DetectionSpec(NODULE, 0.91, (-10.0, -5.0, z[3] - 1.0), (-2.0, 4.0, z[3] + 4.0), RIGHT_LUNG),
        DetectionSpec(NODULE, 0.35, (5.0, 0.0, z[7] - 2.0), (9.0, 6.0, z[7] + 2.0)),
    ]
    sr_path = next(p for p in _write_all(volume, result, tmp_path, "detections") if p.name == "sr.dcm")
    assert peers.dciodvfy_errors(sr_path) == []
    assert peers.dsrdump(sr_path).stderr == ""
    sr = pydicom.dcmread(sr_path)
    measurements = _children(sr, "Imaging Measurements")[0]
    groups = [g for g in _children(measurements, "Measurement Group") if _children(g, "Finding")]
    nodules = [
        g for g in groups if _children(g, "Finding")[0].ConceptCodeSequence[0].CodeValue == NODULE.value
    ]
    # Per nodule a TID 1410 group with its outline as Image Region (what OHIF hydrates) and a TID 1501
    # group with its values, both with the nodule's tracking identity.
    regions = [g for g in nodules if _children(g, "Image Region")]
    valued = [g for g in nodules if not _children(g, "Image Region")]
    assert len(regions) == len(valued) == 2
    tracking_uids = [_children(g, "Tracking Unique Identifier")[0].UID for g in valued]
    assert len(set(tracking_uids)) == 2
    assert [_children(g, "Tracking Unique Identifier")[0].UID for g in regions] == tracking_uids
    for groups_of_a_kind in (regions, valued):
        assert [_children(g, "Tracking Identifier")[0].TextValue for g in groups_of_a_kind] == [
            "Nodule 1 (AI detection)",
            "Nodule 2 (AI detection)",
        ]
    region = _children(regions[0], "Image Region")[0]
    assert (region.ValueType, region.GraphicType, len(region.GraphicData)) == ("SCOORD", "POLYLINE", 10)
    assert [item.ValueType for item in regions[0].ContentSequence].count("NUM") == 0
    first = valued[0]
    assert _children(first, "Finding Site")[0].ConceptCodeSequence[0].CodeValue == RIGHT_LUNG.value
    values = {
        num.ConceptNameCodeSequence[0].CodeMeaning: float(num.MeasuredValueSequence[0].NumericValue)
        for num in first.ContentSequence
        if num.ValueType == "NUM"
    }
    assert values == {"Width": 8.0, "Height": 9.0, "Depth": 5.0, "Certainty of Finding": pytest.approx(0.91)}
    for num in (item for item in first.ContentSequence if item.ValueType == "NUM"):
        outline = _children(num, "Source")[0]
        assert outline.ValueType == "SCOORD" and outline.GraphicType == "POLYLINE"
        points = np.array(outline.GraphicData, dtype=float).reshape(-1, 2)
        assert len(points) == 5 and np.allclose(points[0], points[-1])  # closed rectangle
        assert list(outline.GraphicData) == list(region.GraphicData)  # the values' outline is the region
        image = outline.ContentSequence[0].ReferencedSOPSequence[0]
        # Drawn on the slice nearest the box centre (z[3] + 1.5 mm, slices 2.5 mm apart).
        assert image.ReferencedSOPInstanceUID == volume.headers[4].SOPInstanceUID
        spacing = float(volume.headers[4].PixelSpacing[0])
        origin = [float(v) for v in volume.headers[4].ImagePositionPatient]
        columns = points[:, 0] - 0.5
        assert columns.min() * spacing + origin[0] == pytest.approx(-10.0)
        assert columns.max() * spacing + origin[0] == pytest.approx(-2.0)


def test_each_group_is_labelled_on_a_slice_of_its_own(tmp_path: Path) -> None:
    """OHIF draws every label of a slice at once: groups sharing a slice overlap and cannot be read."""
    volume, result = _detection_volume()
    z = [float(h.ImagePositionPatient[2]) for h in volume.headers]
    result.detections = [DetectionSpec(NODULE, 0.9, (-10.0, -5.0, z[5] - 1.0), (-2.0, 4.0, z[5] + 1.0))]
    sr_path = next(p for p in _write_all(volume, result, tmp_path, "slices") if p.name == "sr.dcm")
    sr = pydicom.dcmread(sr_path)
    measurements = _children(sr, "Imaging Measurements")[0]
    slices_of_findings: dict[str, set[str]] = {}  # a nodule's region and values groups: one finding
    for group in _children(measurements, "Measurement Group"):
        scoords = [
            source
            for num in group.ContentSequence
            if num.ValueType == "NUM"
            for source in num.get("ContentSequence", [])
            if source.ValueType == "SCOORD"
        ] + _children(group, "Image Region")
        images = {
            scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for scoord in scoords
        }
        assert len(images) == 1, images  # all of a group's values are placed on one image
        uid = _children(group, "Tracking Unique Identifier")[0].UID
        slices_of_findings.setdefault(uid, set()).update(images)
    assert all(len(images) == 1 for images in slices_of_findings.values()), slices_of_findings
    slices_of_groups = [images.pop() for images in slices_of_findings.values()]
    # Right lung, left lung, both lungs and the nodule: four findings, four slices.
    assert len(slices_of_groups) == 4 and len(set(slices_of_groups)) == 4, slices_of_groups


@pytest.mark.parametrize(
    "detection",
    [
        DetectionSpec(NODULE, 1.5, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        DetectionSpec(NODULE, 0.5, (2.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ],
)
def test_impossible_detections_are_refused(detection: DetectionSpec, tmp_path: Path) -> None:
    volume, result = _detection_volume()
    result.detections = [detection]
    with pytest.raises(ValueError, match="Detection"):
        build_results(volume, result, key="bad", equipment=EQUIPMENT)
