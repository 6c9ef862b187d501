"""The chest phantom writes valid CT Image Storage files (checked by dicom3tools' dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_ai.synthetic.phantom import write_chest_phantom

DCIODVFY = "/usr/bin/dciodvfy"


def dciodvfy_report(path: Path) -> str:
    """dciodvfy's full text (it reports on stderr; its exit code is not a reliable verdict)."""
    binary = DCIODVFY if Path(DCIODVFY).is_file() else shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed; install dicom3tools to validate phantom files")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return result.stdout + result.stderr


def test_phantom_slice_passes_dciodvfy(tmp_path: Path) -> None:
    truth = write_chest_phantom(tmp_path, slices=6, size=160)
    report = dciodvfy_report(truth.paths[3])
    errors = [line for line in report.splitlines() if "Error" in line]
    assert errors == [], report
    assert "CTImage" in report  # dciodvfy recognised the IOD it checked against


def test_phantom_files_carry_the_agreed_attributes(tmp_path: Path) -> None:
    truth = write_chest_phantom(tmp_path, slices=5, size=160, patient_id="P-7", accession_number="A-7")
    datasets = [pydicom.dcmread(path) for path in truth.paths]
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    described = (first.Modality, first.BodyPartExamined, first.SeriesDescription)
    assert described == ("CT", "CHEST", "CHEST CT phantom")
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.PatientID, first.AccessionNumber) == ("P-7", "A-7")
    assert (first.StudyInstanceUID, first.SeriesInstanceUID) == (truth.study_uid, truth.series_uid)
    assert (first.RescaleSlope, first.RescaleIntercept, first.PixelRepresentation) == (1, -1024, 0)
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and np.allclose(np.diff(z), 4.0)  # written ascending along the normal (+z)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert truth.labels.shape == (5, 160, 160)


def test_phantom_is_deterministic(tmp_path: Path) -> None:
    first = write_chest_phantom(tmp_path / "a", slices=4, size=160)
    second = write_chest_phantom(tmp_path / "b", slices=4, size=160)
    assert [p.read_bytes() for p in first.paths] == [p.read_bytes() for p in second.paths]
    other_seed = write_chest_phantom(tmp_path / "c", slices=4, size=160, seed=1)
    assert other_seed.study_uid != first.study_uid
