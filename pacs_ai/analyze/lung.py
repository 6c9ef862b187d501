"""Lung segmentation and densitometry for chest CT, by thresholds and morphology (no model weights).

What the lung mask is (and so what volume and densities measure): each lung's
parenchyma inside the pleura: its aerated tissue (below ``lung_threshold_hu``,
-400 HU) with the vessels and bronchial walls that lie within it.  Not lung:
the trachea and main bronchi (also where the trachea is alone, above the
apices), gas outside the lungs (stomach, bowel, oesophagus), and solid tissue:
a tumour, consolidation or atelectasis is not lung air, so its solid part is
outside the mask and counts in neither the volume nor the densities.  The
volume is therefore the volume of the lung that is still aerated, which is
what a radiologist asks of CT lung volumetry (pre-resection planning, volume
loss); a tumour's size is a separate measurement.  The spiculated margin of
a tumour, where it is mixed with air below -400 HU, stays with the lung.

Steps (all on the HU volume as loaded, nothing is resampled):

1. **Body**: the largest 3D connected component above ``body_threshold_hu``
   (-500 HU), with holes filled slice by slice, so lungs, airway and bowel gas
   (holes in axial body slices) are inside the body and the air around the
   patient is not.
2. **Low-density mask**: body voxels below ``lung_threshold_hu`` (-400 HU),
   the customary boundary between aerated lung and soft tissue.
3. **Airway removal** (trachea and main bronchi), slice-wise region growing:
   a seed is a round air region (below ``airway_threshold_hu``, -950 HU) near
   the middle of the body in the top slices; from there the airway is followed
   slice by slice (both ways), within ``AIRWAY_SEARCH_MM`` of where it was, by
   keeping the low-density regions of the next slice that overlap the airway
   of the current one (low-density rather than air, because thick slices cut
   obliquely running bronchi and partial volume lifts their lumen above
   -950 HU).  Leak check: a region is not taken when it reaches the edge of
   the search area, or when its area exceeds ``airway_leak_factor`` times the
   area it grows from and also exceeds three trachea cross-sections (lung
   joining in); then only its air core is followed, under the same check.
   Growing stops once ``max_airway_ml`` is removed.  The removed lumen is
   dilated by one pixel (within the low-density mask) to take the
   partial-volume rim with it.  Airway inside the lung (where the bronchi
   have joined the parenchyma in-plane) stays with the lung, the usual
   convention for lung volume.
4. **Gas outside the lungs**: slice by slice, a gas region (below
   ``airway_threshold_hu``, at least ``MIN_GAS_AREA_MM2``) whose surroundings
   (a ring from about 4 to ``GAS_WALL_MM`` beyond it) are at least
   ``gas_wall_fraction`` soft tissue, and which is nearly pure air inside
   (``MAX_TISSUE_FRACTION``), is stomach, bowel, oesophagus or airway, never
   lung; it is removed with its partial-volume rim.  Slice by slice matters:
   thick slices average the diaphragm away, so stomach gas touches the lung
   base across slices, while in-plane diaphragm and organ wall separate them.
   Lung, even with emphysema, is surrounded by lung on part of its ring and
   has a denser matrix, vessels and septa inside.
5. **Left/right lungs**: 3D components of what remains.  Two large components
   on either side of the body's midline are the lungs.  One large component
   that crosses the midline means the lungs touch (anterior junction or an
   airway remnant); it is split by in-plane erosion until two cores on
   opposite sides appear, and every voxel then goes to the nearest core.
   Which lung is which is decided in patient coordinates (LPS: +x is the
   patient's left), never by array index.
6. **Vessels in, solid lesions out**: tissue islands inside a lung on a slice
   (vessels, bronchial walls) join that lung, unless an island holds a disc
   of ``SOLID_LESION_RADIUS_MM`` (thicker than any intrapulmonary vessel):
   that is a solid lesion and stays out.  A lesion touching the mediastinum
   or chest wall is not an island and stays out as well.
7. **Measurements** per lung and for both lungs (see :mod:`pacs_ai.analyze.measurements`).

Memory: masks are bool/uint8, connected-component labels are uint16 (int32
only if a mask has more than 65535 components), per-label counts and lookups
are done slice by slice to avoid int64 temporaries of volume size; peak
additional memory is about 1.5-2x the int16 volume.  The gas search runs on a
sampled grid (about ``GAS_GRID_MM``) and the airway search in a window around
the airway, so both cost little next to the 3D labelling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from pacs_ai.analyze.base import (
    AlgorithmInfo,
    AnalysisRefused,
    AnalysisResult,
    Code,
    InvalidParameters,
    MeasurementSpec,
    SegmentSpec,
)
from pacs_ai.analyze.measurements import region_densitometry
from pacs_ai.analyze.volume import Volume, load_series

CT_IMAGE_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
}

SCT_ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
SCT_RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
SCT_LEFT_LUNG = Code("44029006", "SCT", "Left lung")
SCT_LUNG = Code("39607008", "SCT", "Lung")
SCT_VOLUME = Code("118565006", "SCT", "Volume")
SCT_MEAN = Code("373098007", "SCT", "Mean")
DCM_ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
UCUM_ML = Code("mL", "UCUM", "mL")
UCUM_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UCUM_PERCENT = Code("%", "UCUM", "%")
#: Local (private) coding scheme: no standard codes exist for %LAA and PercN.
LOCAL_SCHEME = "99PACSAI"
#: CID 7162 (Algorithm Family) has no "thresholding" or "region growing"; the method is threshold
#: masks refined by connected components, erosion and dilation, so "Morphological Operations" is the
#: closest existing concept (the alternatives, "Histogram Analysis" or "Artificial Intelligence",
#: would describe it wrongly).
DCM_MORPHOLOGICAL_OPERATIONS = Code("123104", "DCM", "Morphological Operations")

RIGHT_LUNG_LABEL = 1
LEFT_LUNG_LABEL = 2
#: The airway is looked for within this distance (in-plane) of its position on the slice before.
AIRWAY_SEARCH_MM = 30.0
#: Gas regions are first found on a grid of about this spacing (sampled, not averaged: it is cheap).
GAS_GRID_MM = 4.0
#: The wall of a gas region is looked at in a ring (in-plane) from one grid step (past the
#: partial-volume rim) to this far beyond it: farther than a bronchial wall (1-2 mm, then lung),
#: about as far as diaphragm plus stomach or bowel wall reach.
GAS_WALL_MM = 6.0
#: Gas regions smaller than this on a slice are left alone (emphysema, noise, small bronchi).
MIN_GAS_AREA_MM2 = 100.0
#: Gas is nearly pure air: a region with more than this fraction of its inner voxels above
#: ``GAS_MAX_HU`` is lung (even with emphysema, lung has a denser matrix, vessels and septa),
#: however much soft tissue surrounds it.  On the shared real CT, stomach and bowel gas have
#: 0-4 % (sharp kernel, noise about 30 HU), hyperlucent lung walled by chest wall and
#: mediastinum 11 %.
MAX_TISSUE_FRACTION = 0.05
GAS_MAX_HU = -900.0
#: Partial-volume rim removed with a gas region, in-plane.
GAS_RIM_MM = 2.0
#: A tissue island inside a lung (in-plane) is a vessel or bronchial wall, and part of the lung,
#: unless it holds a disc of this radius: then it is a solid lesion (tumour, consolidation,
#: atelectasis) and stays outside the lung.  Intrapulmonary vessels are thinner than 10 mm.
SOLID_LESION_RADIUS_MM = 5.0
#: CIELab (DICOM-scaled 0..65535) colours: right lung light blue, left lung light orange.
RIGHT_LUNG_CIELAB = (45000, 30000, 20000)
LEFT_LUNG_CIELAB = (45000, 40000, 45000)


@dataclass(frozen=True)
class LungParams:
    """Tunable parameters; a profile's ``params`` may override any of them by name."""

    body_threshold_hu: float = -500.0
    lung_threshold_hu: float = -400.0
    airway_threshold_hu: float = -950.0
    laa_threshold_hu: float = -950.0
    density_percentile: float = 15.0
    #: Smallest low-density component accepted as a lung.
    min_lung_ml: float = 100.0
    #: Slice-wise airway growth refuses regions larger than this times their parent's area.
    airway_leak_factor: float = 2.5
    #: Airway growth stops once this much has been removed (explosion control).
    max_airway_ml: float = 300.0
    #: The trachea seed is looked for in this fraction of the slices, from the top.
    trachea_search_fraction: float = 0.4
    #: A gas region whose surroundings (``GAS_WALL_MM`` around it, in-plane) are at least this
    #: fraction soft tissue is gas outside the lungs (stomach, bowel, oesophagus, airway), not lung.
    gas_wall_fraction: float = 0.75

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> LungParams:
        """Validated parameters from a profile's ``params`` mapping (unknown keys are an error)."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidParameters(f"unknown ct-chest-lung parameter(s) {unknown}; known: {sorted(known)}")
        values: dict[str, float] = {}
        for name, value in params.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError) as exc:
                raise InvalidParameters(
                    f"ct-chest-lung parameter {name!r} must be a number, got {value!r}"
                ) from exc
        chosen = cls(**values)
        if not chosen.lung_threshold_hu > chosen.airway_threshold_hu:
            raise InvalidParameters("airway_threshold_hu must be below lung_threshold_hu (airway is darker)")
        percentile_ok = 0 < chosen.density_percentile < 100
        fraction_ok = 0 < chosen.gas_wall_fraction <= 1
        if not (percentile_ok and fraction_ok and chosen.min_lung_ml > 0 and chosen.airway_leak_factor > 1):
            raise InvalidParameters(
                "need 0 < density_percentile < 100, 0 < gas_wall_fraction <= 1, min_lung_ml > 0 "
                "and airway_leak_factor > 1"
            )
        return chosen

    def as_strings(self) -> dict[str, str]:
        """For AlgorithmInfo.parameters (recorded in SEG/SR and the job)."""
        return {f.name: f"{getattr(self, f.name):g}" for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Small helpers that keep memory flat
# --------------------------------------------------------------------------------------------


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Connected components as uint16 when they fit (half the memory of scipy's default int32)."""
    labels = np.empty(mask.shape, dtype=np.uint16)
    try:
        count = ndi.label(mask, structure=structure, output=labels)
    except RuntimeError:  # more than 65535 components: scipy reports insufficient bit depth
        del labels
        labels, count = ndi.label(mask, structure=structure)
    return labels, int(count)


