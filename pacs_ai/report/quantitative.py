"""How quantitative lung CT values are put into words: the %LAA-950 bands.

%LAA-950 (percentage of lung voxels below -950 HU on inspiratory CT) is the
most used CT measure of emphysema (Gevenois et al., AJRCCM 1996; Madani et
al., Radiology 2006).  The bands below are the ones commonly used in large
cohorts and the QIBA lung density work:

* below 6 %: within normal limits for many protocols (healthy never-smokers
  in COPDGene and MESA-Lung mostly lie below about 5-6 % at full inspiration);
* 6 % to below 14 %: mild emphysema-like low attenuation;
* 14 % to below 25 %: moderate;
* 25 % and above: severe (the COPDGene/Lynch visual-quantitative
  correspondence puts marked emphysema above roughly a quarter of the lung).

These thresholds depend on the protocol: reconstruction kernel (sharp kernels
raise %LAA-950 by several points), slice thickness, dose and iterative
reconstruction, scanner calibration, and the inspiration level.  They are a
wording aid for the draft, not a diagnosis, and the draft says so.
"""

from __future__ import annotations

from dataclasses import dataclass

#: (lower bound in %, inclusive; band name).  Checked from the top.
LAA950_BANDS: tuple[tuple[float, str], ...] = (
    (25.0, "severe"),
    (14.0, "moderate"),
    (6.0, "mild"),
    (0.0, "normal"),
)


@dataclass(frozen=True)
class LaaBand:
    name: str
    #: Words for the draft.
    wording: str


def laa950_band(percent: float) -> LaaBand:
    """The band of a %LAA-950 value (see the module docstring for the source and caveats)."""
    name = next((band for lower, band in LAA950_BANDS if percent >= lower), "normal")
    if name == "normal":
        return LaaBand(name, "within normal limits for many protocols")
    return LaaBand(name, f"in keeping with {name} emphysema-like low attenuation")


def is_laa950(code: str | None, name: str) -> bool:
    """Whether a measurement is %LAA below -950 HU (code LAA950 of the lung analyzer, or by name)."""
    if code and code.upper() == "LAA950":
        return True
    lowered = name.lower()
    return "low attenuation" in lowered and "-950" in lowered
