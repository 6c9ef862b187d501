"""Series to volume: slice order, spacing, refusals (tilt, uneven spacing, missing geometry), decoding."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from pacs_ai.analyze.base import AnalysisRefused
from pacs_ai.analyze.volume import check_geometry, decode_pixels, load_series, native_pixels, slice_geometry

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def headers_at(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.8, 0.8),
) -> list[Dataset]:
    """Header-only datasets of one series at the given ImagePositionPatient values."""
    series_uid = generate_uid()
    headers = []
    for index, position in enumerate(positions):
        ds = Dataset()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 5.0  # deliberately unrelated to the positions
        ds.InstanceNumber = index + 1
        headers.append(ds)
    return headers


def write_ct_series(
    directory: Path,
    z_positions: Sequence[float],
    *,
    rows: int = 8,
    columns: int = 6,
    slope: float = 1.0,
    intercept: float = -1024.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> tuple[list[Path], dict[float, np.ndarray]]:
    """Tiny CT files; each slice's stored values encode its z so order can be checked after loading."""
    directory.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    paths, stored_by_z = [], {}
    for index, z in enumerate(z_positions):
        stored = np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) + 100 * index + 1000
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.ImagePositionPatient = [-10.0, -12.0, z]
        ds.ImageOrientationPatient = list(AXIAL)
        ds.PixelSpacing = [0.5, 0.75]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = directory / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        stored_by_z[z] = stored
    return paths, stored_by_z


def require_shared(folder: str) -> Path:
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(f"shared test data {path} is absent (see ../shared/data/README.md)")
    return path


# ---------------------------------------------------------------------------------------------
# slice_geometry / check_geometry (pure)
# ---------------------------------------------------------------------------------------------


def test_shuffled_slices_are_sorted_along_the_normal_and_spacing_comes_from_positions() -> None:
    z = [-40.0 + 2.5 * i for i in range(12)]
    shuffled = z[:]
    random.Random(3).shuffle(shuffled)
    headers = headers_at([(0.0, 0.0, value) for value in shuffled])

    geometry = slice_geometry(headers)

    assert [shuffled[i] for i in geometry.order] == z
    assert geometry.spacing_mm == pytest.approx(2.5)  # not SliceThickness (5.0)
    assert geometry.min_spacing_mm == pytest.approx(2.5) and geometry.max_spacing_mm == pytest.approx(2.5)
    assert geometry.tilt_deg == pytest.approx(0.0, abs=1e-9)
    assert geometry.origin_mm == (0.0, 0.0, -40.0)
    check_geometry(geometry)  # a regular stack passes


def test_sorting_uses_the_normal_not_patient_z() -> None:
    # Coronal slices: row cosine +x, column cosine -z, normal = +y.
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    y = [30.0, 10.0, 20.0, 0.0]
    geometry = slice_geometry(headers_at([(0.0, value, 5.0) for value in y], orientation=coronal))
    assert [y[i] for i in geometry.order] == [0.0, 10.0, 20.0, 30.0]
    assert geometry.normal == pytest.approx([0.0, 1.0, 0.0])
    assert geometry.spacing_mm == pytest.approx(10.0)


def test_non_uniform_spacing_is_refused_with_min_and_max() -> None:
    geometry = slice_geometry(headers_at([(0.0, 0.0, z) for z in (0.0, 1.0, 2.0, 3.0, 5.0, 6.0)]))
    with pytest.raises(AnalysisRefused, match="non-uniform slice spacing") as refused:
        check_geometry(geometry)
    assert "1.000" in str(refused.value) and "2.000" in str(refused.value)


def test_small_spacing_jitter_is_tolerated() -> None:
    z = [i * 1.25 + (0.002 if i % 2 else 0.0) for i in range(10)]  # ~0.3% deviation, below 1%
    check_geometry(slice_geometry(headers_at([(0.0, 0.0, value) for value in z])))


def test_gantry_tilt_is_refused_with_the_angle() -> None:
    tilt = math.radians(15.0)
    positions = [(0.0, -i * 3.0 * math.tan(tilt), i * 3.0) for i in range(10)]
    geometry = slice_geometry(headers_at(positions))
    assert geometry.tilt_deg == pytest.approx(15.0, abs=0.01)
    with pytest.raises(AnalysisRefused, match=r"gantry tilt of 15\.0 degrees"):
        check_geometry(geometry)


