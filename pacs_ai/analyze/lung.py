"""Lung segmentation and densitometry for chest CT, by thresholds and morphology (no model weights).

Steps (all on the HU volume as loaded, nothing is resampled):

1. **Body**: the largest 3D connected component above ``body_threshold_hu``
   (-500 HU), with holes filled slice by slice, so lungs and airway (holes in
   every axial body slice) are inside the body and the air around the patient
   is not.
2. **Low-density mask**: body voxels below ``lung_threshold_hu`` (-400 HU),
   the customary boundary between aerated lung and soft tissue.
3. **Airway removal** (trachea and main bronchi), slice-wise region growing:
   a seed is a round air region (below ``airway_threshold_hu``, -950 HU) near
   the middle of the body in the top slices; from there the airway is followed
   slice by slice (both ways) by keeping the air regions of the next slice that
   overlap the airway of the current one.  Leak check: a region is not taken
   when its area exceeds ``airway_leak_factor`` times the area it grows from
   and also exceeds three trachea cross-sections (that is lung parenchyma or
   emphysema joining in), and growing stops once ``max_airway_ml`` is
   removed.  The removed lumen is dilated by one pixel (within the
   low-density mask) to take the partial-volume rim with it.  Airway below the
   leak point stays with the lung, which is the usual convention for lung volume.
4. **Left/right lungs**: 3D components of what remains.  Two large components
   on either side of the body's midline are the lungs.  One large component
   that crosses the midline means the lungs touch (anterior junction or an
   airway remnant); it is split by in-plane erosion until two cores on
   opposite sides appear, and every voxel then goes to the nearest core.
   Which lung is which is decided in patient coordinates (LPS: +x is the
   patient's left), never by array index.
5. **Measurements** per lung and for both lungs (see :mod:`pacs_ai.analyze.measurements`).

Memory: masks are bool/uint8, connected-component labels are uint16 (int32
only if a mask has more than 65535 components), per-label counts and lookups
are done slice by slice to avoid int64 temporaries of volume size; peak
additional memory is about 1.5-2x the int16 volume.
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
        if not (percentile_ok and chosen.min_lung_ml > 0 and chosen.airway_leak_factor > 1):
            raise InvalidParameters(
                "need 0 < density_percentile < 100, min_lung_ml > 0 and airway_leak_factor > 1"
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
    version = "1.0.0"

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
        labels = _lung_labels(mask, volume, body, p, notes)
        del mask

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

    def take(k: int, airway: np.ndarray) -> None:
        nonlocal removed, removed_slices
        rim = ndi.binary_dilation(airway, structure=dilate) & low[k]
        removed += int(np.count_nonzero(rim))
        removed_slices += 1
        low[k][rim] = False

    for direction in (top_down[position + 1 :], top_down[:position][::-1]):  # downwards, then upwards
        previous = seed
        for k in direction:
            if removed > budget:
                stop_reasons.append(f"volume limit {p.max_airway_ml:g} mL reached")
                break
            air = low[k] & (hu[k] < p.airway_threshold_hu)
            labels, _ = ndi.label(air)
            parents, parent_count = ndi.label(previous)
            parent_areas = np.bincount(parents.ravel(), minlength=parent_count + 1)
            current = np.zeros_like(previous)
            for index in np.unique(labels[previous]):
                if index == 0:
                    continue
                component = labels == index
                area = float(np.count_nonzero(component))
                pieces = np.unique(parents[component])
                parent_area = float(parent_areas[pieces[pieces > 0]].sum())
                if area > p.airway_leak_factor * parent_area and area > 3.0 * seed_area:
                    stop_reasons.append(f"leak at slice {k} ({area * dy * dx:.0f} mm2)")
                    continue
                current |= component
            if not current.any():
                break
            current = ndi.binary_fill_holes(current)
            take(k, current)
            previous = current
    take(seed_slice, ndi.binary_fill_holes(seed))
    stopped = f"; stopped: {', '.join(stop_reasons[:3])}" if stop_reasons else ""
    return (
        f"airway: trachea seed in slice {seed_slice}, {removed * volume.voxel_volume_ml:.1f} mL removed "
        f"over {removed_slices} slices{stopped}"
    )


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
