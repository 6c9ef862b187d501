"""Classification findings of a real chest radiograph as a TID 1500 SR, checked by dciodvfy and dsrdump.

The radiograph is the real SIIM CR sample (JPEG Baseline, Secondary Capture;
``/work/shared/data/cxr-cr``), loaded by ``load_radiograph`` as the pipeline
loads it.  A hand-made classifier result with one present and one absent
finding goes through ``build_results``; the one SR it gives must pass the
validators and say, per finding, what was found, with which probability,
threshold and algorithm, on which image.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation

from pacs_ai.analyze.base import AlgorithmInfo, AnalysisResult, Code, FindingSpec
from pacs_ai.analyze.radiograph import load_radiograph
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode import EquipmentInfo, build_measurement_report, write_dataset
from pacs_ai.encode.results import build_results
from tests import peers
from tests.integration.test_encode_dicom_validation import require_validator

UID_PREFIX = "1.2.826.0.1.3680043.8.498.77."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
EFFUSION = Code("60046008", "SCT", "Pleural effusion")
PLEURA = Code("3120008", "SCT", "Pleural membrane structure")
ALGORITHM = AlgorithmInfo(
    name="cxr-ptx",
    version="1.0.0",
    family=Code("123109", "DCM", "Artificial Intelligence"),
    parameters={"model": "cxr-ptx"},
)


@pytest.fixture(scope="module")
def radiograph() -> Volume:
    folder = peers.require_shared_data("cxr-cr")
    return load_radiograph([folder / "siim_cr.dcm"])


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return AnalysisResult(
        algorithm=ALGORITHM,
        labels=None,
        segments=[],
        measurements=[],
        findings=[
            FindingSpec(PNEUMOTHORAX, probability=0.93, threshold=0.5),
            FindingSpec(EFFUSION, probability=0.12, threshold=0.4, finding_site=PLEURA),
        ],
    )


@pytest.fixture(scope="module")
def built(radiograph: Volume, result: AnalysisResult) -> list[tuple[str, Dataset]]:
    return build_results(radiograph, result, key="cxr-job|v1", equipment=EQUIPMENT, uid_prefix=UID_PREFIX)


@pytest.fixture(scope="module")
def sr_path(built: list[tuple[str, Dataset]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "findings-sr.dcm"
    write_dataset(built[-1][1], path, fsync=False)
    return path


def _concept(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def _algorithm(item: Dataset) -> tuple[str, str, set[str]]:
    """(name, version, parameters) of the TID 4019 items directly below a content item."""
    texts: dict[str, list[str]] = {}
    for child in item.ContentSequence:
        if child.ValueType == "TEXT":
            texts.setdefault(_concept(child), []).append(child.TextValue)
    return (
        texts["Algorithm Name"][0],
        texts["Algorithm Version"][0],
        set(texts.get("Algorithm Parameters", [])),
    )


def _groups(path: Path) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    content = hd.sr.srread(path).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return list(content.get_image_measurement_groups())


def test_classifier_result_gives_an_sr_and_no_seg(built: list[tuple[str, Dataset]]) -> None:
    assert [kind for kind, _ in built] == ["SR"]
    assert built[0][1].SOPClassUID == pydicom.uid.Comprehensive3DSRStorage


def test_sr_passes_dciodvfy(sr_path: Path) -> None:
    require_validator("dciodvfy")
    assert peers.dciodvfy_errors(sr_path) == []


def test_sr_parses_with_dsrdump(sr_path: Path) -> None:
    require_validator("dsrdump")
    completed = peers.dsrdump(sr_path, "--print-all-codes")
    assert completed.returncode == 0, completed.stderr
    assert "error" not in completed.stderr.lower()
    assert "warning" not in completed.stderr.lower()
    assert "Verification Flag   : UNVERIFIED" in completed.stdout
    assert '(36118008,SCT,"Pneumothorax")=(52101004,SCT,"Present")' in completed.stdout
    assert '(60046008,SCT,"Pleural effusion")=(2667000,SCT,"Absent")' in completed.stdout
    assert '"Certainty of Finding")="0.93" ({probability},UCUM,"probability")' in completed.stdout


def test_each_finding_has_a_group_with_evaluation_probability_and_algorithm(
    sr_path: Path, result: AnalysisResult
) -> None:
    groups = _groups(sr_path)
    assert [group.finding_type.value for group in groups] == [f.finding.value for f in result.findings]
    for group, finding in zip(groups, result.findings, strict=True):
        # highdicom lists every CODE item of the group here (also the Finding); pick the evaluation.
        evaluations = [
            e for e in group.get_qualitative_evaluations() if e.name.value == finding.finding.value
        ]
        assert [(e.name.value, e.value.value) for e in evaluations] == [
            (finding.finding.value, "52101004" if finding.present else "2667000")
        ]
        (measurement,) = group.get_measurements()
        assert measurement.name.value == "111012"  # Certainty of Finding
        assert measurement.value == pytest.approx(finding.probability)
        assert measurement.unit.value == "{probability}"
        expected = (ALGORITHM.name, ALGORITHM.version, {"model=cxr-ptx", f"threshold={finding.threshold:g}"})
        assert _algorithm(group[0]) == expected  # TID 4019 on the group
        assert _algorithm(measurement[0]) == expected  # and on the probability
    sites = [[site.value.value for site in group.finding_sites] for group in groups]
    assert sites == [[], [PLEURA.value]]


def test_finding_groups_reference_the_source_image(sr_path: Path, radiograph: Volume) -> None:
    source_uid = radiograph.headers[0].SOPInstanceUID
    for group in _groups(sr_path):
        (source,) = group.source_images
        assert source.referenced_sop_instance_uid == source_uid
    sr = pydicom.dcmread(sr_path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    referenced = [
        instance.ReferencedSOPInstanceUID
        for study in evidence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    assert referenced == [source_uid]  # the radiograph only: there is no SEG


def test_image_library_describes_the_radiograph(sr_path: Path, radiograph: Volume) -> None:
    sr = pydicom.dcmread(sr_path)
    (library,) = [item for item in sr.ContentSequence if _concept(item) == "Image Library"]
    (group,) = library.ContentSequence
    descriptors = {_concept(item): item for item in group.ContentSequence if item.ValueType != "IMAGE"}
    entries = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    assert descriptors["Modality"].ConceptCodeSequence[0].CodeValue == "CR"
    assert int(descriptors["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue) == 1024
    # This Secondary Capture has an empty Patient Orientation and no Imager Pixel Spacing.
    assert "Patient Orientation Row" not in descriptors
    assert "Horizontal Pixel Spacing" not in descriptors
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [
        radiograph.headers[0].SOPInstanceUID
    ]


def test_sr_reports_a_chest_radiograph_as_ai_output(sr_path: Path) -> None:
    sr = pydicom.dcmread(sr_path)
    assert "AI" in sr.SeriesDescription and "unverified" in sr.SeriesDescription
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    procedure = [item for item in sr.ContentSequence if _concept(item) == "Procedure reported"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "399208008"  # Plain chest X-ray
    ours = [item for item in sr.ContributingEquipmentSequence if item.Manufacturer == EQUIPMENT.manufacturer]
    assert len(ours) == 1
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert f"{ALGORITHM.name} {ALGORITHM.version}" in list(ours[0].SoftwareVersions)


def test_malformed_optional_source_value_is_left_out(sr_path: Path, radiograph: Volume) -> None:
    # The source's Patient's Age "62" is not a valid AS ("062Y"); copied as is it fails dciodvfy.
    assert radiograph.headers[0].PatientAge == "62"
    sr = pydicom.dcmread(sr_path)
    assert "PatientAge" not in sr
    assert sr.PatientID == radiograph.headers[0].PatientID


def test_rebuilding_gives_the_same_identities(
    built: list[tuple[str, Dataset]], radiograph: Volume, result: AnalysisResult
) -> None:
    again = build_results(radiograph, result, key="cxr-job|v1", equipment=EQUIPMENT, uid_prefix=UID_PREFIX)
    assert again[0][1].SOPInstanceUID == built[0][1].SOPInstanceUID
    assert again[0][1].SeriesInstanceUID == built[0][1].SeriesInstanceUID


def test_dx_with_orientation_and_imager_spacing_has_projection_descriptors(
    radiograph: Volume, result: AnalysisResult, tmp_path: Path
) -> None:
    # The same image described as a DX for presentation with the TID 1603 attributes present.
    header = Dataset()
    header.update(radiograph.headers[0])
    header.SOPClassUID = DigitalXRayImageStorageForPresentation
    header.Modality = "DX"
    header.PatientOrientation = ["P", "F"]
    header.ImagerPixelSpacing = [0.2, 0.175]
    header.PatientAge = "062Y"
    volume = replace(radiograph, headers=[header])
    sr = build_measurement_report(
        volume,
        result,
        None,
        series_instance_uid=pydicom.uid.generate_uid(prefix=UID_PREFIX),
        sop_instance_uid=pydicom.uid.generate_uid(prefix=UID_PREFIX),
        series_number=9002,
        instance_number=1,
        equipment=EQUIPMENT,
    )
    path = tmp_path / "dx-sr.dcm"
    write_dataset(sr, path, fsync=False)
    library = next(item for item in sr.ContentSequence if _concept(item) == "Image Library")
    descriptors = {
        _concept(item): item
        for item in library.ContentSequence[0].ContentSequence
        if item.ValueType != "IMAGE"
    }
    assert descriptors["Modality"].ConceptCodeSequence[0].CodeValue == "DX"
    assert descriptors["Patient Orientation Row"].TextValue == "P"
    assert descriptors["Patient Orientation Column"].TextValue == "F"
    assert float(descriptors["Horizontal Pixel Spacing"].MeasuredValueSequence[0].NumericValue) == 0.175
    assert float(descriptors["Vertical Pixel Spacing"].MeasuredValueSequence[0].NumericValue) == 0.2
    assert sr.PatientAge == "062Y"  # a valid optional value is kept
    require_validator("dciodvfy")
    assert peers.dciodvfy_errors(path) == []


def test_findings_with_a_probability_outside_0_1_are_rejected(
    radiograph: Volume, result: AnalysisResult
) -> None:
    broken = replace(result, findings=[FindingSpec(PNEUMOTHORAX, probability=1.7, threshold=0.5)])
    with pytest.raises(ValueError, match="within 0..1"):
        build_results(radiograph, broken, key="k", equipment=EQUIPMENT)


def test_a_result_with_segments_needs_its_seg(radiograph: Volume, result: AnalysisResult) -> None:
    from pacs_ai.analyze.base import SegmentSpec

    segment = SegmentSpec(
        1, "lung", Code("91723000", "SCT", "Anatomical Structure"), Code("39607008", "SCT", "Lung")
    )
    with pytest.raises(ValueError, match="no SEG was given"):
        build_measurement_report(
            radiograph,
            replace(result, segments=[segment]),
            None,
            series_instance_uid="1.2.3",
            sop_instance_uid="1.2.3.4",
            series_number=1,
            instance_number=1,
            equipment=EQUIPMENT,
        )
