"""load_radiograph: one projection image to display values in [0, 1], or a refusal with the reason.

Tiny synthetic files pin the display pipeline (rescale, VOI window or LUT,
min/max, MONOCHROME1 inversion); the real SIIM chest radiograph (JPEG
Baseline) checks decoding and geometry of a file from the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pacs_ai.analyze.base import AnalysisRefused
from pacs_ai.analyze.radiograph import load_radiograph, radiograph_spacing
from tests.peers import require_shared_data

STORED = np.array([[0, 100], [200, 400]], dtype=np.uint16)


def _radiograph(path: Path, stored: np.ndarray = STORED, **attributes: object) -> Path:
    """Write a minimal DX for presentation file with ``stored`` pixels and extra ``attributes``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _display(tmp_path: Path, stored: np.ndarray = STORED, **attributes: object) -> np.ndarray:
    volume = load_radiograph([_radiograph(tmp_path / "image.dcm", stored, **attributes)])
    assert volume.voxels.shape == (1, *stored.shape)
    assert volume.voxels.dtype == np.float32
    return volume.voxels[0]


def test_without_voi_the_full_range_maps_to_0_1(tmp_path: Path) -> None:
    assert _display(tmp_path) == pytest.approx(np.array([[0.0, 0.25], [0.5, 1.0]]))


def test_monochrome1_is_inverted_so_that_bone_is_bright(tmp_path: Path) -> None:
    # MONOCHROME1: the lowest stored value is displayed white.
    shown = _display(tmp_path, PhotometricInterpretation="MONOCHROME1")
    assert shown == pytest.approx(np.array([[1.0, 0.75], [0.5, 0.0]]))


def test_first_window_is_applied_in_modality_units(tmp_path: Path) -> None:
    # Rescale 2x - 100 gives [[-100, 100], [300, 700]]; window 300 +/- 100 (the second window is ignored).
    shown = _display(
        tmp_path,
        RescaleSlope=2,
        RescaleIntercept=-100,
        RescaleType="US",
        WindowCenter=[300, 0],
        WindowWidth=[200, 10],
    )
    assert shown[0, 0] == 0.0 and shown[0, 1] == 0.0  # below the window
    assert shown[1, 1] == 1.0  # above it
    # LINEAR (PS3.3 C.11.2.1.2.1): ((300 - 299.5) / 199 + 0.5)
    assert shown[1, 0] == pytest.approx((300 - 299.5) / 199 + 0.5, abs=1e-4)


def test_window_on_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    shown = _display(tmp_path, PhotometricInterpretation="MONOCHROME1", WindowCenter=200, WindowWidth=100)
    assert shown[0, 0] == 1.0 and shown[1, 1] == 0.0


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_preferred_and_scaled_by_its_entries(tmp_path: Path, vr: str) -> None:
    lut = Dataset()
    # 4 entries for stored values 0..3 (larger inputs take the last entry); 16 bits declared, 12 used.
    lut.LUTDescriptor = [4, 0, 16]
    entries = [0, 1000, 2000, 4000]
    lut.add_new(0x00283006, vr, entries if vr == "US" else np.array(entries, dtype="<u2").tobytes())
    shown = _display(
        tmp_path,
        np.array([[0, 1], [2, 3]], dtype=np.uint16),
        VOILUTSequence=[lut],
        WindowCenter=1,
        WindowWidth=1,
    )
    assert shown == pytest.approx(np.array([[0.0, 0.25], [0.5, 1.0]]))


def test_spacing_prefers_pixel_spacing_then_imager_pixel_spacing(tmp_path: Path) -> None:
    both = load_radiograph(
        [_radiograph(tmp_path / "a.dcm", PixelSpacing=[0.14, 0.15], ImagerPixelSpacing=[0.2, 0.2])]
    )
    assert both.spacing_mm == (1.0, 0.14, 0.15)
    imager = load_radiograph([_radiograph(tmp_path / "b.dcm", ImagerPixelSpacing=[0.2, 0.25])])
    assert imager.spacing_mm == (1.0, 0.2, 0.25)
    none = load_radiograph([_radiograph(tmp_path / "c.dcm")])
    assert none.spacing_mm == (1.0, 1.0, 1.0)
    assert none.origin_mm == (0.0, 0.0, 0.0)
    assert np.array_equal(none.direction, np.eye(3))


def test_spacing_notes_say_where_it_came_from() -> None:
    header = Dataset()
    assert radiograph_spacing(header)[1] is not None and "1.0" in radiograph_spacing(header)[1]
    header.ImagerPixelSpacing = [0.2, 0.2]
    assert "ImagerPixelSpacing" in radiograph_spacing(header)[1]
    header.PixelSpacing = [0.1, 0.1]
    assert radiograph_spacing(header) == ((0.1, 0.1), None)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"NumberOfFrames": 2}, "multi-frame"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "not a greyscale image"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "not a greyscale image"),
        ({"SOPClassUID": CTImageStorage}, "CT Image Storage"),
    ],
)
def test_refuses_what_is_not_one_greyscale_radiograph(
    tmp_path: Path, attributes: dict[str, object], reason: str
) -> None:
    path = _radiograph(tmp_path / "image.dcm", **attributes)
    with pytest.raises(AnalysisRefused, match=reason):
        load_radiograph([path])


def test_refuses_several_images(tmp_path: Path) -> None:
    paths = [_radiograph(tmp_path / "a.dcm"), _radiograph(tmp_path / "b.dcm")]
    with pytest.raises(AnalysisRefused, match="2 images given"):
        load_radiograph(paths)
    with pytest.raises(AnalysisRefused, match="0 images given"):
        load_radiograph([])


def test_refuses_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(AnalysisRefused, match="cannot be read as DICOM"):
        load_radiograph([path])


def test_real_jpeg_chest_radiograph() -> None:
    path = require_shared_data("cxr-cr") / "siim_cr.dcm"
    volume = load_radiograph([path])
    assert volume.voxels.shape == (1, 1024, 1024)
    assert volume.voxels.dtype == np.float32
    assert float(volume.voxels.min()) == 0.0 and float(volume.voxels.max()) == 1.0
    # A PA chest film: mostly mid-grey, neither blank nor saturated.
    assert 0.3 < float(volume.voxels.mean()) < 0.8
    assert volume.spacing_mm == (1.0, 0.168, 0.168)
    assert volume.paths == [path]
    assert "PixelData" not in volume.headers[0]
    assert volume.headers[0].Modality == "CR"
