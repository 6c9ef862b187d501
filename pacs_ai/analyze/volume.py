"""DICOM series to a 3D volume with checked geometry.

:func:`load_series` turns the files of one single-frame series into a
:class:`Volume`.  Analyzers assume a regular voxel grid, so the loader refuses
(:class:`~pacs_ai.analyze.base.AnalysisRefused`) anything that is not one:
mixed series, orientations or matrix sizes, missing geometry, duplicate
positions, gantry tilt or sheared stacks, non-uniform slice spacing and
non-greyscale images.  Nothing is resampled: silently resampling a tilted or
irregular acquisition would change the measured volumes without anyone
noticing, so a refusal with the measured values is the honest outcome.

The geometry is worked out by :func:`slice_geometry` (pure, headers in,
numbers out) and judged by :func:`check_geometry`, so both are unit-testable
without pixel data.

Reading: each file is parsed once.  Its header is read with pydicom's
``defer_size``, so that an uncompressed Pixel Data value stays on disk until its
slice goes into the voxel array; :func:`native_pixels` then reads just that
value into one buffer reused for every slice and takes its bytes as they are
(``np.frombuffer``).  Before, the headers were parsed without Pixel Data and
every file was parsed a second time by pydicom's pixel decoder, which cost more
than the first parse.  Compressed (encapsulated) Pixel Data has no length up
front, so pydicom reads it with the header, and pydicom's decoders (pylibjpeg,
openjpeg, rle plugins) decode it from memory.

Memory: the voxel array is preallocated once the geometry is checked (in memory
the worker process keeps from one volume to the next,
:mod:`pacs_ai.analyze.volume_memory`) and filled one file at a time;
each slice's Pixel Data is dropped from its header as soon as it is in the
volume, so the peak is about one volume plus one slice for uncompressed series,
and one volume plus the series' compressed Pixel Data for compressed ones.  The
headers kept in the :class:`Volume` are what ``stop_before_pixels`` would give
and need no file afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_ai.analyze.base import AnalysisRefused
from pacs_ai.analyze.volume_memory import empty_volume

#: Fewer slices than this cannot be a volume worth measuring (and spacing needs 2 steps to be checked).
MIN_SLICES = 3
#: Image Orientation (Patient) values of all slices must agree to this (cosines are unitless).
ORIENTATION_TOLERANCE = 1e-4
#: Two slices closer than this along the normal (mm) are duplicates.
DUPLICATE_POSITION_MM = 1e-3
#: Values longer than this (bytes) are left on disk when a header is read and read when first used
#: (pydicom's ``defer_size``).  In practice that is the Pixel Data of any image of 64x64 or more, which
#: is then read once, when it goes into the volume.
DEFER_SIZE_BYTES = 8 * 1024
#: Tag of Pixel Data; nothing from it on is kept in a loaded volume's headers (as ``stop_before_pixels``).
_PIXEL_DATA_TAG = 0x7FE00010
#: Uncompressed little-endian transfer syntaxes whose Pixel Data :func:`native_pixels` reads directly.
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_INT16 = np.iinfo(np.int16)
#: Most a compressed slice may decode to, as a multiple of its file's size (lossless CT is about
#: 2-3x, lossy JPEG about 10-50x, a blank RLE image at most 64x); beyond it, the header's Rows
#: and Columns are not believed.
MAX_EXPANSION = 256


class VoxelLimit:
    """The most voxels one volume may have in this process (``maximum_volume_voxels``).

    A worker process sets it once from its settings (:meth:`set`); the check
    is made against the bytes actually received, before anything is allocated.
    """

    voxels: int = 2**30

    @classmethod
    def set(cls, voxels: int) -> None:
        cls.voxels = voxels


@dataclass
class Volume:
    """A series as a voxel array plus the geometry and headers it came from.

    ``voxels[k]`` is the k-th slice in ascending order along the slice normal
    (row cosine x column cosine), already rescaled to modality units (HU for CT).
    ``headers[k]`` is the source dataset of ``voxels[k]``, read without pixel
    data, so encoders can reference the exact source instances.
    """

    voxels: np.ndarray
    #: (slice, row, column) spacing in mm; slice spacing is the distance between
    #: consecutive slice positions along the normal (not SliceThickness).
    spacing_mm: tuple[float, float, float]
    #: ImagePositionPatient of the first slice (mm, LPS).
    origin_mm: tuple[float, float, float]
    #: 3x3 matrix whose rows are the row cosine, column cosine and slice normal (LPS).
    direction: np.ndarray
    headers: list[Dataset]
    paths: list[Path]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0

    def patient_position(self, index: tuple[float, float, float]) -> np.ndarray:
        """Patient (LPS, mm) coordinates of a (slice, row, column) index; fractional indices allowed.

        Analyzers use this for anatomical decisions (e.g. which lung is the
        left one) so that they never depend on how the array happens to be laid out.
        """
        k, r, c = index
        dz, dy, dx = self.spacing_mm
        offset = c * dx * self.direction[0] + r * dy * self.direction[1] + k * dz * self.direction[2]
        return np.asarray(self.origin_mm, dtype=np.float64) + offset


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of a series are, as measured from their headers.

    ``order[k]`` is the index (into the headers given to :func:`slice_geometry`)
    of the k-th slice in ascending order along ``normal``.
    """

    order: list[int]
    #: Mean distance between consecutive slices along the normal (mm).
    spacing_mm: float
    min_spacing_mm: float
    max_spacing_mm: float
    #: Angle between the first-to-last slice displacement and the normal (degrees); 0 for a regular stack.
    tilt_deg: float
    #: Largest in-plane distance (mm) of a slice origin from the line through the first one along the normal.
    max_inplane_shift_mm: float
    #: Rows: row cosine, column cosine, normal.
    direction: np.ndarray
    #: (row spacing, column spacing) in mm, i.e. PixelSpacing.
    pixel_spacing_mm: tuple[float, float]
    #: ImagePositionPatient of the first slice in ``order``.
    origin_mm: tuple[float, float, float]

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row cosine x column cosine)."""
        return self.direction[2]

    @property
    def max_spacing_deviation(self) -> float:
        """Largest relative deviation of a slice step from the mean spacing."""
        spread = max(self.max_spacing_mm - self.spacing_mm, self.spacing_mm - self.min_spacing_mm)
        return spread / self.spacing_mm


def _describe(paths: Sequence[Path] | None, indices: Sequence[int], limit: int = 3) -> str:
    """Name a few offending files (or header indices) so the reason is actionable."""
    names = [paths[i].name if paths is not None else f"#{i}" for i in indices[:limit]]
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return ", ".join(names) + more


def _float_vector(header: Dataset, keyword: str, length: int) -> np.ndarray | None:
    value = header.get(keyword)
    if value is None:
        return None
    try:
        vector = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def slice_geometry(headers: Sequence[Dataset], paths: Sequence[Path] | None = None) -> SliceGeometry:
    """Measure the slice stack of single-frame headers: order, spacing, tilt/shear.

    Slices are sorted by the projection of ImagePositionPatient on the normal
    (row cosine x column cosine); spacing comes from those projections, never
    from SliceThickness (which describes the reconstruction, not the positions,
    and is wrong for overlapping or gapped reconstructions).

    Raises :class:`AnalysisRefused` only when no geometry can be derived:
    missing or malformed IPP/IOP/PixelSpacing, differing orientations or pixel
    spacings, non-orthonormal cosines, duplicate positions, fewer than
    :data:`MIN_SLICES` slices.  Whether tilt and spacing are acceptable is
    :func:`check_geometry`'s job.  ``paths`` (same order as ``headers``) only
    improves the messages.
    """
    if len(headers) < MIN_SLICES:
        raise AnalysisRefused(
            f"only {len(headers)} slice(s) in the series; at least {MIN_SLICES} are needed to form a volume"
        )
    positions, orientations, spacings = [], [], []
    keywords = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    missing: dict[str, list[int]] = {keyword: [] for keyword in keywords}
    for index, header in enumerate(headers):
        position = _float_vector(header, "ImagePositionPatient", 3)
        orientation = _float_vector(header, "ImageOrientationPatient", 6)
        spacing = _float_vector(header, "PixelSpacing", 2)
        for keyword, value in (
            ("ImagePositionPatient", position),
            ("ImageOrientationPatient", orientation),
            ("PixelSpacing", spacing),
        ):
            if value is None:
                missing[keyword].append(index)
        positions.append(position)
        orientations.append(orientation)
        spacings.append(spacing)
    problems = [
        f"{keyword} missing or malformed in {len(idx)} of {len(headers)} files ({_describe(paths, idx)})"
        for keyword, idx in missing.items()
        if idx
    ]
    if problems:
        raise AnalysisRefused("; ".join(problems) + "; slice geometry cannot be established")

    iop = np.array(orientations)
    differing = [i for i in range(len(headers)) if np.max(np.abs(iop[i] - iop[0])) > ORIENTATION_TOLERANCE]
    if differing:
        raise AnalysisRefused(
            f"ImageOrientationPatient differs between slices ({_describe(paths, differing)} differ from the "
            f"first file's {iop[0].round(4).tolist()}); a series with several orientations is not one volume"
        )
    pixel = np.array(spacings)
    differing = [i for i in range(len(headers)) if np.max(np.abs(pixel[i] - pixel[0])) > 1e-4]
    if differing:
        raise AnalysisRefused(
            f"PixelSpacing differs between slices ({_describe(paths, differing)} differ from "
            f"{pixel[0].tolist()} mm); the slices do not share one grid"
        )
    if np.any(pixel[0] <= 0):
        raise AnalysisRefused(f"PixelSpacing {pixel[0].tolist()} is not positive")

    row_cosine, column_cosine = iop[0, :3], iop[0, 3:]
    lengths = (np.linalg.norm(row_cosine), np.linalg.norm(column_cosine))
    dot = float(np.dot(row_cosine, column_cosine))
    if abs(lengths[0] - 1) > 1e-3 or abs(lengths[1] - 1) > 1e-3 or abs(dot) > 1e-3:
        raise AnalysisRefused(
            f"ImageOrientationPatient {iop[0].round(5).tolist()} is not two orthonormal cosines "
            f"(lengths {lengths[0]:.4f}, {lengths[1]:.4f}; dot product {dot:.4f})"
        )
    # Renormalise so that rounding in the header does not leak into positions.
    row_cosine = row_cosine / lengths[0]
    column_cosine = column_cosine / lengths[1]
    normal = np.cross(row_cosine, column_cosine)
    normal /= np.linalg.norm(normal)

    ipp = np.array(positions)
    along = ipp @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    sorted_along = along[order]
    steps = np.diff(sorted_along)
    duplicates = [i for i, step in enumerate(steps) if step < DUPLICATE_POSITION_MM]
    if duplicates:
        first = duplicates[0]
        pair = [order[first], order[first + 1]]
        raise AnalysisRefused(
            f"{len(duplicates)} duplicate slice position(s) along the normal (e.g. {_describe(paths, pair)} "
            f"both at {sorted_along[first]:.3f} mm); the series holds overlapping stacks or repeated images"
        )

    sorted_ipp = ipp[order]
    displacement = sorted_ipp[-1] - sorted_ipp[0]
    along_total = float(np.dot(displacement, normal))
    offsets = sorted_ipp - sorted_ipp[0]
    inplane = offsets - np.outer(offsets @ normal, normal)
    inplane_total = float(np.linalg.norm(inplane[-1]))
    return SliceGeometry(
        order=order,
        spacing_mm=along_total / (len(order) - 1),
        min_spacing_mm=float(steps.min()),
        max_spacing_mm=float(steps.max()),
        tilt_deg=math.degrees(math.atan2(inplane_total, along_total)),
        max_inplane_shift_mm=float(np.linalg.norm(inplane, axis=1).max()),
        direction=np.array([row_cosine, column_cosine, normal]),
        pixel_spacing_mm=(float(pixel[0][0]), float(pixel[0][1])),
        origin_mm=(float(sorted_ipp[0][0]), float(sorted_ipp[0][1]), float(sorted_ipp[0][2])),
    )


def check_geometry(
    geometry: SliceGeometry,
    *,
    max_spacing_deviation: float = 0.01,
    max_tilt_deg: float = 0.5,
    max_shift_pixels: float = 0.5,
) -> None:
    """Refuse stacks that are not a regular grid: gantry tilt, shear, uneven spacing.

    * Tilt/shear: slice origins must move along the normal.  The stack is
      refused when the first-to-last displacement is more than ``max_tilt_deg``
      off the normal, or when any slice origin is more than ``max_shift_pixels``
      pixels (in-plane) off the line along the normal, which also catches
      irregular shifts that a first-to-last angle would average out.
    * Spacing: every step between consecutive slices must be within
      ``max_spacing_deviation`` (relative) of the mean spacing.
    """
    pixel = min(geometry.pixel_spacing_mm)
    if geometry.tilt_deg > max_tilt_deg or geometry.max_inplane_shift_mm > max_shift_pixels * pixel:
        raise AnalysisRefused(
            f"gantry tilt of {geometry.tilt_deg:.1f} degrees detected (slice positions drift "
            f"{geometry.max_inplane_shift_mm:.1f} mm in-plane across the stack instead of moving along the "
            f"slice normal; limits {max_tilt_deg} degrees and {max_shift_pixels} pixel); tilted or sheared "
            "acquisitions are not resampled"
        )
    if geometry.max_spacing_deviation > max_spacing_deviation:
        raise AnalysisRefused(
            f"non-uniform slice spacing: steps between {geometry.min_spacing_mm:.3f} and "
            f"{geometry.max_spacing_mm:.3f} mm (mean {geometry.spacing_mm:.3f} mm, deviation "
            f"{geometry.max_spacing_deviation:.1%} > {max_spacing_deviation:.1%}); missing slices or mixed "
            "reconstructions are not resampled"
        )


def _check_received_pixels(
    headers: Sequence[Dataset], paths: Sequence[Path], rows: int, columns: int
) -> None:
    """Refuse a volume too large to allocate, or whose files hold other amounts of pixels than declared.

    Rows and Columns come from the sender: 24 small files declaring 4096x4096
    would otherwise have the worker allocate 800 MB.  Uncompressed Pixel Data
    must be exactly what Rows x Columns x Bits Allocated declare (a longer
    value is not silently cut, a shorter one not padded); compressed Pixel Data
    may decode to at most :data:`MAX_EXPANSION` times its file's size.
    """
    voxels = len(headers) * rows * columns
    if voxels > VoxelLimit.voxels:
        raise AnalysisRefused(
            f"{len(headers)} slices of {rows}x{columns} are {voxels} voxels, more than "
            f"maximum_volume_voxels={VoxelLimit.voxels}"
        )
    for header, path in zip(headers, paths, strict=True):
        element = header.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
        if element is None:
            raise AnalysisRefused(f"{path.name} has no Pixel Data")
        length = element.length if isinstance(element, RawDataElement) else len(element.value or b"")
        allocated = int(header.get("BitsAllocated") or 0)
        syntax = getattr(getattr(header, "file_meta", None), "get", lambda _: None)("TransferSyntaxUID")
        if syntax in _NATIVE_LITTLE_ENDIAN and allocated in (8, 16, 32):
            needed = rows * columns * allocated // 8
            if length not in (needed, needed + 1):  # an odd length is padded to even
                raise AnalysisRefused(
                    f"pixel data of {path.name} is {length} bytes; its Rows, Columns and Bits Allocated "
                    f"declare {needed}"
                )
        elif rows * columns * max(allocated, 8) // 8 > MAX_EXPANSION * path.stat().st_size:
            raise AnalysisRefused(
                f"{path.name} ({path.stat().st_size} bytes) declares {rows}x{columns} pixels, more than "
                f"{MAX_EXPANSION} times its size; its header is not believed"
            )


def _check_series(headers: Sequence[Dataset], paths: Sequence[Path]) -> tuple[int, int]:
    """Refuse all but one single-frame greyscale series of one matrix size; return (rows, columns)."""
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if "" in series:
        missing = [i for i, h in enumerate(headers) if not h.get("SeriesInstanceUID")]
        raise AnalysisRefused(f"SeriesInstanceUID missing in {_describe(paths, missing)}")
    if len(series) > 1:
        raise AnalysisRefused(
            f"the files belong to {len(series)} series ({sorted(series)[:3]}); load one series at a time"
        )
    sop_uids = [str(h.get("SOPInstanceUID", "")) for h in headers]
    repeated = len(sop_uids) - len(set(sop_uids))
    if repeated:
        raise AnalysisRefused(
            f"{repeated} SOPInstanceUID(s) occur more than once; the same instance was given twice"
        )
    for index, header in enumerate(headers):
        check_greyscale_image(header, paths[index].name, "only single-frame greyscale series are loaded")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise AnalysisRefused(
            f"slices have different matrix sizes {sorted(sizes)}; they do not form one volume"
        )
    return sizes.pop()


def check_greyscale_image(header: Dataset, name: str, accepted: str) -> tuple[int, int]:
    """(Rows, Columns) of a single-frame greyscale image; :class:`AnalysisRefused` otherwise.

    ``name`` names the file and ``accepted`` ends each refusal, saying what the
    caller takes (e.g. "only single-frame greyscale series are loaded").
    """
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise AnalysisRefused(f"{name} is a multi-frame image ({frames} frames); {accepted}")
    samples = header.get("SamplesPerPixel")
    photometric = str(header.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise AnalysisRefused(
            f"{name} is not a greyscale image (SamplesPerPixel {samples}, PhotometricInterpretation "
            f"{photometric or 'missing'}, not MONOCHROME1/2 with one sample per pixel); {accepted}"
        )
    if header.get("Rows") is None or header.get("Columns") is None:
        raise AnalysisRefused(f"{name} has no Rows/Columns; it holds no image")
    return int(header.Rows), int(header.Columns)


def _read_header(path: Path) -> Dataset:
    """The dataset of ``path`` with large values (the Pixel Data) deferred: read when first used."""
    try:
        return pydicom.dcmread(path, defer_size=DEFER_SIZE_BYTES)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise AnalysisRefused(f"{path} cannot be read as DICOM: {exc}") from exc


def _detach_header(header: Dataset) -> None:
    """Make ``header`` what ``stop_before_pixels`` would have read, independent of its file.

    Pixel Data and whatever follows it (trailing padding, signatures) are deleted; any other value
    that :func:`_read_header` deferred (large private or overlay data, rare) is read now, so that the
    headers of a :class:`Volume` never reach back to files that may have been deleted since.
    """
    del header[_PIXEL_DATA_TAG:]
    for tag in list(header.keys()):
        element: DataElement | RawDataElement = header.get_item(tag, keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is None and element.length:  # deferred
            header[tag]  # noqa: B018 - indexing reads the deferred value and keeps it in the dataset


def _rescale_is_integral(header: Dataset) -> bool:
    if "ModalityLUTSequence" in header:
        return False
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    return slope.is_integer() and intercept.is_integer()


def _modality_values(stored: np.ndarray, header: Dataset) -> np.ndarray:
    """Stored values to modality units (HU for CT), without float64 copies when the rescale is integral."""
    if "ModalityLUTSequence" in header:
        return np.asarray(apply_modality_lut(stored, header), dtype=np.float32)
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    if slope.is_integer() and intercept.is_integer():
        values = stored.astype(np.int32)
        if slope != 1:
            values *= int(slope)
        if intercept != 0:
            values += int(intercept)
        return values
    scaled = stored.astype(np.float32)
    scaled *= np.float32(slope)
    scaled += np.float32(intercept)
    return scaled


def decode_pixels(path: Path) -> np.ndarray:
    """Stored pixel values of one file (not rescaled), decoding any supported transfer syntax.

    Compressed syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) go through pydicom's
    pixel backends and the installed pylibjpeg/openjpeg/rle plugins; a file that
    cannot be decoded raises :class:`AnalysisRefused` naming its transfer syntax.

    pydicom's file-level :func:`~pydicom.pixels.pixel_array` reads only what it
    needs to decode, about three times faster than parsing the whole dataset
    again; files it cannot handle that way (e.g. no File Meta Information) are
    decoded through a full :func:`~pydicom.dcmread` instead.
    """
    try:
        return pixel_array(path)
    except Exception:  # noqa: BLE001 - retried below through the full reader, which reports the cause
        pass
    try:
        return pydicom.dcmread(path).pixel_array
    except Exception as exc:  # decoder plugins raise a variety of types; all mean "cannot decode"
        syntax = "unknown"
        with contextlib.suppress(Exception):  # only used to improve the message
            syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name)
        raise AnalysisRefused(
            f"pixel data of {path.name} (transfer syntax {syntax}) cannot be decoded: {exc}"
        ) from exc


def native_pixels(header: Dataset, into: bytearray | None = None) -> np.ndarray | None:
    """Stored values of uncompressed little-endian Pixel Data as an array, or None for other data.

    The bytes of such Pixel Data are the pixels, so they are taken as they are
    (``np.frombuffer``); when Bits Stored is less than Bits Allocated, the
    unused high bits are cleared, sign-extending signed values, exactly as
    pydicom's own native decoder does.  None means "not this simple case"
    (compressed, big-endian, 1-bit, multi-sample, short or missing Pixel Data)
    and the caller lets pydicom decode it.

    ``into``: a buffer for a Pixel Data value that the header read left on disk
    (``defer_size``).  The value is then read straight into it and the array
    returned is a view of it, valid until the buffer is used again.  Reusing
    one buffer for every slice of a series spares a fresh allocation per slice,
    whose memory the kernel would have to map page by page.
    """
    file_meta = getattr(header, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    allocated = header.get("BitsAllocated")
    representation = header.get("PixelRepresentation")
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or allocated not in (8, 16, 32)
        or representation not in (0, 1)
        or header.get("SamplesPerPixel", 1) != 1
        or int(header.get("NumberOfFrames", 1) or 1) != 1
        or "PixelData" not in header
    ):
        return None
    rows, columns = int(header.Rows), int(header.Columns)
    dtype = np.dtype(f"<{'i' if representation else 'u'}{allocated // 8}")
    needed = rows * columns * dtype.itemsize
    data = _read_deferred_value(header, _PIXEL_DATA_TAG, into, needed) if into is not None else None
    if data is None:
        data = header.PixelData  # a deferred value is read from the file here
    if len(data) < needed:
        return None  # pydicom's decoder reports the truncation
    pixels = np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
    stored = _bits_stored(header, allocated)
    if stored < allocated:
        shift = allocated - stored
        if data is into:  # our own buffer: cleared in place
            np.left_shift(pixels, shift, out=pixels)
        else:
            pixels = np.left_shift(pixels, shift)  # a writable copy; the right shift then works in place
        np.right_shift(pixels, shift, out=pixels)
    return pixels


def _read_deferred_value(header: Dataset, tag: int, into: bytearray, needed: int) -> bytearray | None:
    """Read the first ``needed`` bytes of a value still on disk into ``into``; None if not deferred.

    None also when the value is in memory already, when ``into`` is too small or
    when the file holds fewer bytes than ``needed``: the caller then reads it
    through pydicom, which reports a truncation with its reason.
    """
    element = header.get_item(tag, keep_deferred=True)
    filename = getattr(header, "filename", None)
    if (
        not isinstance(element, RawDataElement)
        or element.value is not None
        or not isinstance(filename, str)
        or element.length < needed
        or len(into) < needed
    ):
        return None
    view = memoryview(into)[:needed]
    with open(filename, "rb", buffering=0) as file:
        read = os.preadv(file.fileno(), [view], element.value_tell)
    return into if read == needed else None


def _native_slice(header: Dataset, path: Path, into: bytearray) -> np.ndarray | None:
    """:func:`native_pixels` of one slice read into ``into``, with a read error as a refusal."""
    try:
        return native_pixels(header, into=into)
    except OSError as exc:
        raise AnalysisRefused(f"pixel data of {path.name} cannot be read: {exc}") from exc


def _decode_header_pixels(header: Dataset, path: Path) -> np.ndarray:
    """Stored values of the slice whose header (with its Pixel Data deferred or in memory) is ``header``."""
    try:
        native = native_pixels(header)
        return native if native is not None else header.pixel_array
    except Exception as exc:  # decoder plugins raise a variety of types; all mean "cannot decode"
        file_meta = getattr(header, "file_meta", None)
        syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        name = syntax.name if syntax is not None else "unknown"
        raise AnalysisRefused(
            f"pixel data of {path.name} (transfer syntax {name}) cannot be decoded: {exc}"
        ) from exc


def _bits_stored(header: Dataset, allocated: int) -> int:
    """Bits Stored as the pixels are read: Bits Allocated when it is missing or out of range."""
    stored = int(header.get("BitsStored") or allocated)
    return stored if 0 < stored <= allocated else allocated


def _stored_bounds(header: Dataset) -> tuple[int, int]:
    """The lowest and highest stored value that Bits Stored and Pixel Representation allow."""
    bits = _bits_stored(header, int(header.BitsAllocated))
    if header.get("PixelRepresentation") == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _store_slice(
    voxels: np.ndarray,
    k: int,
    stored: np.ndarray,
    header: Dataset,
    bounds: tuple[int, int] | None = None,
) -> np.ndarray:
    """Write slice ``k`` in modality units into ``voxels``; return ``voxels``, widened if it had to be.

    The common CT case (int16 volume, slope 1, integral intercept, stored
    values of at most 16 bits) is written straight into the volume: NumPy adds
    in int32 and casts to int16 block by block, so no rescaled copy of the
    slice is made (allocating one per slice cost more than the addition).
    Whether the result fits int16 is judged on ``bounds``, the range the stored
    values are known to lie in (:func:`native_pixels` clears the bits above
    Bits Stored), or else on the slice's extreme values.  Everything else goes
    through :func:`_modality_values`.
    """
    if voxels.dtype == np.int16 and "ModalityLUTSequence" not in header:
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
        if slope == 1 and intercept.is_integer() and stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
            low, high = bounds if bounds is not None else (int(stored.min()), int(stored.max()))
            if _INT16.min <= low + int(intercept) and high + int(intercept) <= _INT16.max:
                np.add(stored, np.int32(intercept), out=voxels[k], casting="unsafe")
                return voxels
    values = _modality_values(stored, header)
    if voxels.dtype == np.int16 and (values.min() < _INT16.min or values.max() > _INT16.max):
        # Rare (16-bit stored values with a large intercept): widen once, briefly ~1.5x the final volume.
        voxels = voxels.astype(np.float32)
    voxels[k] = values
    return voxels


def load_series(
    paths: Sequence[Path],
    *,
    max_spacing_deviation: float = 0.01,
    max_tilt_deg: float = 0.5,
    max_shift_pixels: float = 0.5,
) -> Volume:
    """Load the files of one single-frame series into a :class:`Volume` sorted along the slice normal.

    Voxels are rescaled to modality units (RescaleSlope/Intercept or a Modality
    LUT) and stored as int16 when every value is integral and fits, which is the
    usual case for CT and halves memory; otherwise float32.  Compressed
    transfer syntaxes are decoded by pydicom's pixel backends (pylibjpeg,
    openjpeg, rle plugins).

    Raises :class:`AnalysisRefused` (with the measured values in the message)
    when the files are not one regular greyscale volume; see
    :func:`slice_geometry`, :func:`check_geometry` and the module docstring.
    The tolerances are passed to :func:`check_geometry`.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise AnalysisRefused("no files given; a series needs at least 3 slices")
    headers = [_read_header(path) for path in paths]
    rows, columns = _check_series(headers, paths)
    geometry = slice_geometry(headers, paths)
    check_geometry(
        geometry,
        max_spacing_deviation=max_spacing_deviation,
        max_tilt_deg=max_tilt_deg,
        max_shift_pixels=max_shift_pixels,
    )

    headers = [headers[i] for i in geometry.order]
    paths = [paths[i] for i in geometry.order]
    _check_received_pixels(headers, paths, rows, columns)
    integral = all(_rescale_is_integral(h) for h in headers)
    voxels = empty_volume((len(paths), rows, columns), np.int16 if integral else np.float32)
    slice_buffer = bytearray(rows * columns * 4)  # the widest native sample: 32 bits
    for k, (path, header) in enumerate(zip(paths, headers, strict=True)):
        native = _native_slice(header, path, slice_buffer)
        stored = native if native is not None else _decode_header_pixels(header, path)
        if stored.shape != (rows, columns):
            raise AnalysisRefused(
                f"{path.name} decodes to shape {stored.shape}, not the {rows}x{columns} its header declares"
            )
        voxels = _store_slice(
            voxels, k, stored, header, _stored_bounds(header) if native is not None else None
        )
        _detach_header(header)
    dy, dx = geometry.pixel_spacing_mm
    return Volume(
        voxels=voxels,
        spacing_mm=(geometry.spacing_mm, dy, dx),
        origin_mm=geometry.origin_mm,
        direction=geometry.direction,
        headers=headers,
        paths=paths,
    )
