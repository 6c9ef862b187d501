"""The job's SEG and SR written at the same time (SR in a forked child) are the objects build_results gives.

``write_results`` builds the SR from the SEG's identities alone
(``segmentation_reference``) while the SEG is built; the written files must
not differ from the sequential build apart from creation dates and times.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom import Dataset

from pacs_ai.analyze.base import AnalysisResult
from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.results import PreviousResult, build_results
from pacs_ai.encode.writing import write_results
from tests.integration.synthetic_ct import load_volume, lung_labels, lung_result, make_ct_series, write_series

PREFIX = "1.2.826.0.1.3680043.8.498.77."
EQUIPMENT = EquipmentInfo(device_serial_number="TEST-0001", institution_name="Test Hospital")
#: Value representations of dates and times; set from the clock when an object is built.
_CLOCK_VRS = {"DA", "TM", "DT"}


def _comparable(dataset: Dataset) -> list[tuple[object, ...]]:
    """Every element (sequences by position) except dates and times."""
    return [
        (element.tag,) if element.VR == "SQ" else (element.tag, element.VR, element.value)
        for element in dataset.iterall()
        if element.VR not in _CLOCK_VRS
    ]


def test_written_seg_and_sr_equal_the_sequential_build(tmp_path: Path) -> None:
    volume = load_volume(write_series(make_ct_series(), tmp_path / "ct"))
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    previous = [PreviousResult("SR", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4.5")]
    key = f"{volume.headers[0].SeriesInstanceUID}|lungs|lung@1|v2"
    arguments = {"key": key, "equipment": EQUIPMENT, "uid_prefix": PREFIX, "version": 2, "previous": previous}

    expected = dict(build_results(volume, result, **arguments))  # type: ignore[arg-type]
    written = write_results(volume, result, tmp_path / "results", fsync=False, **arguments)  # type: ignore[arg-type]

    assert [item.kind for item in written] == ["SEG", "SR"]
    for item in written:
        reference = write_dataset(expected[item.kind], tmp_path / f"expected-{item.kind}.dcm", fsync=False)
        on_disk = pydicom.dcmread(item.path)
        assert item.path == tmp_path / "results" / f"{item.sop_instance_uid}.dcm"
        assert (item.sop_class_uid, item.sop_instance_uid, item.series_instance_uid) == (
            on_disk.SOPClassUID,
            on_disk.SOPInstanceUID,
            on_disk.SeriesInstanceUID,
        )
        assert _comparable(on_disk) == _comparable(pydicom.dcmread(reference))


def test_a_result_without_labels_gives_the_sr_alone(tmp_path: Path) -> None:
    volume = load_volume(write_series(make_ct_series(), tmp_path / "ct"))
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    without_labels = AnalysisResult(
        algorithm=result.algorithm,
        labels=None,
        segments=[],
        measurements=[m for m in result.measurements if m.segment_number is None],
    )
    written = write_results(volume, without_labels, tmp_path / "results", key="k", equipment=EQUIPMENT)
    assert [item.kind for item in written] == ["SR"]
    assert pydicom.dcmread(written[0].path).SOPInstanceUID == written[0].sop_instance_uid
