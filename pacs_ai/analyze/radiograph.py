"""One projection radiograph (CR, DX, greyscale Secondary Capture) as a display-ready image.

Classification models for chest radiographs are trained on images as a reader
sees them: the modality rescale applied, then the VOI transform (a VOI LUT or
the first Window Center/Width) or, where the file has none, the full range of
values, with bone bright.  :func:`load_radiograph` produces exactly that,
scaled to [0, 1], as a one-slice :class:`~pacs_ai.analyze.volume.Volume`
(shape ``(1, rows, columns)``) so that the rest of the pipeline (encoders,
job runner) handles radiographs and CT volumes alike.

Input that is not one greyscale single-frame projection image is refused
(:class:`~pacs_ai.analyze.base.AnalysisRefused`) with the reason: several
files, multi-frame objects, colour images, cross-sectional SOP classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from pacs_ai.analyze.base import AnalysisRefused
from pacs_ai.analyze.volume import Volume, check_greyscale_image, decode_pixels

__all__ = ["RADIOGRAPH_SOP_CLASSES", "display_values", "load_radiograph", "radiograph_spacing"]

log = logging.getLogger(__name__)

#: SOP Classes accepted as a projection radiograph, with the names used in messages.
RADIOGRAPH_SOP_CLASSES: dict[str, str] = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX for presentation",
    DigitalXRayImageStorageForProcessing: "DX for processing",
    SecondaryCaptureImageStorage: "Secondary Capture",
}

#: Bits of the unsigned output range windowing is computed in before scaling to [0, 1].
_WINDOW_OUTPUT_BITS = 16


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise AnalysisRefused(f"{path} cannot be read as DICOM: {exc}") from exc


def _check_header(header: Dataset, name: str) -> tuple[int, int]:
    """Refuse what is not one greyscale single-frame projection image; return (rows, columns)."""
    sop_class = str(header.get("SOPClassUID", ""))
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        described = pydicom.uid.UID(sop_class).name if sop_class else "missing"
        raise AnalysisRefused(
            f"{name} has SOP Class {described}; a radiograph must be one of "
            f"{', '.join(RADIOGRAPH_SOP_CLASSES.values())}"
        )
    return check_greyscale_image(header, name, "a radiograph is one single-frame greyscale image")


def radiograph_spacing(header: Dataset) -> tuple[tuple[float, float], str | None]:
    """(row, column) spacing in mm and a note when it is not the patient-plane Pixel Spacing.

    Pixel Spacing (patient plane) is preferred; Imager Pixel Spacing (detector
    plane, larger than the anatomy by the geometric magnification) comes next;
    without either, 1.0 is used and the note says so, because measurements in
    mm would then be meaningless.
    """
    detector_note = "spacing from ImagerPixelSpacing (detector plane, magnification not corrected)"
    for keyword, note in (
        ("PixelSpacing", None),
        ("ImagerPixelSpacing", detector_note),
    ):
        value = header.get(keyword)
        try:
            spacing = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
        except (TypeError, ValueError):
            spacing = None
        if spacing is not None and spacing[0] > 0 and spacing[1] > 0 and all(np.isfinite(spacing)):
            return spacing, note
    return (1.0, 1.0), "no PixelSpacing or ImagerPixelSpacing; spacing taken as 1.0 (pixel units)"


def _window_only(header: Dataset) -> Dataset:
    """The first Window Center/Width of ``header`` on a known unsigned 16-bit output range.

    pydicom's windowing maps to a range derived from the stored bit depth and
    rescale; windowing modality values against this small dataset (no rescale,
    16 bits unsigned) gives an output range known here, so it scales to [0, 1].
    """
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored = _WINDOW_OUTPUT_BITS
    window.PixelRepresentation = 0
    centers, widths = header["WindowCenter"], header["WindowWidth"]
    window.WindowCenter = float(centers.value[0] if centers.VM > 1 else centers.value)
    window.WindowWidth = float(widths.value[0] if widths.VM > 1 else widths.value)
    if "VOILUTFunction" in header:
        window.VOILUTFunction = header.VOILUTFunction
    return window


def _lut_entries(item: Dataset) -> np.ndarray:
    """The entries of a LUT's LUT Data, which is US (a list of values) or OW (16-bit words as bytes)."""
    value = item.LUTData
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype="<u2").astype(np.float64)
    return np.asarray(value, dtype=np.float64).ravel()


def display_values(stored: np.ndarray, header: Dataset) -> np.ndarray:
    """Stored pixel values to display values in [0, 1] (float32), bone bright.

    Modality LUT / rescale first, then the VOI transform: the VOI LUT
    Sequence's first LUT if present (scaled by the range of its entries, which
    is what it maps to; some files declare a larger bit depth than their
    entries use), else the first Window Center/Width, else the minimum and
    maximum of the image.  MONOCHROME1 images (low values white) are inverted.
    """
    modality = np.asarray(apply_modality_lut(stored, header))
    values = modality.astype(np.float64)
    if header.get("VOILUTSequence"):
        lut = _lut_entries(header.VOILUTSequence[0])
        low, high = float(lut.min()), float(lut.max())
        # A LUT is indexed by integer input values; a rescale may have made them floats.
        indices = modality if modality.dtype.kind in "iu" else np.rint(modality).astype(np.int64)
        mapped = np.asarray(apply_voi(indices, header, index=0), dtype=np.float64)
        scaled = (mapped - low) / (high - low) if high > low else np.zeros_like(mapped)
    elif "WindowCenter" in header and "WindowWidth" in header:
        windowed = apply_windowing(values, _window_only(header))
        scaled = windowed / float(2**_WINDOW_OUTPUT_BITS - 1)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    display = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    if str(header.PhotometricInterpretation) == "MONOCHROME1":
        display = 1.0 - display
    return display


def load_radiograph(paths: Sequence[Path]) -> Volume:
    """Load one projection radiograph as a ``(1, rows, columns)`` float32 volume of display values.

    The voxels are :func:`display_values` of the decoded pixel data (any
    transfer syntax the installed pydicom plugins decode).  Spacing is
    ``(1.0, row, column)`` from :func:`radiograph_spacing`; origin zeros and
    direction identity, because a projection image has no patient-space
    geometry.  ``headers`` hold the dataset without Pixel Data, ``paths`` the file.

    Raises :class:`AnalysisRefused` for anything but one single-frame
    greyscale CR, DX or Secondary Capture image, and for pixel data that cannot be decoded.
    """
    paths = [Path(p) for p in paths]
    if len(paths) != 1:
        raise AnalysisRefused(
            f"{len(paths)} images given; a radiograph analyzer takes exactly one image per series "
            "(route series with several images to an analyzer for that kind of series)"
        )
    path = paths[0]
    header = _read_header(path)
    rows, columns = _check_header(header, path.name)
    stored = decode_pixels(path)
    if stored.shape != (rows, columns):
        raise AnalysisRefused(
            f"{path.name} decodes to shape {stored.shape}, not the {rows}x{columns} its header declares"
        )
    try:
        display = display_values(stored, header)
    except (ValueError, TypeError, KeyError) as exc:  # malformed LUT or window values
        raise AnalysisRefused(f"{path.name}: VOI/Modality LUT cannot be applied: {exc}") from exc
    (dy, dx), note = radiograph_spacing(header)
    if note:
        log.warning("%s: %s", path.name, note)
    return Volume(
        voxels=display[np.newaxis, :, :],
        spacing_mm=(1.0, dy, dx),
        origin_mm=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        headers=[header],
        paths=[path],
    )
