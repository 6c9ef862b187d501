"""Synthetic chest radiographs: valid DX/CR DICOM, deterministic, display pixels as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_ai.synthetic.radiograph import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    MAX_STORED,
    radiograph_pixels,
    write_chest_radiograph,
)
from tests.peers import dciodvfy_errors


@pytest.mark.parametrize(
    ("sop_class", "photometric"),
    [("DX", "MONOCHROME2"), ("DX", "MONOCHROME1"), ("CR", "MONOCHROME1"), ("CR", "MONOCHROME2")],
)
def test_radiograph_is_valid_dicom(tmp_path: Path, sop_class: str, photometric: str) -> None:
    truth = write_chest_radiograph(
        tmp_path / "cxr.dcm",
        seed=3,
        pneumothorax=True,
        rows=256,
        columns=224,
        sop_class=sop_class,
        photometric_interpretation=photometric,
        patient_id="P-9",
        accession_number="A-9",
    )
    assert dciodvfy_errors(truth.path) == []
    ds = pydicom.dcmread(truth.path)
    assert ds.SOPClassUID == (DX_FOR_PRESENTATION if sop_class == "DX" else CR_IMAGE_STORAGE)
    assert (ds.Modality, ds.PhotometricInterpretation, ds.Rows, ds.Columns) == (
        sop_class,
        photometric,
        256,
        224,
    )
    assert (ds.PatientID, ds.AccessionNumber, ds.StudyInstanceUID) == ("P-9", "A-9", truth.study_uid)
    assert ds.SOPInstanceUID == truth.sop_instance_uid
    stored = ds.pixel_array.astype(np.float64) / MAX_STORED
    display = 1.0 - stored if photometric == "MONOCHROME1" else stored
    assert np.abs(display - truth.pixels).max() <= 0.5 / MAX_STORED + 1e-6


def test_radiograph_is_deterministic(tmp_path: Path) -> None:
    first = write_chest_radiograph(tmp_path / "a.dcm", seed=5, rows=128, columns=128)
    second = write_chest_radiograph(tmp_path / "b.dcm", seed=5, rows=128, columns=128)
    assert first.path.read_bytes() == second.path.read_bytes()
    other = write_chest_radiograph(tmp_path / "c.dcm", seed=6, rows=128, columns=128)
    assert other.study_uid != first.study_uid


def test_pneumothorax_changes_one_side_only() -> None:
    """Same anatomy with and without: only the chosen hemithorax differs (image left = patient right)."""
    for side in ("right", "left"):
        without = radiograph_pixels(seed=11, rows=256, columns=256)
        with_ptx = radiograph_pixels(seed=11, pneumothorax=True, side=side, rows=256, columns=256)
        changed = np.abs(with_ptx - without) > 0.02
        half = changed[:, :128] if side == "right" else changed[:, 128:]
        assert changed.sum() > 200
        assert half.sum() / changed.sum() > 0.95


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sop_class"):
        write_chest_radiograph(tmp_path, sop_class="MR")
    with pytest.raises(ValueError, match="photometric"):
        write_chest_radiograph(tmp_path, photometric_interpretation="RGB")
    with pytest.raises(ValueError, match="64 x 64"):
        radiograph_pixels(rows=32, columns=32)