def _label_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxel count per label (0 = background); slice by slice, as np.bincount casts its input to int64."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    for plane in labels:
        sizes += np.bincount(plane.ravel(), minlength=count + 1)
    return sizes


def _centroid_index(mask: np.ndarray, offset: tuple[int, ...]) -> tuple[float, float, float]:
    """Centroid (slice, row, column index) of a boolean crop whose origin in the volume is ``offset``."""
    total = float(np.count_nonzero(mask))
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(axis=other, dtype=np.int64)
        centre.append(offset[axis] + float(np.dot(profile, np.arange(profile.size))) / total)
    return centre[0], centre[1], centre[2]


def _bbox_slices(bbox: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(int(s.start) for s in bbox)


def _hu_code(value: float) -> str:
    return f"{abs(value):g}".replace(".", "p")


# --------------------------------------------------------------------------------------------
# The analyzer
# --------------------------------------------------------------------------------------------


@dataclass
class _BodyInfo:
    #: Patient x (mm) of the body's centroid: the midline that separates right from left.
    midline_x: float
    #: Per slice (row_min, row_max, col_min, col_max) of the body, or None where it is absent.
    boxes: list[tuple[int, int, int, int] | None]


class CtChestLungAnalyzer:
    """Right/left lung segmentation with volume, mean lung density, %LAA-950 and Perc15."""

    name = "ct-chest-lung"
    version = "1.1.0"

    def load(self, paths: Sequence[Path], params: dict[str, Any]) -> Volume:
        """A regular CT volume (see :func:`~pacs_ai.analyze.volume.load_series`)."""
        return load_series(paths)

    def analyze(self, volume: Volume, params: dict[str, Any]) -> AnalysisResult:
        """Segment both lungs and measure them; see the module docstring for the method."""
        p = LungParams.from_params(params)
        top_is_last = _check_input(volume)
        hu = volume.voxels
        notes: list[str] = []

        mask, body = _body_mask(hu, p.body_threshold_hu, volume)
        # From here ``mask`` is the low-density mask inside the body (reusing the body's memory).
        for k in range(hu.shape[0]):
            np.logical_and(mask[k], hu[k] < p.lung_threshold_hu, out=mask[k])
        notes.append(_remove_airway(mask, hu, volume, body, p, top_is_last))
        notes.append(_remove_walled_gas(mask, hu, volume, p))
        labels = _lung_labels(mask, volume, body, p, notes)
        del mask
        notes.append(_include_vessels(labels, volume))

        measurements = _measurements(hu, labels, volume.voxel_volume_ml, p)
        segments = [
            SegmentSpec(
                RIGHT_LUNG_LABEL, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG, RIGHT_LUNG_CIELAB
            ),
            SegmentSpec(
                LEFT_LUNG_LABEL, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, LEFT_LUNG_CIELAB
            ),
        ]
        algorithm = AlgorithmInfo(
            name="pacs-ai CT chest lung",
            version=self.version,
            family=DCM_MORPHOLOGICAL_OPERATIONS,
            parameters=p.as_strings(),
        )
        return AnalysisResult(
            algorithm=algorithm, labels=labels, segments=segments, measurements=measurements, notes=notes
        )


def _check_input(volume: Volume) -> bool:
    """Refuse non-CT and non-axial input; return True when the last slice is the most superior one."""
    header = volume.headers[0] if volume.headers else None
    modality = str(header.get("Modality", "")) if header is not None else ""
    sop_class = str(header.get("SOPClassUID", "")) if header is not None else ""
    if modality != "CT" and not (not modality and sop_class in CT_IMAGE_STORAGE_CLASSES):
        raise AnalysisRefused(
            f"modality is {modality or 'missing'} (SOP class {sop_class or 'missing'}); "
            "ct-chest-lung measures CT images in HU only"
        )
    if volume.voxels.ndim != 3 or volume.voxels.shape[0] < 3:
        raise AnalysisRefused(f"volume of shape {volume.voxels.shape} is not a 3D stack of at least 3 slices")
    normal_z = float(np.asarray(volume.direction)[2][2])
    angle = math.degrees(math.acos(min(1.0, abs(normal_z))))
    if angle > 30.0:
        raise AnalysisRefused(
            f"slices are {angle:.0f} degrees off axial (slice normal "
            f"{np.round(volume.direction[2], 3).tolist()}); "
            "ct-chest-lung needs axial slices"
        )
    return normal_z > 0


def _body_mask(hu: np.ndarray, threshold: float, volume: Volume) -> tuple[np.ndarray, _BodyInfo]:
    """Largest 3D component above ``threshold`` HU, holes filled per slice; also midline and slice boxes."""
    mask = hu > threshold
    labels, count = _label(mask)
    if count == 0:
        raise AnalysisRefused(f"no body found: no voxel above {threshold:g} HU")
    sizes = _label_sizes(labels, count)
    np.equal(labels, int(np.argmax(sizes[1:]) + 1), out=mask)
    del labels
    boxes: list[tuple[int, int, int, int] | None] = []
    for k in range(mask.shape[0]):
        rows = np.flatnonzero(mask[k].any(axis=1))
        if rows.size == 0:
            boxes.append(None)
            continue
        cols = np.flatnonzero(mask[k].any(axis=0))
        box = (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))
        boxes.append(box)
        # Filling within the body's bounding box is exact (a hole never reaches the box edge) and cheaper.
        crop = mask[k, box[0] : box[1] + 1, box[2] : box[3] + 1]
        crop[...] = ndi.binary_fill_holes(crop)
    centroid = _centroid_index(mask, (0, 0, 0))
    midline_x = float(volume.patient_position(centroid)[0])
    return mask, _BodyInfo(midline_x=midline_x, boxes=boxes)


