"""Our (slice, row, column) LPS volumes to MONAI's LoadImage convention and back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pacs_ai.analyze.volume import Volume, load_series
from pacs_ai.models.engine import ModelEngine
from pacs_ai.models.geometry import (
    labels_to_volume,
    monai_to_volume_order,
    volume_to_metatensor,
    volume_to_monai_array,
)
from pacs_ai.models.store import ModelStore
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.model_bundles import write_identity_bundle


def _rotation(x_deg: float, z_deg: float) -> np.ndarray:
    a, b = math.radians(x_deg), math.radians(z_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return rz @ rx


@pytest.fixture(scope="module")
def oblique_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small phantom whose whole grid is rotated in patient space (oblique, non-axial)."""
    directory = tmp_path_factory.mktemp("oblique")
    write_chest_phantom(directory, slices=6, size=64, pixel_spacing_mm=6.0, slice_spacing_mm=10.0)
    rotation = _rotation(25.0, 35.0)
    paths = sorted(directory.glob("*.dcm"))
    for path in paths:
        ds = pydicom.dcmread(path)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (iop @ rotation.T).ravel()]
        ds.ImagePositionPatient = [
            f"{v:.6f}" for v in rotation @ np.array([float(v) for v in ds.ImagePositionPatient])
        ]
        ds.save_as(path)
    return paths


def test_metatensor_matches_monai_loadimage_on_an_oblique_series(oblique_series: list[Path]) -> None:
    from monai.transforms import LoadImage

    volume = load_series(oblique_series)
    ours = volume_to_metatensor(volume, 3)
    reference = LoadImage(reader="PydicomReader", image_only=True)(str(oblique_series[0].parent))
    assert tuple(ours.shape) == tuple(reference.shape)
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), reference.affine.numpy(), atol=1e-4)
    assert ours.meta["space"] == reference.meta["space"]


def test_ras_orientation_puts_the_patients_left_lung_at_high_x(tmp_path: Path) -> None:
    """After Orientationd to RAS, +x is the patient's left: the phantom's left lung must be there."""
    from monai.transforms import EnsureChannelFirst, Orientation

    write_chest_phantom(tmp_path, slices=6, size=64, pixel_spacing_mm=6.0, slice_spacing_mm=10.0)
    volume = load_series(sorted(tmp_path.glob("*.dcm")))
    image = Orientation(axcodes="RAS")(EnsureChannelFirst()(volume_to_metatensor(volume, 3)))
    ras = image[0].numpy()
    middle = ras[:, :, ras.shape[2] // 2]
    lung = middle < -500
    left_half = lung[ras.shape[0] // 2 :].sum()
    right_half = lung[: ras.shape[0] // 2].sum()
    assert left_half > 0 and right_half > 0
    # RAS x runs from the patient's right to left; the volume's first column is the patient's right (LPS -x).
    np.testing.assert_array_equal(ras, np.flip(volume.voxels.transpose(2, 1, 0), axis=(0, 1)))
    assert volume.patient_position((0, 0, 0))[0] < volume.patient_position((0, 0, 63))[0]


def test_bundle_with_orientation_spacing_and_invert_returns_labels_voxel_for_voxel(
    oblique_series: list[Path], tmp_path: Path
) -> None:
    volume = load_series(oblique_series)
    rng = np.random.default_rng(3)
    volume.voxels = rng.integers(0, 2, size=volume.voxels.shape).astype(np.int16)  # asymmetric pattern
    dz, dy, dx = volume.spacing_mm
    write_identity_bundle(tmp_path / "identity", pixdim=(dx, dy, dz))
    ModelStore(tmp_path / "models").add(tmp_path / "identity")
    engine = ModelEngine(tmp_path / "models", tmp_path / "run", device="cpu")
    prediction = engine.run("identity", volume)
    assert prediction.labels is not None and prediction.labels.dtype == np.uint8
    np.testing.assert_array_equal(prediction.labels, volume.voxels.astype(np.uint8))


def test_array_order_round_trip_3d_and_2d() -> None:
    voxels = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    monai = volume_to_monai_array(voxels, 3)
    assert monai.shape == (4, 3, 2) and monai[3, 2, 1] == voxels[1, 2, 3]
    np.testing.assert_array_equal(monai_to_volume_order(monai, 3), voxels)
    image = voxels[:1]
    flat = volume_to_monai_array(image, 2)
    assert flat.shape == (4, 3) and flat[3, 2] == image[0, 2, 3]
    np.testing.assert_array_equal(monai_to_volume_order(flat, 2), image)


def test_radiograph_affine_is_2d_with_unit_normal() -> None:
    volume = Volume(
        voxels=np.zeros((1, 5, 7), dtype=np.float32),
        spacing_mm=(0.0, 0.2, 0.3),
        origin_mm=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        headers=[],
        paths=[],
    )
    image = volume_to_metatensor(volume, 2)
    assert tuple(image.shape) == (7, 5)
    np.testing.assert_allclose(np.diag(image.affine.numpy()), [-0.3, -0.2, 1.0, 1.0])


def test_labels_to_volume_argmax_and_shape_check() -> None:
    scores = torch.zeros(3, 4, 3, 2)
    scores[2, 3, 2, 1] = 1.0
    labels = labels_to_volume(scores.numpy(), 3, (2, 3, 4))
    assert labels[1, 2, 3] == 2 and labels.sum() == 2
    with pytest.raises(ValueError, match="Invertd"):
        labels_to_volume(scores.numpy(), 3, (2, 3, 5))
