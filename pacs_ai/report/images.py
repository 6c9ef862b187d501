"""Key images for multimodal drafters: slices of a study rendered as 8-bit RGB pictures.

Image-text-to-text models (MedGemma, MAIRA-2, CheXagent, ...) take ordinary
pictures, as a reader would see them.  A radiograph loaded by
:func:`pacs_ai.analyze.radiograph.load_radiograph` is already display values
in [0, 1] (VOI applied, bone bright); a CT volume is in HU and is windowed
here, lung window by default since the drafts are about chest findings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pacs_ai.analyze.volume import Volume

#: Lung window (centre, width) in HU, the usual one for reading lung parenchyma.
LUNG_WINDOW_HU = (-600.0, 1500.0)


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (DICOM's "LINEAR" without the half-pixel offsets) to 0..255."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(values, dtype=np.float32) - low) / width
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _is_display_ready(volume: Volume) -> bool:
    """One-slice float volumes in [0, 1] are radiographs already through their VOI transform."""
    voxels = volume.voxels
    return (
        voxels.shape[0] == 1
        and np.issubdtype(voxels.dtype, np.floating)
        and float(voxels.min()) >= 0.0
        and float(voxels.max()) <= 1.0
    )


def key_slice_indices(slices: int, count: int) -> list[int]:
    """``count`` slice indices spread over the middle 60 % of a stack; the middle one when count is 1."""
    if slices < 1 or count < 1:
        return []
    if count == 1 or slices == 1:
        return [slices // 2]
    low, high = int(round(0.2 * (slices - 1))), int(round(0.8 * (slices - 1)))
    return sorted({int(round(i)) for i in np.linspace(low, high, min(count, high - low + 1))})


def render_key_images(
    volume: Volume,
    *,
    count: int = 1,
    window: tuple[float, float] | None = None,
    max_size: int = 896,
) -> list[Image.Image]:
    """Key images of ``volume`` as RGB pictures, longest side at most ``max_size`` pixels.

    A radiograph gives its one image; a CT stack gives ``count`` slices from
    its middle (see :func:`key_slice_indices`), windowed with ``window``
    (centre, width in HU; lung window by default).
    """
    if max_size < 16:
        raise ValueError(f"max_size must be at least 16 pixels, got {max_size}")
    if _is_display_ready(volume):
        planes = [np.clip(np.rint(volume.voxels[0] * 255.0), 0, 255).astype(np.uint8)]
    else:
        center, width = window or LUNG_WINDOW_HU
        planes = [
            window_to_uint8(volume.voxels[k], center, width)
            for k in key_slice_indices(volume.voxels.shape[0], count)
        ]
    _, dy, dx = volume.spacing_mm
    images = []
    for plane in planes:
        picture = Image.fromarray(plane, mode="L")
        # Square pixels: non-square spacing would distort anatomy for the model.
        rows, columns = plane.shape
        height, width = rows * dy, columns * dx
        scale = max_size / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != picture.size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        images.append(picture.convert("RGB"))
    return images