def _find_trachea(
    low: np.ndarray, hu: np.ndarray, volume: Volume, body: _BodyInfo, p: LungParams, top_down: list[int]
) -> tuple[int, np.ndarray] | None:
    """The first slice from the top with a round, central air region of trachea size, and that region."""
    _, dy, dx = volume.spacing_mm
    pixel_mm2 = dy * dx
    min_area, max_area = math.pi * 5.0**2, math.pi * 20.0**2  # trachea diameter 10..40 mm
    search = top_down[: max(1, int(len(top_down) * p.trachea_search_fraction))]
    for k in search:
        box = body.boxes[k]
        if box is None:
            continue
        centre_col = (box[2] + box[3]) / 2.0
        band_mm = max(25.0, 0.15 * (box[3] - box[2] + 1) * dx)
        air = low[k] & (hu[k] < p.airway_threshold_hu)
        labels, count = ndi.label(air)
        best: tuple[float, np.ndarray] | None = None
        for index, region in enumerate(ndi.find_objects(labels), start=1):
            if region is None:
                continue
            component = labels[region] == index
            area = float(np.count_nonzero(component)) * pixel_mm2
            height, width = component.shape
            fill = np.count_nonzero(component) / float(height * width)
            col = region[1].start + (width - 1) / 2.0
            plausible = min_area <= area <= max_area and fill >= 0.5 and abs(col - centre_col) * dx <= band_mm
            if plausible and (best is None or area > best[0]):
                best = (area, labels == index)
        if best is not None:
            return k, best[1]
    return None


