"""dcmjs and @cornerstonejs/adapters (node, from Debian; packages from the npm registry) read the SEG and SR.

OHIF builds on these two libraries: dcmjs parses the objects, the adapters turn
a TID 1500 SR into Cornerstone annotations.  The packages are installed once
into the gitignored ``.cache/npm`` (see :mod:`tests.e2e.ohif`); ``cornerstone_read.mjs``
prints what they read, and this test checks it against the result that was encoded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from pacs_ai.analyze.base import Code, DetectionSpec
from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.results import build_results
from tests.e2e.ohif import NPM_CACHE, npm_install
from tests.integration.synthetic_ct import lung_labels, lung_result, make_ct_series, volume_from_headers

#: The adapters' release matching OHIF 3.13's Cornerstone 3D generation, and what it imports.
PACKAGES = ("@cornerstonejs/adapters@5.14.0", "dcmjs@0.51.1", "@babel/runtime@7")
SCRIPT = Path(__file__).with_name("cornerstone_read.mjs")


@pytest.fixture(scope="module")
def node_project() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node not found; install the Debian package nodejs (scripts/test does)")
    try:
        return npm_install(PACKAGES, NPM_CACHE / "cornerstone-adapters")
    except RuntimeError as exc:
        pytest.fail(f"cannot install {PACKAGES} from the npm registry: {exc}")


def test_dcmjs_and_adapters_read_seg_and_sr(node_project: Path, tmp_path: Path) -> None:
    series = make_ct_series(n_slices=12, rows=64, columns=64)
    headers = []
    for ds in series:
        buffer = DicomBytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        buffer.seek(0)
        headers.append(pydicom.dcmread(buffer, stop_before_pixels=True))
    volume = volume_from_headers(headers)
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    z = float(volume.headers[6].ImagePositionPatient[2])
    result.detections = [
        DetectionSpec(Code("27925004", "SCT", "Nodule"), 0.8, (-9.0, -4.0, z - 1), (-1.0, 4.0, z + 1))
    ]
    (_, seg), (_, sr) = build_results(volume, result, key="adapters", equipment=EquipmentInfo())
    seg_path = write_dataset(seg, tmp_path / "seg.dcm", fsync=False)
    sr_path = write_dataset(sr, tmp_path / "sr.dcm", fsync=False)
    planes = {
        h.SOPInstanceUID: {
            "frameOfReferenceUID": h.FrameOfReferenceUID,
            "imagePositionPatient": [float(v) for v in h.ImagePositionPatient],
            "imageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
            "pixelSpacing": [float(v) for v in h.PixelSpacing],
            "rows": int(h.Rows),
            "columns": int(h.Columns),
        }
        for h in volume.headers
    }
    planes_path = tmp_path / "planes.json"
    planes_path.write_text(json.dumps(planes))
    script = node_project / SCRIPT.name
    shutil.copyfile(SCRIPT, script)  # ES modules resolve packages next to the script
    done = subprocess.run(
        ["node", str(script), str(seg_path), str(sr_path), str(planes_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=node_project,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])

    assert read["segmentLabels"] == ["Right lung", "Left lung"]
    assert read["segFrames"] == int(seg.NumberOfFrames)
    assert read["srTemplate"] == "1500"
    # Two lungs, both lungs together, and the nodule's region (TID 1410) and values (TID 1501).
    assert read["measurementGroups"] == 5
    # Without a hook the adapters know groups Cornerstone wrote itself, and the nodule by its Image
    # Region (DCM 111030, a closed POLYLINE of 5 points: a RectangleROI), which is how OHIF hydrates it.
    assert read["withoutHooks"] == ["RectangleROI"]
    measurements = read["measurements"]
    assert sorted(m["toolType"] for m in measurements) == [
        "Probe",
        "Probe",
        "Probe",
        "RectangleROI",
        "RectangleROI",
    ]
    tracking = {
        item.UID
        for item in (
            child for group in sr.ContentSequence[-1].ContentSequence for child in group.ContentSequence
        )
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Unique Identifier"
    }
    assert {m["trackingUniqueIdentifier"] for m in measurements} == tracking
    labels = result.labels
    assert labels is not None
    by_uid = {h.SOPInstanceUID: k for k, h in enumerate(volume.headers)}
    for measurement in measurements:
        k = by_uid[measurement["referencedImageId"]]
        header = volume.headers[k]
        origin = np.array([float(v) for v in header.ImagePositionPatient])
        spacing = float(header.PixelSpacing[0])
        for point in measurement["points"]:
            column, row = ((np.array(point) - origin)[:2] / spacing).round().astype(int)
            assert abs(point[2] - origin[2]) < 1e-3  # on the referenced slice
            if measurement["toolType"] == "Probe":
                assert labels[k, row, column] in (1, 2)  # the lung's point lies in a lung
