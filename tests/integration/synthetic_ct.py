"""A small, valid synthetic chest CT series and a lung-like analysis result.

Used by the encoder tests and ``benchmarks/encode_profile.py``.  The series
carries every attribute the CT Image IOD requires, so dciodvfy findings on the
SEG/SR built from it are the encoders' own.  The :class:`Volume` is built
directly from the headers (read back without Pixel Data, as ``load_series``
delivers them) so these tests do not depend on the loader.

Importable from benchmarks (``tests.integration.synthetic_ct``), so no pytest
at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid

from pacs_ai.analyze.base import AlgorithmInfo, AnalysisResult, Code, MeasurementSpec, SegmentSpec
from pacs_ai.analyze.volume import Volume
from pacs_ai.synthetic.phantom import ct_slice_dataset

ROW_COSINE = (1.0, 0.0, 0.0)
COLUMN_COSINE = (0.0, 1.0, 0.0)

SCT_LUNG = Code("39607008", "SCT", "Lung")
SCT_RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
SCT_LEFT_LUNG = Code("44029006", "SCT", "Left lung")
SCT_ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
SCT_VOLUME = Code("118565006", "SCT", "Volume")
SCT_MEAN = Code("373098007", "SCT", "Mean")
DCM_ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
LOCAL_LAA950 = Code("LAA950", "99PACSAI", "Low attenuation area below -950 HU")
LOCAL_PERC15 = Code("PERC15", "99PACSAI", "15th percentile of attenuation")
UCUM_ML = Code("mL", "UCUM", "milliliter")
UCUM_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UCUM_PERCENT = Code("%", "UCUM", "Percent")


def make_ct_series(
    n_slices: int = 12,
    rows: int = 64,
    columns: int = 64,
    *,
    pixel_spacing_mm: float = 0.7,
    slice_spacing_mm: float = 2.5,
    study_uid: str | None = None,
    series_uid: str | None = None,
    with_pixels: bool = True,
) -> list[Dataset]:
    """Return ``n_slices`` single-frame CT datasets of one series (air + body of water).

    Instances are returned in *descending* z order, as a scanner might send
    them, so callers must sort like ``load_series`` does.
    """
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = generate_uid()
    yy, xx = np.mgrid[0:rows, 0:columns]
    body = ((yy - rows / 2) / (rows * 0.45)) ** 2 + ((xx - columns / 2) / (columns * 0.48)) ** 2 < 1
    stored = np.where(body, 1024, 24).astype(np.uint16)  # HU 0 inside, -1000 outside

    datasets = []
    for index in range(n_slices):
        ds = ct_slice_dataset(
            index=index,
            z_mm=-(index * slice_spacing_mm),  # descending z: instance 1 is the top slice
            stored=stored,
            origin_xy=-(columns * pixel_spacing_mm) / 2,
            pixel_spacing_mm=pixel_spacing_mm,
            slice_spacing_mm=slice_spacing_mm,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_of_reference_uid,
            patient_id="PAT0001",
            patient_name="Test^Patient",
            accession_number="ACC0001",
        )
        if not with_pixels:
            del ds.PixelData
        datasets.append(ds)
    return datasets


def write_series(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Write the datasets as Part 10 files named by instance number."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"CT{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def volume_from_headers(headers: Sequence[Dataset], paths: Sequence[Path] | None = None) -> Volume:
    """Build a :class:`Volume` (ascending along the normal) from header-only datasets.

    Voxels are synthetic (not read from Pixel Data), because encoders never
    look at them; only geometry and headers matter.
    """
    normal = np.cross(ROW_COSINE, COLUMN_COSINE)
    order = sorted(range(len(headers)), key=lambda i: float(np.dot(headers[i].ImagePositionPatient, normal)))
    headers = [headers[i] for i in order]
    paths = [paths[i] for i in order] if paths is not None else [Path(f"mem{i}") for i in order]
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    slice_spacing = float(np.dot(positions[1] - positions[0], normal)) if len(headers) > 1 else 1.0
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    return Volume(
        voxels=np.zeros((len(headers), rows, columns), dtype=np.int16),
        spacing_mm=(slice_spacing, row_spacing, column_spacing),
        origin_mm=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=np.array([ROW_COSINE, COLUMN_COSINE, normal]),
        headers=headers,
        paths=paths,
    )


def load_volume(paths: list[Path]) -> Volume:
    """Read the files back without Pixel Data, as ``load_series`` does, and build the volume."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return volume_from_headers(headers, paths)


def lung_labels(shape: tuple[int, int, int], *, fill: float = 0.8) -> np.ndarray:
    """Two ellipsoids: label 1 in the image-left half (patient right), 2 in the other half.

    The first and last slices stay empty so that omitted empty frames are exercised.
    """
    slices, rows, columns = shape
    yy, xx = np.ogrid[0:rows, 0:columns]
    y_term = ((yy - rows / 2) / (rows * 0.35 * fill)) ** 2
    labels = np.zeros(shape, dtype=np.uint8)
    # Slice by slice: a broadcast over the whole volume would need a float64
    # temporary of 8 bytes per voxel (630 MB at 300x512x512).
    for k in range(slices):
        z_term = ((k - (slices - 1) / 2) / max((slices - 2) / 2, 1)) ** 2
        for label, centre in ((1, columns * 0.28), (2, columns * 0.72)):
            x_term = ((xx - centre) / (columns * 0.2 * fill)) ** 2
            labels[k][(z_term + y_term + x_term) < 1] = label
    labels[0] = 0
    labels[-1] = 0
    return labels


def lung_result(volume: Volume, labels: np.ndarray) -> AnalysisResult:
    """An :class:`AnalysisResult` shaped like the lung analyzer's output."""
    segments = [
        SegmentSpec(1, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG, (41000, 45000, 50000)),
        SegmentSpec(2, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, (41000, 30000, 30000)),
    ]
    measurements: list[MeasurementSpec] = []
    total_voxels = 0
    for spec, site in ((segments[0], SCT_RIGHT_LUNG), (segments[1], SCT_LEFT_LUNG)):
        voxels = int((labels == spec.number).sum())
        total_voxels += voxels
        measurements += [
            MeasurementSpec(
                SCT_VOLUME, round(voxels * volume.voxel_volume_ml, 3), UCUM_ML, spec.number, site
            ),
            MeasurementSpec(DCM_ATTENUATION, -862.5, UCUM_HU, spec.number, site, derivation=SCT_MEAN),
            MeasurementSpec(LOCAL_LAA950, 7.25, UCUM_PERCENT, spec.number, site),
            MeasurementSpec(LOCAL_PERC15, -921.0, UCUM_HU, spec.number, site),
        ]
    measurements += [
        MeasurementSpec(SCT_VOLUME, round(total_voxels * volume.voxel_volume_ml, 3), UCUM_ML, None, SCT_LUNG),
        MeasurementSpec(DCM_ATTENUATION, -860.0, UCUM_HU, None, SCT_LUNG, derivation=SCT_MEAN),
        MeasurementSpec(LOCAL_LAA950, 7.5, UCUM_PERCENT, None, SCT_LUNG),
    ]
    algorithm = AlgorithmInfo(
        name="pacs-ai-lung",
        version="1.0.0",
        family=Code("123110", "DCM", "Artificial Intelligence"),
        parameters={"threshold_hu": "-950", "percentile": "15"},
    )
    return AnalysisResult(algorithm=algorithm, labels=labels, segments=segments, measurements=measurements)