def test_irregular_inplane_shift_is_refused_even_without_net_tilt() -> None:
    positions = [(0.0, 0.0, float(i)) for i in range(9)]
    positions[4] = (3.0, 0.0, 4.0)  # one slice shifted 3 mm sideways
    geometry = slice_geometry(headers_at(positions))
    assert geometry.tilt_deg == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(AnalysisRefused, match="3.0 mm in-plane"):
        check_geometry(geometry)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_refused_naming_the_attribute(keyword: str) -> None:
    headers = headers_at([(0.0, 0.0, float(z)) for z in range(4)])
    del headers[2][keyword]
    with pytest.raises(AnalysisRefused, match=f"{keyword} missing"):
        slice_geometry(headers)


def test_duplicate_positions_are_refused() -> None:
    with pytest.raises(AnalysisRefused, match="duplicate slice position"):
        slice_geometry(headers_at([(0.0, 0.0, z) for z in (0.0, 1.0, 1.0, 2.0)]))


def test_fewer_than_three_slices_are_refused() -> None:
    with pytest.raises(AnalysisRefused, match="only 2 slice"):
        slice_geometry(headers_at([(0.0, 0.0, 0.0), (0.0, 0.0, 1.0)]))


def test_mixed_orientations_are_refused() -> None:
    headers = headers_at([(0.0, 0.0, float(z)) for z in range(4)])
    headers[3].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    with pytest.raises(AnalysisRefused, match="ImageOrientationPatient differs"):
        slice_geometry(headers)


# ---------------------------------------------------------------------------------------------
# load_series on files
# ---------------------------------------------------------------------------------------------


def test_load_series_sorts_rescales_and_keeps_headers_without_pixels(tmp_path: Path) -> None:
    z = [7.5, -5.0, 0.0, 2.5, -2.5, 5.0]  # file order is not slice order
    paths, stored = write_ct_series(tmp_path, [z[i] for i in range(6)])
    random.Random(1).shuffle(paths)

    volume = load_series(paths)

    assert volume.voxels.shape == (6, 8, 6)
    assert volume.voxels.dtype == np.int16
    assert volume.spacing_mm == pytest.approx((2.5, 0.5, 0.75))
    assert volume.origin_mm == pytest.approx((-10.0, -12.0, -5.0))
    assert volume.direction == pytest.approx(np.eye(3))
    for k, expected_z in enumerate(sorted(z)):
        assert float(volume.headers[k].ImagePositionPatient[2]) == expected_z
        assert "PixelData" not in volume.headers[k]
        np.testing.assert_array_equal(volume.voxels[k], stored[expected_z].astype(np.int32) - 1024)
    assert volume.voxel_volume_ml == pytest.approx(2.5 * 0.5 * 0.75 / 1000)


def test_non_integral_rescale_gives_float32(tmp_path: Path) -> None:
    paths, stored = write_ct_series(tmp_path, [0.0, 1.0, 2.0], slope=0.5, intercept=-10.25)
    volume = load_series(paths)
    assert volume.voxels.dtype == np.float32
    np.testing.assert_allclose(volume.voxels[0], stored[0.0] * 0.5 - 10.25)


def test_values_beyond_int16_widen_to_float32(tmp_path: Path) -> None:
    paths, stored = write_ct_series(tmp_path, [0.0, 1.0, 2.0], slope=30.0, intercept=0.0)
    volume = load_series(paths)
    assert volume.voxels.dtype == np.float32  # 30 * ~1200 does not fit int16
    np.testing.assert_array_equal(volume.voxels[2], stored[2.0].astype(np.float32) * 30)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_series_decode_to_the_same_voxels(tmp_path: Path, syntax: str) -> None:
    z = [0.0, 1.5, 3.0, 4.5]
    # openjpeg refuses to encode very small images, hence 32x32.
    plain = load_series(write_ct_series(tmp_path / "plain", z, rows=32, columns=32)[0])
    compressed_paths, _ = write_ct_series(
        tmp_path / "compressed", z, rows=32, columns=32, transfer_syntax=syntax
    )
    assert pydicom.dcmread(compressed_paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(compressed_paths).voxels, plain.voxels)


