"""Densitometry definitions on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_ai.analyze.measurements import (
    laa_percent,
    mean_density_hu,
    percentile_density_hu,
    region_densitometry,
    volume_ml,
)

#: Ten voxels; sorted already, so order statistics are easy to read off.
HU = np.array([-1000, -960, -950, -900, -800, -700, -600, -500, -400, -300], dtype=np.int16)


def test_volume_is_count_times_voxel_volume() -> None:
    assert volume_ml(HU, 0.5) == 5.0
    assert volume_ml(HU[:0], 0.5) == 0.0
    with pytest.raises(ValueError, match="positive"):
        volume_ml(HU, 0.0)


def test_mean_density() -> None:
    assert mean_density_hu(HU) == -711.0


def test_mean_of_int16_does_not_overflow() -> None:
    assert mean_density_hu(np.full(1_000_000, -1000, dtype=np.int16)) == -1000.0


def test_laa_counts_strictly_below_the_threshold() -> None:
    assert laa_percent(HU) == 20.0  # -1000 and -960; -950 itself is not below -950
    assert laa_percent(HU, -900) == 30.0
    assert laa_percent(HU, -2000) == 0.0


def test_perc15_interpolates_linearly_between_order_statistics() -> None:
    # position 0.15 * (10 - 1) = 1.35: -960 + 0.35 * (-950 - -960)
    assert percentile_density_hu(HU) == pytest.approx(-956.5)
    assert percentile_density_hu(HU, 50) == pytest.approx(-750.0)
    assert percentile_density_hu(HU, 0) == -1000.0
    assert percentile_density_hu(HU, 100) == -300.0
    with pytest.raises(ValueError, match="0..100"):
        percentile_density_hu(HU, 101)


@pytest.mark.parametrize("function", [mean_density_hu, laa_percent, percentile_density_hu])
def test_empty_region_is_an_error(function: object) -> None:
    with pytest.raises(ValueError, match="empty region"):
        function(np.array([], dtype=np.int16))  # type: ignore[operator]


def test_region_densitometry_uses_only_the_masked_voxels() -> None:
    volume = np.zeros((2, 3, 4), dtype=np.int16)
    mask = np.zeros(volume.shape, dtype=bool)
    volume.flat[:10] = HU
    mask.flat[:10] = True
    volume.flat[10:] = 500  # outside the mask; must not count

    result = region_densitometry(volume, mask, voxel_volume_ml=0.002)

    assert result.voxel_count == 10
    assert result.volume_ml == pytest.approx(0.02)
    assert result.mean_hu == -711.0
    assert result.laa_percent == 20.0
    assert result.percentile_hu == pytest.approx(-956.5)
    assert (result.laa_threshold_hu, result.percentile) == (-950.0, 15.0)


def test_region_densitometry_with_other_threshold_and_percentile() -> None:
    result = region_densitometry(
        HU.reshape(1, 2, 5), np.ones((1, 2, 5), dtype=bool), 1.0, laa_threshold_hu=-900, percentile=50
    )
    assert result.laa_percent == 30.0
    assert result.percentile_hu == pytest.approx(-750.0)


def test_region_densitometry_rejects_bad_masks() -> None:
    volume = np.zeros((2, 2, 2), dtype=np.int16)
    with pytest.raises(ValueError, match="shape"):
        region_densitometry(volume, np.ones((2, 2), dtype=bool), 1.0)
    with pytest.raises(ValueError, match="boolean"):
        region_densitometry(volume, np.ones((2, 2, 2), dtype=np.uint8), 1.0)
    with pytest.raises(ValueError, match="empty region"):
        region_densitometry(volume, np.zeros((2, 2, 2), dtype=bool), 1.0)
