"""Key images for the study page: a source slice with the SEG overlay, rendered to PNG on the server.

For each segment of each SEG pacs-ai produced for a study, the key image is
the middle one of the source slices the segment appears on (middle along the
slice normal), windowed with the source's own Window Center/Width (or the 1st
to 99th percentile where it has none), with the segment filled at 35 %
opacity and outlined.  A job without a SEG (a classifier) gets the middle
image of its series without overlay.

Rendering reads only what one image needs: the SEG (small), the source
headers without pixel data to order the slices, and one source slice.  PNGs
are cached by result, segment and a rendering version, so a page is
rendered once.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.analyze.volume import decode_pixels, slice_geometry
from pacs_ai.index.models import Instance, Job, Result, Series
from pacs_ai.storage.base import StorageError
from pacs_ai.storage.files import HostFiles

__all__ = ["KeyImage", "key_images_of", "render_segment_image", "render_series_image"]

log = logging.getLogger(__name__)

#: Bump when the rendering changes, so cached PNGs are not reused.
_RENDER_VERSION = "1"
_OPACITY = 0.35
#: Overlay colours by segment number (RGB), distinct on a grey image.
_PALETTE = [(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (220, 96, 255), (0, 220, 220)]


@dataclass(frozen=True)
class KeyImage:
    """One key image of a study: a SEG segment (``result_id`` and ``segment_number``) or a series."""

    label: str
    result_id: int | None = None
    segment_number: int | None = None
    series_id: int | None = None

    @property
    def url(self) -> str:
        if self.result_id is not None:
            return f"/images/seg/{self.result_id}/{self.segment_number}.png"
        return f"/images/series/{self.series_id}.png"


def key_images_of(session: Session, jobs: list[Job]) -> list[KeyImage]:
    """The key images of a study's jobs: one per SEG segment, or one per series analysed without a SEG."""
    images: list[KeyImage] = []
    for job in jobs:
        segs = list(session.scalars(select(Result).where(Result.job_fk == job.id, Result.kind == "SEG")))
        # The SEG's segments as the job recorded them: listing them reads no file from the storage.
        segments = (job.findings or {}).get("segments", [])
        for seg_result in segs:
            for segment in segments:
                images.append(
                    KeyImage(
                        label=f"{segment['label']} ({job.analyzer})",
                        result_id=seg_result.id,
                        segment_number=int(segment["number"]),
                    )
                )
        if not segs:
            series = session.get(Series, job.series_fk)
            description = series.series_description if series and series.series_description else "series"
            images.append(KeyImage(label=f"{description} ({job.analyzer})", series_id=job.series_fk))
    return images


def _source_paths(session: Session, series_id: int, files: HostFiles) -> list[Path]:
    """The series' instances as local files (from the storage where this host has no copy)."""
    keys = list(session.scalars(select(Instance.path).where(Instance.series_fk == series_id)))
    try:
        return files.local_paths(keys)
    except StorageError as exc:
        raise LookupError(f"series {series_id} cannot be read from the storage: {exc}") from exc


def _local(files: HostFiles, key: str) -> Path:
    try:
        return files.local_path(key)
    except StorageError as exc:
        raise LookupError(f"{key} cannot be read from the storage: {exc}") from exc


def _ordered_headers(paths: list[Path]) -> list[tuple[Dataset, Path]]:
    """Headers with their paths, along the slice normal (instance order where the geometry is incomplete)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    try:
        order = slice_geometry(headers, paths).order
    except Exception:  # noqa: BLE001 - a single radiograph has no slice geometry; any order then does
        order = sorted(range(len(headers)), key=lambda i: int(headers[i].get("InstanceNumber") or 0))
    return [(headers[i], paths[i]) for i in order]


def _window(values: np.ndarray, header: Dataset) -> np.ndarray:
    """Modality values to 8-bit grey with the source's window (first one) or a robust range."""
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = max(float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width), 1.0)
        low, high = c - w / 2, c + w / 2
    else:
        low, high = (float(v) for v in np.percentile(values, [1, 99]))
        high = max(high, low + 1)
    grey = np.clip((values.astype(np.float32) - low) / (high - low), 0, 1) * 255
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255 - grey
    return grey.astype(np.uint8)


