"""The ct-chest-lung analyzer on a real chest CT: two reconstructions (kernels) of one scan.

``../shared/data/ct-chest-lungdx-a0002`` (TCIA Lung-PET-CT-Dx, subject A0002): 30
axial slices of 8 mm, 0.65 mm pixels, reconstructed with a soft (B40f) and a
sharp (B70f) kernel.  Landmarks below were read off rendered slices and are in
patient coordinates (LPS, mm): the trachea runs alone above the lung apices (top
slice), the carina is at z = 232 and the main bronchi run on the slices below;
the stomach holds a gas bubble under the left lung base (z 80-96); a solid
tumour sits in the right lower lobe next to the hilum (z 176-192).  The right
hemidiaphragm is high and the right lung carries the tumour, so here the right
lung is the smaller one.

Reviewed volumes (overlays checked slice by slice): right lung 1,099 mL (soft)
and 1,101 mL (sharp), left lung 1,561 mL and 1,566 mL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pacs_ai.analyze.base import AnalysisResult
from pacs_ai.analyze.lung import CtChestLungAnalyzer
from pacs_ai.analyze.volume import Volume, load_series
from tests.peers import require_shared_data

KERNELS = ("b40f-soft", "b70f-sharp")
VOLUME = "118565006"
MEAN_ATTENUATION = "112031"
#: Lowest slice of the trachea and main bronchi checked (3 slices below the carina), mm.
BRONCHI_FROM_Z = 215.0
#: Main bronchi reach this far (in-plane) from the trachea's axis.
MAIN_BRONCHUS_REACH_MM = 45.0
STOMACH_GAS = (37.0, -216.0)  # x, y on the slices z 80-96
STOMACH_GAS_Z = (80.0, 88.0, 96.0)
TUMOUR = (-66.0, -100.0, 184.0)  # x, y, z: inside the solid tumour


def series_dir(kernel: str) -> Path:
    return require_shared_data(f"ct-chest-lungdx-a0002/{kernel}")


@pytest.fixture(scope="module")
def analysed() -> dict[str, tuple[Volume, AnalysisResult]]:
    results = {}
    for kernel in KERNELS:
        volume = load_series(sorted(series_dir(kernel).glob("*.dcm")))
        results[kernel] = (volume, CtChestLungAnalyzer().analyze(volume, {}))
    return results


def volumes(result: AnalysisResult) -> dict[int | None, float]:
    return {m.segment_number: m.value for m in result.measurements if m.name.value == VOLUME}


def slice_z(volume: Volume) -> np.ndarray:
    return np.array([volume.patient_position((k, 0, 0))[2] for k in range(volume.voxels.shape[0])])


def pixel(volume: Volume, x: float, y: float, k: int) -> tuple[int, int]:
    """(row, column) of patient point (x, y) on slice k (axial, no rotation, as in this series)."""
    origin = volume.patient_position((k, 0, 0))
    _, dy, dx = volume.spacing_mm
    return round((y - origin[1]) / dy), round((x - origin[0]) / dx)


def air_regions(volume: Volume, k: int, min_mm2: float) -> list[np.ndarray]:
    """2D regions below -950 HU inside the body on slice k, at least ``min_mm2``."""
    hu = volume.voxels[k]
    body = ndimage.binary_fill_holes(hu > -500)
    regions, count = ndimage.label((hu < -950) & body)
    _, dy, dx = volume.spacing_mm
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    return [regions == i for i in range(1, count + 1) if sizes[i] * dy * dx >= min_mm2]


@pytest.mark.parametrize("segment", [1, 2, None])
def test_both_kernels_give_the_same_volumes_within_3_percent(
    analysed: dict[str, tuple[Volume, AnalysisResult]], segment: int | None
) -> None:
    soft, sharp = (volumes(analysed[kernel][1])[segment] for kernel in KERNELS)
    assert abs(soft - sharp) / ((soft + sharp) / 2) < 0.03, (soft, sharp)


@pytest.mark.parametrize("kernel", KERNELS)
def test_volumes_and_densities_are_the_reviewed_ones(
    analysed: dict[str, tuple[Volume, AnalysisResult]], kernel: str
) -> None:
    result = analysed[kernel][1]
    found = volumes(result)
    assert found[1] == pytest.approx(1100, rel=0.05)
    assert found[2] == pytest.approx(1563, rel=0.05)
    for segment in (1, 2):
        mean = next(
            m.value
            for m in result.measurements
            if m.name.value == MEAN_ATTENUATION and m.segment_number == segment
        )
        assert -880 < mean < -700, (segment, mean)


@pytest.mark.parametrize("kernel", KERNELS)
def test_trachea_alone_above_the_apices_has_no_lung(
    analysed: dict[str, tuple[Volume, AnalysisResult]], kernel: str
) -> None:
    volume, result = analysed[kernel]
    top = int(np.argmax(slice_z(volume)))
    assert air_regions(volume, top, 50.0), "the trachea should be on the top slice"
    assert np.count_nonzero(result.labels[top]) == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_trachea_and_main_bronchi_are_not_lung(
    analysed: dict[str, tuple[Volume, AnalysisResult]], kernel: str
) -> None:
    volume, result = analysed[kernel]
    z = slice_z(volume)
    top = int(np.argmax(z))
    (trachea,) = air_regions(volume, top, 50.0)
    axis = np.array(ndimage.center_of_mass(trachea))
    _, dy, dx = volume.spacing_mm
    checked = 0
    for k in np.flatnonzero(z >= BRONCHI_FROM_Z):
        for region in air_regions(volume, int(k), 30.0):
            offset = (np.array(ndimage.center_of_mass(region)) - axis) * (dy, dx)
            if np.hypot(*offset) <= MAIN_BRONCHUS_REACH_MM:
                checked += 1
                assert np.count_nonzero(result.labels[k][region]) == 0, (int(k), offset)
    assert checked >= 15  # trachea on every slice, two main bronchi below the carina


@pytest.mark.parametrize("kernel", KERNELS)
def test_stomach_gas_is_not_lung(analysed: dict[str, tuple[Volume, AnalysisResult]], kernel: str) -> None:
    volume, result = analysed[kernel]
    z = slice_z(volume)
    for level in STOMACH_GAS_Z:
        k = int(np.argmin(abs(z - level)))
        row, col = pixel(volume, *STOMACH_GAS, k)
        # (a window, not one pixel: the sharp kernel's noise lifts single air pixels above -950 HU)
        (bubble,) = [
            r for r in air_regions(volume, k, 100.0) if r[row - 3 : row + 4, col - 3 : col + 4].any()
        ]
        assert np.count_nonzero(result.labels[k][ndimage.binary_dilation(bubble, iterations=3)]) == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_solid_tumour_is_not_lung(analysed: dict[str, tuple[Volume, AnalysisResult]], kernel: str) -> None:
    volume, result = analysed[kernel]
    x, y, level = TUMOUR
    k = int(np.argmin(abs(slice_z(volume) - level)))
    row, col = pixel(volume, x, y, k)
    solid, _ = ndimage.label(volume.voxels[k] > -200)
    tumour = solid == solid[row, col]
    _, dy, dx = volume.spacing_mm
    rows, cols = np.ogrid[: tumour.shape[0], : tumour.shape[1]]
    near = np.hypot((rows - row) * dy, (cols - col) * dx) < 30.0
    assert np.count_nonzero(tumour & near) * dy * dx > 500  # mm2: the tumour is there
    assert np.count_nonzero(result.labels[k][tumour & near]) == 0
    # and no solid island thicker than a vessel is counted as the right lung anywhere
    for plane, hu in zip(result.labels, volume.voxels, strict=True):
        solid_lung = (plane == 1) & (hu > -200)
        assert not ndimage.binary_erosion(solid_lung, iterations=round(5.0 / dx)).any()