def test_colour_images_are_refused(tmp_path: Path) -> None:
    paths, _ = write_ct_series(tmp_path, [0.0, 1.0, 2.0])
    ds = pydicom.dcmread(paths[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((8, 6, 3), np.uint8).tobytes()
    ds.save_as(paths[1])
    with pytest.raises(AnalysisRefused, match="not a greyscale image"):
        load_series(paths)


def test_files_of_two_series_are_refused(tmp_path: Path) -> None:
    first, _ = write_ct_series(tmp_path / "a", [0.0, 1.0, 2.0])
    second, _ = write_ct_series(tmp_path / "b", [3.0, 4.0, 5.0])
    with pytest.raises(AnalysisRefused, match="belong to 2 series"):
        load_series(first + second)


def test_non_dicom_file_is_refused(tmp_path: Path) -> None:
    paths, _ = write_ct_series(tmp_path, [0.0, 1.0, 2.0])
    paths[0].write_bytes(b"not dicom at all")
    with pytest.raises(AnalysisRefused, match="cannot be read as DICOM"):
        load_series(paths)


# ---------------------------------------------------------------------------------------------
# Real data (../shared/data)
# ---------------------------------------------------------------------------------------------


def test_real_ge_head_ct_with_gantry_tilt_is_refused() -> None:
    folder = require_shared("ct-head-ge")
    paths = sorted(folder.glob("*.dcm"))
    geometry = slice_geometry([pydicom.dcmread(p, stop_before_pixels=True) for p in paths], paths)
    # Both problems the README names are measured: tilt +18.5 degrees, spacing 4 mm then 7 mm.
    assert geometry.tilt_deg == pytest.approx(18.5, abs=0.1)
    # (At the switch from 4 to 7 mm there is one 1.08 mm step.)
    assert geometry.min_spacing_mm < 4.01
    assert geometry.max_spacing_mm == pytest.approx(7.0, abs=0.05)
    with pytest.raises(AnalysisRefused, match=r"gantry tilt of 18\.5 degrees"):
        load_series(paths)
    # Were tilt allowed, the uneven spacing would still be refused.
    with pytest.raises(AnalysisRefused, match="non-uniform slice spacing"):
        check_geometry(geometry, max_tilt_deg=90.0, max_shift_pixels=1e9)


def test_real_two_slice_chest_set_is_refused_as_too_few_slices() -> None:
    # Decision: two slices are not a volume (no spacing check possible, no lungs to measure),
    # so they are refused with a reason rather than loaded.
    folder = require_shared("ct-chest-slices")
    with pytest.raises(AnalysisRefused, match="only 2 slice"):
        load_series(sorted(folder.glob("*.dcm")))


def test_real_jpeg_baseline_radiograph_decodes() -> None:
    path = require_shared("cxr-cr") / "siim_cr.dcm"
    jpeg_baseline = "1.2.840.10008.1.2.4.50"
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == jpeg_baseline
    pixels = decode_pixels(path)
    assert pixels.shape == (1024, 1024)
    assert pixels.dtype == np.uint8
    assert pixels.std() > 10  # real image content, not a blank decode
    # As a "series" it has no 3D geometry, which is refused clearly rather than crashing.
    with pytest.raises(AnalysisRefused, match="only 1 slice"):
        load_series([path])


# ---------------------------------------------------------------------------------------------
# Reading each file once: deferred Pixel Data, native pixels, headers without files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allocated", "stored", "signed"),
    [(16, 12, 0), (16, 12, 1), (16, 16, 1), (16, 16, 0), (8, 8, 0), (8, 7, 1), (32, 20, 1)],
)
def test_native_pixels_equal_pydicoms_decoder(
    tmp_path: Path, allocated: int, stored: int, signed: int
) -> None:
    # Values across the whole Bits Stored range, with the unused high bits filled with noise:
    # pydicom clears (or sign-extends into) them, and native_pixels must give the very same array.
    rng = np.random.default_rng(allocated * 100 + stored * 10 + signed)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    low, high = (-(2 ** (stored - 1)), 2 ** (stored - 1)) if signed else (0, 2**stored)
    values = rng.integers(low, high, size=(96, 64), dtype=np.int64)
    noise = rng.integers(0, 2 ** (allocated - stored), size=values.shape, dtype=np.int64) << stored
    raw = ((values & (2**stored - 1)) | noise).astype(np.uint64).astype(f"<u{allocated // 8}")
    paths, _ = write_ct_series(tmp_path, [0.0], rows=96, columns=64)
    ds = pydicom.dcmread(paths[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        allocated,
        stored,
        stored - 1,
        signed,
    )
    ds.PixelData = raw.tobytes()
    ds.save_as(paths[0], enforce_file_format=True)

    expected = pydicom.dcmread(paths[0]).pixel_array
    header = pydicom.dcmread(paths[0], defer_size=1024)
    assert header.get_item("PixelData", keep_deferred=True).value is None  # deferred: read by native_pixels
    # Read into a reused buffer (as load_series does), which holds noise from an earlier slice.
    buffer = bytearray(np.random.default_rng(1).integers(0, 256, 96 * 64 * 4 + 7, dtype=np.uint8).tobytes())
    into_buffer = native_pixels(header, into=buffer)
    assert into_buffer is not None
    assert np.shares_memory(into_buffer, np.frombuffer(buffer, dtype=np.uint8))
    np.testing.assert_array_equal(into_buffer, expected)
    assert into_buffer.dtype == expected.dtype

    pixels = native_pixels(header)
    assert pixels is not None
    assert pixels.dtype == dtype == expected.dtype
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(pixels, values)


def test_native_pixels_leave_compressed_data_to_pydicom(tmp_path: Path) -> None:
    paths, _ = write_ct_series(tmp_path, [0.0], rows=32, columns=32, transfer_syntax=RLELossless)
    assert native_pixels(pydicom.dcmread(paths[0])) is None


def test_loaded_headers_hold_no_pixel_data_and_need_no_file(tmp_path: Path) -> None:
    # 128x128 slices: their Pixel Data is deferred when the headers are read.  A large private
    # value before it is deferred too and must be in the header once loaded; what follows Pixel
    # Data is not kept, as with stop_before_pixels.
    paths, stored = write_ct_series(tmp_path, [0.0, 1.0, 2.0], rows=128, columns=128)
    blob = bytes(range(256)) * 64  # 16 KiB
    for path in paths:
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0029, "PACS-AI TEST", create=True)
        block.add_new(0x10, "OB", blob)
        ds.DataSetTrailingPadding = b"\0" * 64
        ds.save_as(path, enforce_file_format=True)

    volume = load_series(paths)
    for path in paths:
        path.unlink()

    for k, header in enumerate(volume.headers):
        assert "PixelData" not in header
        assert "DataSetTrailingPadding" not in header
        assert header.private_block(0x0029, "PACS-AI TEST")[0x10].value == blob
        for element in header.iterall():  # every value is in memory: no file is needed any more
            assert element.value is not None or element.is_empty
        np.testing.assert_array_equal(volume.voxels[k], stored[float(k)].astype(np.int32) - 1024)


def test_pixel_data_cut_short_on_disk_is_refused_naming_the_file(tmp_path: Path) -> None:
    # The header promises 128x128 16-bit pixels, the file ends half-way through them: the direct
    # read into the slice buffer must not take the short read (or the buffer's stale bytes) as pixels.
    paths, _ = write_ct_series(tmp_path, [0.0, 1.0, 2.0], rows=128, columns=128)
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) - 128 * 128])

    with pytest.raises(AnalysisRefused, match=paths[1].name):
        load_series(paths)


def test_stored_values_beyond_int16_after_rescale_widen_the_volume(tmp_path: Path) -> None:
    # 16-bit unsigned stored values with intercept -1024 reach 64511 HU-units: the int16 volume
    # must be widened, not wrapped, even though the native read knows only the Bits Stored range.
    paths, stored = write_ct_series(tmp_path, [0.0, 1.0, 2.0], rows=16, columns=16)
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.copy()
        pixels[0, 0] = 65535
        ds.PixelData = pixels.tobytes()
        ds.save_as(path, enforce_file_format=True)

    volume = load_series(paths)
    assert volume.voxels.dtype == np.float32
    assert volume.voxels[:, 0, 0].tolist() == [65535 - 1024] * 3
