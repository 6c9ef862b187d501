"""A second version of an analysis's results: new identities, "(v2)", and the SR naming its predecessor.

Both versions are built the way the job runner builds them (keys differing only
in the job version), written, and checked by dicom3tools' dciodvfy and DCMTK's
dsrdump.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.results import PreviousResult, build_results
from tests import peers
from tests.integration.synthetic_ct import load_volume, lung_labels, lung_result, make_ct_series, write_series

PREFIX = "1.2.826.0.1.3680043.8.498.77."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("versions")
    volume = load_volume(write_series(make_ct_series(), out / "ct"))
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    written: dict[str, dict[str, Path]] = {}
    previous: list[PreviousResult] = []
    for version in (1, 2):
        key = f"{volume.headers[0].SeriesInstanceUID}|lungs|lung@1|v{version}"
        objects = build_results(
            volume,
            result,
            key=key,
            equipment=EQUIPMENT,
            uid_prefix=PREFIX,
            version=version,
            previous=previous,
        )
        written[f"v{version}"] = {
            kind: write_dataset(dataset, out / f"{kind}-v{version}.dcm", fsync=False)
            for kind, dataset in objects
        }
        previous = [
            PreviousResult(
                kind,
                str(dataset.StudyInstanceUID),
                str(dataset.SeriesInstanceUID),
                str(dataset.SOPClassUID),
                str(dataset.SOPInstanceUID),
            )
            for kind, dataset in objects
        ]
    return written


@pytest.mark.parametrize("kind", ["SEG", "SR"])
def test_version_2_is_valid(versions: dict[str, dict[str, Path]], kind: str) -> None:
    assert peers.dciodvfy_errors(versions["v2"][kind]) == []


def test_version_2_sr_parses(versions: dict[str, dict[str, Path]]) -> None:
    result = peers.dsrdump(versions["v2"]["SR"])
    assert result.returncode == 0 and result.stderr == ""


def test_versions_have_their_own_identities_and_say_which_they_are(
    versions: dict[str, dict[str, Path]],
) -> None:
    for kind in ("SEG", "SR"):
        v1, v2 = (pydicom.dcmread(versions[v][kind], stop_before_pixels=True) for v in ("v1", "v2"))
        assert v1.SeriesInstanceUID != v2.SeriesInstanceUID and v1.SOPInstanceUID != v2.SOPInstanceUID
        assert "(v" not in v1.SeriesDescription
        assert v2.SeriesDescription == f"{v1.SeriesDescription} (v2)"
        assert int(v2.SeriesNumber) == int(v1.SeriesNumber) + 10


def test_version_2_sr_names_version_1_sr_as_predecessor(versions: dict[str, dict[str, Path]]) -> None:
    v1_sr = pydicom.dcmread(versions["v1"]["SR"])
    v2_sr = pydicom.dcmread(versions["v2"]["SR"])
    v2_seg = pydicom.dcmread(versions["v2"]["SEG"], stop_before_pixels=True)
    assert "PredecessorDocumentsSequence" not in v1_sr
    [study] = v2_sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == v1_sr.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    [sop] = series.ReferencedSOPSequence
    assert (series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (
        v1_sr.SeriesInstanceUID,
        v1_sr.SOPClassUID,
        v1_sr.SOPInstanceUID,
    )
    # The old SEG is reached through the old SR; the new SR references the new SEG.
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in v2_sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert v2_seg.SOPInstanceUID in evidence
