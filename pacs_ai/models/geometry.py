"""Our volumes to MONAI's image convention and label maps back.

:class:`~pacs_ai.analyze.volume.Volume` stores voxels as (slice, row, column)
in DICOM's LPS patient space.  MONAI's ``LoadImage`` (ITK, or pydicom with
the ITK-compatible defaults) gives the same image as an array indexed
(x = column, y = row, z = slice) with a RAS affine.  Bundle transforms such as
``Orientationd``, ``Spacingd`` and ``Invertd`` act on that affine, so the
image we hand a bundle must carry exactly the affine ``LoadImage`` would have
produced; then the bundle's transforms behave as in the bundle's own
evaluation, and ``Invertd`` brings the prediction back onto our grid.

A radiograph (voxels of shape (1, rows, columns)) becomes a 2D image
(x = column, y = row) with a 4x4 affine whose third column is the slice
normal with unit length, as ``LoadImage`` gives for one 2D DICOM file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from monai.data import MetaTensor

    from pacs_ai.analyze.volume import Volume

#: LPS (DICOM) to RAS (MONAI, NIfTI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(volume: Volume) -> np.ndarray:
    """The 4x4 RAS affine from MONAI array indices (x=column, y=row, z=slice) to patient mm.

    For a single 2D image the third column is the slice normal (unit spacing).
    """
    direction = np.asarray(volume.direction, dtype=np.float64)
    dz, dy, dx = (float(s) for s in volume.spacing_mm)
    if volume.voxels.shape[0] == 1 and not dz > 0:
        dz = 1.0
    lps = np.eye(4)
    lps[:3, 0] = direction[0] * dx  # along columns (x index): the row cosine
    lps[:3, 1] = direction[1] * dy  # along rows (y index): the column cosine
    lps[:3, 2] = direction[2] * dz  # along slices (z index): the normal
    lps[:3, 3] = np.asarray(volume.origin_mm, dtype=np.float64)
    return LPS_TO_RAS @ lps


def volume_to_monai_array(voxels: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(slice, row, column) voxels to MONAI's spatial order, float32, without a channel axis.

    ``spatial_dims`` 3: (x=column, y=row, z=slice); 2: the single slice as (x=column, y=row).
    """
    if voxels.ndim != 3:
        raise ValueError(f"expected voxels of shape (slices, rows, columns), got {voxels.shape}")
    if spatial_dims == 2:
        if voxels.shape[0] != 1:
            raise ValueError(f"a 2D model takes one image, got {voxels.shape[0]} slices")
        return np.ascontiguousarray(voxels[0].T, dtype=np.float32)
    return np.ascontiguousarray(voxels.transpose(2, 1, 0), dtype=np.float32)


def monai_to_volume_order(array: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Inverse of :func:`volume_to_monai_array` for one spatial array (no channel axis)."""
    if array.ndim != spatial_dims:
        raise ValueError(f"expected a {spatial_dims}D array, got shape {array.shape}")
    if spatial_dims == 2:
        return np.ascontiguousarray(array.T[np.newaxis])
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def volume_to_metatensor(
    volume: Volume, spatial_dims: int, *, channel_first: bool = False, channels: int = 1
) -> MetaTensor:
    """The volume as ``LoadImage(image_only=True)`` would return it for the same DICOM files.

    Without ``channel_first`` the array has no channel axis and the metadata say
    so (``original_channel_dim`` NaN), which ``EnsureChannelFirstd`` expects;
    with it, a channel axis of 1 is added (``LoadImaged(ensure_channel_first=True)``).
    ``channels`` > 1 (a network taking a colour image, fed a grey one): the
    grey values are repeated in a last axis, which is how ``LoadImage`` gives a
    colour image (``original_channel_dim`` -1), then moved first with ``channel_first``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.utils import SpaceKeys

    array = volume_to_monai_array(volume.voxels, spatial_dims)
    affine = ras_affine(volume)
    spacing = np.sqrt((affine[:3, :spatial_dims] ** 2).sum(axis=0))
    meta = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine.copy(),
        "spatial_shape": tuple(array.shape),
        "spacing": spacing,
        "space": SpaceKeys.RAS,
        "original_channel_dim": math.nan,
        "filename_or_obj": str(volume.paths[0].parent) if volume.paths else "volume",
    }
    tensor = torch.from_numpy(array)
    if channels > 1:
        tensor = tensor[..., None].expand(*tensor.shape, channels).contiguous()
        meta["original_channel_dim"] = -1
        if channel_first:
            tensor = torch.movedim(tensor, -1, 0)
            meta["original_channel_dim"] = 0
    elif channel_first:
        tensor = tensor[None]
        meta["original_channel_dim"] = 0
    return MetaTensor(tensor, meta=meta)


def labels_to_volume(
    prediction: np.ndarray, spatial_dims: int, expected_shape: tuple[int, ...]
) -> np.ndarray:
    """A channel-first prediction in MONAI order to a uint8 (slice, row, column) label map.

    Several channels (one-hot or probabilities) are reduced by argmax; a single
    channel holds label values already (``AsDiscreted(argmax=True)``).
    Raises ``ValueError`` when the result does not match ``expected_shape``
    (a bundle whose postprocessing does not invert its spatial transforms).
    """
    array = np.asarray(prediction)
    if array.ndim == spatial_dims + 1:
        array = np.argmax(array, axis=0) if array.shape[0] > 1 else array[0]
    labels = np.rint(array)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"label values must be 0..255, got {labels.min()}..{labels.max()}")
    result = monai_to_volume_order(labels.astype(np.uint8), spatial_dims)
    if result.shape != tuple(expected_shape):
        raise ValueError(
            f"the prediction has shape {result.shape} (slice, row, column) but the image has "
            f"{tuple(expected_shape)}; the model's postprocessing must bring the prediction back onto the "
            "input grid (e.g. Invertd after Spacingd/Orientationd/Resized)"
        )
    return result