def _remove_airway(
    low: np.ndarray, hu: np.ndarray, volume: Volume, body: _BodyInfo, p: LungParams, top_is_last: bool
) -> str:
    """Remove trachea and main bronchi from ``low`` in place; return a note describing what happened."""
    slices = low.shape[0]
    top_down = list(range(slices - 1, -1, -1)) if top_is_last else list(range(slices))
    found = _find_trachea(low, hu, volume, body, p, top_down)
    if found is None:
        return (
            f"airway: no trachea (round central region below {p.airway_threshold_hu:g} HU) in the top "
            f"{p.trachea_search_fraction:.0%} of slices; airway not removed"
        )
    seed_slice, seed = found
    _, dy, dx = volume.spacing_mm
    seed_area = float(np.count_nonzero(seed))
    budget = p.max_airway_ml / volume.voxel_volume_ml
    removed = 0
    removed_slices = 0
    stop_reasons: list[str] = []
    position = top_down.index(seed_slice)
    dilate = ndi.generate_binary_structure(2, 1)
    margin = (math.ceil(AIRWAY_SEARCH_MM / dy), math.ceil(AIRWAY_SEARCH_MM / dx))

    def take(k: int, airway: np.ndarray, crop: tuple[slice, slice]) -> None:
        nonlocal removed, removed_slices
        rim = ndi.binary_dilation(airway, structure=dilate) & low[k][crop]
        removed += int(np.count_nonzero(rim))
        removed_slices += 1
        low[k][crop][rim] = False

    for direction in (top_down[position + 1 :], top_down[:position][::-1]):  # downwards, then upwards
        previous = seed
        for k in direction:
            if removed > budget:
                stop_reasons.append(f"volume limit {p.max_airway_ml:g} mL reached")
                break
            crop = _around(previous, margin)
            current = _airway_in_slice(low[k][crop], hu[k][crop], previous[crop], seed_area, p)
            if isinstance(current, float):
                stop_reasons.append(f"leak at slice {k} ({current * dy * dx:.0f} mm2)")
                break
            if not current.any():
                break
            take(k, current, crop)
            previous = np.zeros_like(previous)
            previous[crop] = current
    whole = (slice(0, seed.shape[0]), slice(0, seed.shape[1]))
    take(seed_slice, ndi.binary_fill_holes(seed), whole)
    stopped = f"; stopped: {', '.join(stop_reasons[:3])}" if stop_reasons else ""
    return (
        f"airway: trachea seed in slice {seed_slice}, {removed * volume.voxel_volume_ml:.1f} mL removed "
        f"over {removed_slices} slices{stopped}"
    )


