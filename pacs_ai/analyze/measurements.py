"""Lung densitometry: pure functions over the HU values of one region.

The definitions follow the quantitative CT literature on emphysema (e.g.
Gevenois et al., AJRCCM 1996 for %LAA-950; Parr et al., AJRCCM 2006 and the
QIBA lung density profile for Perc15):

* volume: number of voxels x voxel volume;
* mean lung density (MLD): arithmetic mean of the voxels' HU values;
* %LAA-950 (low attenuation area): percentage of lung voxels with HU strictly
  below -950;
* Perc15: the HU value below which 15% of the lung voxels lie (the 15th
  percentile of the voxel HU distribution; linear interpolation between order
  statistics, numpy's default, so it is well defined for any voxel count).

Everything here takes a flat (or any-shaped) array of HU values of *one*
region; :func:`region_densitometry` extracts that array from a volume and a
mask and computes all of them.  Accumulations use float64 scalars, never
float64 copies of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The customary emphysema threshold (HU) for %LAA.
LAA_THRESHOLD_HU = -950.0
#: The customary percentile for PercN lung density.
DENSITY_PERCENTILE = 15.0


def _require_values(hu: np.ndarray, what: str) -> None:
    if hu.size == 0:
        raise ValueError(f"{what} of an empty region is undefined; the region has no voxels")


def volume_ml(hu: np.ndarray, voxel_volume_ml: float) -> float:
    """Volume of the region in mL: voxel count x voxel volume (mL). An empty region has volume 0."""
    if voxel_volume_ml <= 0:
        raise ValueError(f"voxel volume must be positive, got {voxel_volume_ml} mL")
    return float(hu.size) * float(voxel_volume_ml)


def mean_density_hu(hu: np.ndarray) -> float:
    """Mean density (HU) of the region: the arithmetic mean of its voxel values (mean lung density)."""
    _require_values(hu, "mean density")
    return float(np.mean(hu, dtype=np.float64))


def laa_percent(hu: np.ndarray, threshold_hu: float = LAA_THRESHOLD_HU) -> float:
    """%LAA: percentage (0..100) of the region's voxels strictly below ``threshold_hu``.

    With the default threshold this is %LAA-950, the percentage of lung voxels
    below -950 HU.
    """
    _require_values(hu, "%LAA")
    below = int(np.count_nonzero(hu < threshold_hu))
    return 100.0 * below / hu.size


def percentile_density_hu(hu: np.ndarray, percentile: float = DENSITY_PERCENTILE) -> float:
    """PercN: the HU value below which ``percentile`` % of the region's voxels lie (default Perc15).

    Linear interpolation between the two nearest order statistics (numpy's
    default method), so the value need not be one of the voxel values.
    """
    _require_values(hu, "percentile density")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {percentile}")
    return float(np.percentile(hu, percentile))


@dataclass(frozen=True)
class RegionDensity:
    """All densitometry values of one region (see the module docstring for the definitions)."""

    voxel_count: int
    volume_ml: float
    mean_hu: float
    laa_percent: float
    percentile_hu: float
    laa_threshold_hu: float = LAA_THRESHOLD_HU
    percentile: float = DENSITY_PERCENTILE


def region_densitometry(
    hu_volume: np.ndarray,
    mask: np.ndarray,
    voxel_volume_ml: float,
    *,
    laa_threshold_hu: float = LAA_THRESHOLD_HU,
    percentile: float = DENSITY_PERCENTILE,
) -> RegionDensity:
    """Volume, mean density, %LAA and PercN of the voxels of ``hu_volume`` where ``mask`` is true.

    ``mask`` must be boolean and have the shape of ``hu_volume``; the HU values
    are gathered once (one copy of the region, in the volume's dtype).  Raises
    ``ValueError`` for an empty mask, since density of nothing is undefined.
    """
    if mask.shape != hu_volume.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume's {hu_volume.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be boolean, got {mask.dtype}; compare a label map with a label first")
    hu = hu_volume[mask]
    _require_values(hu, "densitometry")
    return RegionDensity(
        voxel_count=int(hu.size),
        volume_ml=volume_ml(hu, voxel_volume_ml),
        mean_hu=mean_density_hu(hu),
        laa_percent=laa_percent(hu, laa_threshold_hu),
        percentile_hu=percentile_density_hu(hu, percentile),
        laa_threshold_hu=laa_threshold_hu,
        percentile=percentile,
    )
