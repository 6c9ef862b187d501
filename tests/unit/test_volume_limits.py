"""A worker allocates only what the received bytes can fill: the voxel limit and the Pixel Data length."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless

from pacs_ai.analyze.volume import AnalysisRefused, VoxelLimit, load_series
from pacs_ai.synthetic.phantom import write_chest_phantom


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    write_chest_phantom(tmp_path / "ct", slices=4, size=32, pixel_spacing_mm=8.0, slice_spacing_mm=5.0)
    return sorted((tmp_path / "ct").glob("*.dcm"))


@pytest.fixture
def small_limit() -> Iterator[None]:
    before = VoxelLimit.voxels
    VoxelLimit.set(4 * 32 * 32 - 1)
    yield
    VoxelLimit.set(before)


def test_a_volume_over_the_voxel_limit_is_refused_before_allocation(
    series: list[Path], small_limit: None
) -> None:
    with pytest.raises(AnalysisRefused, match="maximum_volume_voxels"):
        load_series(series)


def test_the_limit_admits_a_volume_at_it(series: list[Path]) -> None:
    assert load_series(series).voxels.shape == (4, 32, 32)


@pytest.mark.parametrize("factor", [2, 0.5])
def test_pixel_data_of_another_length_than_declared_is_refused(series: list[Path], factor: float) -> None:
    dataset = pydicom.dcmread(series[1])
    dataset.PixelData = (
        dataset.PixelData * 2 if factor == 2 else dataset.PixelData[: len(dataset.PixelData) // 2]
    )
    dataset.save_as(series[1])
    with pytest.raises(AnalysisRefused, match="declare"):
        load_series(series)


def test_small_compressed_files_declaring_huge_images_are_not_believed(series: list[Path]) -> None:
    for path in series:
        dataset = pydicom.dcmread(path)
        dataset.compress(RLELossless)
        dataset.Rows = dataset.Columns = 4096  # 24 such files once took a worker from 311 MB to 1.1 GB
        dataset.save_as(path)
    with pytest.raises(AnalysisRefused, match="not believed"):
        load_series(series)