def _around(mask: np.ndarray, margin: tuple[int, int]) -> tuple[slice, slice]:
    """The bounding box of a 2D mask grown by ``margin`` (rows, columns), clipped to the slice."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(0, int(rows[0]) - margin[0]), int(rows[-1]) + margin[0] + 1),
        slice(max(0, int(cols[0]) - margin[1]), int(cols[-1]) + margin[1] + 1),
    )


def _airway_in_slice(
    low: np.ndarray, hu: np.ndarray, previous: np.ndarray, seed_area: float, p: LungParams
) -> np.ndarray | float:
    """The airway in one slice (a crop around the airway of the slice before), holes filled.

    An airway region overlaps the previous airway and is a low-density region
    (below ``lung_threshold_hu``, so bronchi cut obliquely by thick slices, whose
    lumen partial volume lifts above the air threshold, still count), as long as
    it stays inside the mediastinum: a region that reaches the crop's edge or is
    much larger than what it grows from has joined lung.  Then only its air core
    (below ``airway_threshold_hu``) is followed, with the same leak check.
    Returns the area (pixels) of a refused region when nothing was accepted and
    something leaked, so the caller can report it.
    """
    parents, parent_count = ndi.label(previous)
    parent_areas = np.bincount(parents.ravel(), minlength=parent_count + 1)

    def accepted(component: np.ndarray) -> bool:
        area = float(np.count_nonzero(component))
        pieces = np.unique(parents[component])
        parent_area = float(parent_areas[pieces[pieces > 0]].sum())
        edges = component[0].any() or component[-1].any() or component[:, 0].any() or component[:, -1].any()
        return not edges and not (area > p.airway_leak_factor * parent_area and area > 3.0 * seed_area)

    current = np.zeros_like(previous)
    leaked = 0.0
    regions, _ = ndi.label(low)
    for index in np.unique(regions[previous]):
        if index == 0:
            continue
        component = regions == index
        if accepted(component):
            current |= component
            continue
        cores, _ = ndi.label(component & (hu < p.airway_threshold_hu))
        for core_index in np.unique(cores[previous]):
            core = cores == core_index
            if core_index == 0:
                continue
            if accepted(core):
                current |= core
            else:
                leaked = max(leaked, float(np.count_nonzero(core)))
    if not current.any() and leaked:
        return leaked
    return ndi.binary_fill_holes(current)


def _remove_walled_gas(low: np.ndarray, hu: np.ndarray, volume: Volume, p: LungParams) -> str:
    """Remove gas walled by soft tissue (stomach, bowel, oesophagus, airway) from ``low``, in place.

    Slice by slice, because gas below the diaphragm touches the lung base only
    across slices (thick slices average the diaphragm away), never in-plane.
    A 2D gas region (below ``airway_threshold_hu``) is not lung when soft tissue
    makes up at least ``gas_wall_fraction`` of a ring around it (from one grid
    step, past the partial-volume rim, to ``GAS_WALL_MM`` farther) and it is
    nearly pure air inside (see :func:`_remove_gas_region`).  Regions are found
    on a sampled grid of about ``GAS_GRID_MM``; each found one is then removed
    at full resolution with its partial-volume rim.  Returns a note for the
    result.
    """
    _, dy, dx = volume.spacing_mm
    step = max(1, round(GAS_GRID_MM / min(dy, dx)))
    grid_hu = hu[:, ::step, ::step]
    candidates = low[:, ::step, ::step] & (grid_hu < p.airway_threshold_hu)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndi.generate_binary_structure(2, 2)
    regions, count = _label(candidates, in_plane)
    if count == 0:
        return "gas: no gas region walled by soft tissue"
    min_cells = MIN_GAS_AREA_MM2 / (step * dy * step * dx)
    areas = _label_sizes(regions, count)
    ring_cells = max(1, round(GAS_WALL_MM / (step * min(dy, dx))))
    ring_structure = ndi.generate_binary_structure(2, 1)
    removed = 0
    taken = 0
    for index, box in enumerate(ndi.find_objects(regions), start=1):
        if box is None or areas[index] < min_cells:
            continue
        k = box[0].start
        rows = slice(max(0, box[1].start - ring_cells - 1), box[1].stop + ring_cells + 1)
        cols = slice(max(0, box[2].start - ring_cells - 1), box[2].stop + ring_cells + 1)
        region = ndi.binary_fill_holes(regions[k, rows, cols] == index)
        outer = ndi.binary_dilation(region, ring_structure, iterations=ring_cells + 1)
        ring = outer & ~ndi.binary_dilation(region, ring_structure)
        wall = np.count_nonzero(grid_hu[k, rows, cols][ring] >= p.lung_threshold_hu)
        if wall < p.gas_wall_fraction * np.count_nonzero(ring):
            continue
        count_removed = _remove_gas_region(low[k], hu[k], region, (rows, cols), step, volume, p)
        if count_removed:
            removed += count_removed
            taken += 1
    if not taken:
        return "gas: no gas region walled by soft tissue"
    return (
        f"gas: {removed * volume.voxel_volume_ml:.1f} mL in {taken} slice region(s) walled by soft tissue "
        "(stomach, bowel, oesophagus or airway) removed; it is not lung"
    )


def _remove_gas_region(
    low: np.ndarray,
    hu: np.ndarray,
    grid_region: np.ndarray,
    grid_box: tuple[slice, slice],
    step: int,
    volume: Volume,
    p: LungParams,
) -> int:
    """Remove one slice's gas region (found on the sampled grid) from ``low`` at full resolution.

    First checks that the region is gas, not lung: at most ``MAX_TISSUE_FRACTION``
    of the voxels inside it (its grid cells, less a rim) may be above
    ``GAS_MAX_HU``.  Returns the number of voxels removed (0 when it is lung).
    """
    _, dy, dx = volume.spacing_mm
    rim = max(1, round(GAS_RIM_MM / min(dy, dx)))
    pad = step + rim
    top = max(0, grid_box[0].start * step - pad)
    left = max(0, grid_box[1].start * step - pad)
    crop = (slice(top, grid_box[0].stop * step + pad), slice(left, grid_box[1].stop * step + pad))
    low_crop, hu_crop = low[crop], hu[crop]
    # Each grid sample stands for the step x step cell centred on it.
    cells = np.zeros(low_crop.shape, dtype=bool)
    grid_rows, grid_cols = np.nonzero(grid_region)
    rows = grid_rows * step + grid_box[0].start * step - top
    cols = grid_cols * step + grid_box[1].start * step - left
    size: np.ndarray = np.asarray(cells.shape)
    keep = (rows < size[0]) & (cols < size[1])
    cells[rows[keep], cols[keep]] = True
    cells = ndi.binary_dilation(cells, np.ones((2 * (step // 2) + 1,) * 2, dtype=bool))
    interior = ndi.binary_erosion(cells, iterations=rim)
    if not interior.any():
        return 0
    tissue = np.count_nonzero(hu_crop[interior] > GAS_MAX_HU)
    if tissue > MAX_TISSUE_FRACTION * np.count_nonzero(interior):
        return 0
    pieces, _ = ndi.label(low_crop & (hu_crop < p.airway_threshold_hu), ndi.generate_binary_structure(2, 2))
    chosen = np.unique(pieces[interior])
    region = ndi.binary_fill_holes(np.isin(pieces, chosen[chosen > 0]))
    region = ndi.binary_dilation(region, ndi.generate_binary_structure(2, 1), iterations=rim) & low_crop
    low_crop[region] = False
    return int(np.count_nonzero(region))


def _lung_labels(
    low: np.ndarray, volume: Volume, body: _BodyInfo, p: LungParams, notes: list[str]
) -> np.ndarray:
    """uint8 label map (1 right lung, 2 left lung) from the airway-free low-density mask.

    The label map is written into ``low``'s memory (``low`` is consumed).
    """
    components, count = _label(low)
    sizes = _label_sizes(components, count)
    sizes[0] = 0
    voxel_ml = volume.voxel_volume_ml
    ranked = [int(i) for i in np.argsort(sizes)[::-1][:4] if sizes[i] > 0]
    candidates = [i for i in ranked if sizes[i] * voxel_ml >= p.min_lung_ml]
    if not candidates:
        largest = sizes[ranked[0]] * voxel_ml if ranked else 0.0
        raise AnalysisRefused(
            f"no lung-density region larger than {p.min_lung_ml:g} mL (voxels below "
            f"{p.lung_threshold_hu:g} HU inside the body; largest region {largest:.1f} mL); "
            "is this a chest CT?"
        )
    boxes = ndi.find_objects(components, max_label=max(candidates))
    centroid_x = {}
    for index in candidates[:2]:
        box = boxes[index - 1]
        centroid = _centroid_index(components[box] == index, _bbox_slices(box))
        centroid_x[index] = float(volume.patient_position(centroid)[0])

    lookup = np.zeros(count + 1, dtype=np.uint8)
    # The low-density mask is not needed any more (``components`` holds it): reuse its memory for the
    # output, which keeps the peak at mask + uint16 components instead of adding another volume.
    labels = low.view(np.uint8)
    first = candidates[0]
    second = candidates[1] if len(candidates) > 1 else None
    mid = body.midline_x
    if second is not None and (centroid_x[first] - mid) * (centroid_x[second] - mid) < 0:
        right, left = sorted((first, second), key=lambda i: centroid_x[i])
        lookup[right], lookup[left] = RIGHT_LUNG_LABEL, LEFT_LUNG_LABEL
        for k in range(components.shape[0]):
            labels[k] = lookup[components[k]]
        return labels

    # One large region: either the lungs touch, or there is only one lung.
    box = boxes[first - 1]
    region = components[box] == first
    del components
    labels[...] = 0
    split = _split_by_erosion(region, volume, _bbox_slices(box), mid)
    if split is None:
        side = "right" if centroid_x[first] < mid else "left"
        raise AnalysisRefused(
            f"only one lung region found ({sizes[first] * voxel_ml:.0f} mL, on the patient's {side}); "
            "the right and left lungs could not be identified separately"
        )
    labels[box] = split
    notes.append("lungs: right and left lungs were connected and have been separated by erosion")
    return labels


def _include_vessels(labels: np.ndarray, volume: Volume) -> str:
    """Add each lung's vessels and bronchial walls (in-plane islands) to it in place; not solid lesions.

    Returns a note saying how much was added and how much solid tissue inside
    the lungs was left out.
    """
    _, dy, dx = volume.spacing_mm
    lesion_radius = SOLID_LESION_RADIUS_MM / min(dy, dx)
    small = math.pi * lesion_radius**2  # an island smaller than the disc cannot hold it
    added = lesion = 0
    for plane in labels:
        for label, box in enumerate(ndi.find_objects(plane, max_label=LEFT_LUNG_LABEL), start=1):
            if box is None:
                continue
            crop = plane[box]
            islands, count = ndi.label(crop != label)
            if count < 2:
                continue
            border = np.unique(np.concatenate((islands[0], islands[-1], islands[:, 0], islands[:, -1])))
            for index, island_box in enumerate(ndi.find_objects(islands), start=1):
                if island_box is None or index in border:
                    continue
                island = islands[island_box] == index
                area = int(np.count_nonzero(island))
                if area >= small and ndi.distance_transform_edt(np.pad(island, 1)).max() >= lesion_radius:
                    lesion += area
                    continue
                island &= crop[island_box] == 0  # never take the other lung's voxels
                crop[island_box][island] = label
                added += int(np.count_nonzero(island))
    ml = volume.voxel_volume_ml
    return (
        f"lungs: tissue islands inside the lungs: {added * ml:.1f} mL of vessels and bronchial walls "
        "included, "
        f"{lesion * ml:.1f} mL thicker than {2 * SOLID_LESION_RADIUS_MM:g} mm (solid lesion) left out; "
        "solid tissue touching the mediastinum or chest wall is never lung"
    )


def _split_by_erosion(
    region: np.ndarray, volume: Volume, offset: tuple[int, ...], midline_x: float
) -> np.ndarray | None:
    """Split a region holding both lungs: erode in-plane until two cores lie on either side of the midline.

    Works on an in-plane subsampled copy (about 2 mm pixels) because the cores
    only need to be roughly right; each full-resolution voxel then takes the
    label of the nearest core.  Returns a uint8 crop (1 right, 2 left) or None.
    """
    dz, dy, dx = volume.spacing_mm
    step = max(1, round(2.0 / min(dy, dx)))
    coarse = np.ascontiguousarray(region[:, ::step, ::step])
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    total = np.count_nonzero(coarse)
    max_iterations = max(1, math.ceil(30.0 / (step * min(dy, dx))))
    cores: np.ndarray | None = None
    for _ in range(max_iterations):
        coarse = ndi.binary_erosion(coarse, structure=structure)
        labels, count = ndi.label(coarse)
        if count < 2:
            if count == 0:
                return None
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        a, b = (int(i) for i in np.argsort(sizes)[::-1][:2])
        if sizes[b] < 0.05 * total:
            continue
        xs = {}
        for index in (a, b):
            k, i, j = _centroid_index(labels == index, (0, 0, 0))
            full = (offset[0] + k, offset[1] + i * step, offset[2] + j * step)
            xs[index] = float(volume.patient_position(full)[0])
        if (xs[a] - midline_x) * (xs[b] - midline_x) >= 0:
            continue
        right, left = sorted((a, b), key=lambda i: xs[i])
        cores = np.zeros(labels.shape, dtype=np.uint8)
        cores[labels == right] = RIGHT_LUNG_LABEL
        cores[labels == left] = LEFT_LUNG_LABEL
        break
    if cores is None:
        return None
    nearest_index = ndi.distance_transform_edt(
        cores == 0, sampling=(dz, dy * step, dx * step), return_distances=False, return_indices=True
    )
    nearest = cores[tuple(nearest_index)]
    del nearest_index
    result = np.zeros(region.shape, dtype=np.uint8)
    rows, cols = region.shape[1], region.shape[2]
    for k in range(region.shape[0]):
        upsampled = np.repeat(np.repeat(nearest[k], step, axis=0), step, axis=1)[:rows, :cols]
        result[k] = np.where(region[k], upsampled, 0)
    return result


def _measurements(
    hu: np.ndarray, labels: np.ndarray, voxel_ml: float, p: LungParams
) -> list[MeasurementSpec]:
    """Volume, mean density, %LAA and PercN for each lung (TID 1411 groups) and both lungs (TID 1501)."""
    laa_code = Code(
        f"LAA{_hu_code(p.laa_threshold_hu)}",
        LOCAL_SCHEME,
        f"Percentage of low attenuation area below {p.laa_threshold_hu:g} HU",
    )
    percentile_code = Code(
        f"PERC{p.density_percentile:g}".replace(".", "p"),
        LOCAL_SCHEME,
        f"{_ordinal(p.density_percentile)} percentile of lung density",
    )
    regions: list[tuple[int | None, Code]] = [
        (RIGHT_LUNG_LABEL, SCT_RIGHT_LUNG),
        (LEFT_LUNG_LABEL, SCT_LEFT_LUNG),
        (None, SCT_LUNG),
    ]
    result = []
    for segment, site in regions:
        # One mask at a time: each is as large as the volume.
        mask = labels > 0 if segment is None else labels == segment
        density = region_densitometry(
            hu, mask, voxel_ml, laa_threshold_hu=p.laa_threshold_hu, percentile=p.density_percentile
        )
        del mask
        result += [
            MeasurementSpec(SCT_VOLUME, density.volume_ml, UCUM_ML, segment, site),
            MeasurementSpec(
                DCM_ATTENUATION_COEFFICIENT, density.mean_hu, UCUM_HU, segment, site, derivation=SCT_MEAN
            ),
            MeasurementSpec(laa_code, density.laa_percent, UCUM_PERCENT, segment, site),
            MeasurementSpec(percentile_code, density.percentile_hu, UCUM_HU, segment, site),
        ]
    return result


def _ordinal(value: float) -> str:
    if not float(value).is_integer():
        return f"{value:g}th"
    number = int(value)
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