def _slice_grey(path: Path, header: Dataset) -> np.ndarray:
    stored = decode_pixels(path)
    return _window(np.asarray(apply_modality_lut(stored, header)), header)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _cached(cache_dir: Path, name: str) -> bytes | None:
    path = cache_dir / name
    return path.read_bytes() if path.is_file() else None


def _store(cache_dir: Path, name: str, data: bytes) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(cache_dir / name)


def render_segment_image(
    session: Session, result_id: int, segment_number: int, cache_dir: Path, files: HostFiles
) -> bytes:
    """PNG of the middle source slice of a SEG segment with the segment overlaid.

    Raises :class:`LookupError` if the result is not a SEG of pacs-ai's, the
    segment does not exist or appears on no slice.
    """
    result = session.get(Result, result_id)
    if result is None or result.kind != "SEG":
        raise LookupError(f"result {result_id} is not a segmentation")
    name = f"seg-{result.sop_instance_uid}-{segment_number}-v{_RENDER_VERSION}.png"
    cached = _cached(cache_dir, name)
    if cached is not None:
        return cached
    job = session.get(Job, result.job_fk)
    assert job is not None
    seg = hd.seg.segread(_local(files, result.path))
    if segment_number not in seg.get_segment_numbers():
        raise LookupError(f"SEG {result.sop_instance_uid} has no segment {segment_number}")
    ordered = _ordered_headers(_source_paths(session, job.series_fk, files))
    uids = [str(h.SOPInstanceUID) for h, _ in ordered]
    # Only slices the SEG has frames for can show the segment (empty frames are omitted).
    referenced = {str(sop_uid) for _, _, sop_uid in seg.get_source_image_uids()}
    candidates = [i for i, uid in enumerate(uids) if uid in referenced]
    if not candidates:
        raise LookupError(f"SEG {result.sop_instance_uid} references none of the series' instances")
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[uids[i] for i in candidates],
        segment_numbers=[segment_number],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    present = [candidates[k] for k in range(len(candidates)) if masks[k].any()]
    if not present:
        raise LookupError(f"segment {segment_number} of SEG {result.sop_instance_uid} is empty")
    middle = present[len(present) // 2]
    mask = masks[candidates.index(middle)] > 0
    header, path = ordered[middle]
    grey = _slice_grey(path, header)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    colour = np.array(_PALETTE[(segment_number - 1) % len(_PALETTE)], dtype=np.float32)
    rgb[mask] = rgb[mask] * (1 - _OPACITY) + colour * _OPACITY
    rgb[_outline(mask)] = colour
    data = _png(rgb.astype(np.uint8))
    _store(cache_dir, name, data)
    return data


def render_series_image(session: Session, series_id: int, cache_dir: Path, files: HostFiles) -> bytes:
    """PNG of the middle image of a series (no overlay), for analyses without a SEG."""
    series = session.get(Series, series_id)
    if series is None:
        raise LookupError(f"series {series_id} does not exist")
    name = f"series-{series.series_instance_uid}-v{_RENDER_VERSION}.png"
    cached = _cached(cache_dir, name)
    if cached is not None:
        return cached
    ordered = _ordered_headers(_source_paths(session, series_id, files))
    if not ordered:
        raise LookupError(f"series {series_id} has no instances left")
    header, path = ordered[len(ordered) // 2]
    grey = _slice_grey(path, header)
    if grey.ndim != 2:
        raise LookupError(f"series {series_id} is not single-frame greyscale")
    data = _png(np.repeat(grey[..., None], 3, axis=2))
    _store(cache_dir, name, data)
    return data
