"""The published MONAI Model Zoo bundles of ``../shared/data/monai-model-zoo``, made runnable for tests.

The bundles come without weights (they cannot be downloaded here), so
:func:`runnable_copy` copies one to a temporary folder and writes random
weights of the network its own ``inference.json`` defines (``network_def``
instantiated by MONAI's ConfigParser, its ``state_dict`` saved to
``models/model.pt``).  No config file is edited.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom.uid import generate_uid

from pacs_ai.models.bundle import override_network_def

#: The shared folder, relative to the repository (see ../shared/data/README.md).
MODEL_ZOO = Path(__file__).resolve().parents[2] / "shared" / "data" / "monai-model-zoo"
BUNDLES = (
    "spleen_ct_segmentation",
    "wholeBody_ct_segmentation",
    "swin_unetr_btcv_segmentation",
    "lung_nodule_ct_detection",
    "breast_density_classification",
)


def published(name: str) -> Path:
    """The published bundle ``name``; skips the test with the reason when the shared data is absent."""
    path = MODEL_ZOO / name
    if not (path / "configs" / "metadata.json").is_file():
        pytest.skip(f"published Model Zoo bundle {name} not found at {path} (see ../shared/data/README.md)")
    return path


def runnable_copy(name: str, into: Path, seed: int = 0) -> Path:
    """A copy of the published bundle with random weights of its ``network_def`` in ``models/model.pt``."""
    source = published(name)
    target = into / name
    shutil.copytree(source, target)
    parser = ConfigParser()
    parser.read_meta(str(target / "configs" / "metadata.json"))
    parser.read_config(str(target / "configs" / "inference.json"))
    parser["bundle_root"] = str(target)
    override_network_def(parser)  # no ImageNet download; the network class as this MONAI has it
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    (target / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), target / "models" / "model.pt")
    return target


def torchvision_missing() -> str | None:
    """Why torchvision cannot be used here (None when it can): two of the five bundles need it."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a CUDA build next to CPU torch fails with RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


#: lung_nodule_ct_detection's feature extractor without torchvision (see tests/zoo_networks.py).
FPN_WITHOUT_TORCHVISION = {
    "_target_": "tests.zoo_networks.ResNetFPN",
    "backbone": "@backbone",
    "spatial_dims": "@spatial_dims",
}


def detection_copy(into: Path, seed: int = 0) -> Path:
    """``lung_nodule_ct_detection`` ready to run: the published bundle when torchvision works, else a
    derived copy whose ``feature_extractor`` is the same network built without torchvision (the only
    difference; detector, anchors, pre- and postprocessing are the published ones)."""
    if torchvision_missing() is None:
        return runnable_copy("lung_nodule_ct_detection", into, seed)
    source = published("lung_nodule_ct_detection")
    target = into / "lung_nodule_ct_detection"
    shutil.copytree(source, target)
    config_path = target / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["feature_extractor"] = FPN_WITHOUT_TORCHVISION
    config_path.write_text(json.dumps(config, indent=4))
    parser = ConfigParser()
    parser.read_config(str(config_path))
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    (target / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), target / "models" / "model.pt")
    return target


@dataclass(frozen=True)
class Nodule:
    """A sphere of soft tissue in the lung phantom: centre in patient coordinates (LPS, mm) and radius."""

    center_mm: tuple[float, float, float]
    radius_mm: float


@dataclass(frozen=True)
class NodulePhantom:
    paths: list[Path]
    study_uid: str
    series_uid: str
    nodules: tuple[Nodule, ...]


#: Small on purpose: each bundle's sliding window covers it in one patch (96 mm x 96 mm x 48 mm).
NODULE_PHANTOM = {"size": 64, "pixel_spacing_mm": 1.5, "slices": 24, "slice_spacing_mm": 2.0}
NODULES = (Nodule((-20.0, -10.0, 20.0), 6.0), Nodule((18.0, 12.0, 30.0), 4.5))


def write_nodule_phantom(
    out_dir: Path, *, nodules: tuple[Nodule, ...] = NODULES, patient_id: str = "ZOO-001"
) -> NodulePhantom:
    """A small axial CT series: lung (-850 HU) in soft tissue (40 HU), with soft-tissue spheres (nodules).

    Image Position of the first slice is (0, 0, 0) and the orientation axial
    (rows along +x, columns along +y), so voxel (slice k, row j, column i) is at
    (i, j, k) * spacing in LPS.
    """
    from pacs_ai.synthetic.phantom import RESCALE_INTERCEPT, ct_slice_dataset

    size, dx = NODULE_PHANTOM["size"], NODULE_PHANTOM["pixel_spacing_mm"]
    slices, dz = NODULE_PHANTOM["slices"], NODULE_PHANTOM["slice_spacing_mm"]
    origin = -(size - 1) * dx / 2  # centred in x and y
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = (
        str(generate_uid(prefix=None, entropy_srcs=["zoo-phantom", kind, patient_id]))
        for kind in ("study", "series", "frame")
    )
    axis = origin + np.arange(size) * dx
    y, x = np.meshgrid(axis, axis, indexing="ij")
    paths = []
    for k in range(slices):
        z = k * dz
        hu = np.full((size, size), 40.0)
        hu[(x / 40.0) ** 2 + (y / 36.0) ** 2 < 1.0] = -850.0
        for nodule in nodules:
            cx, cy, cz = nodule.center_mm
            hu[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= nodule.radius_mm**2] = 30.0
        stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
        dataset = ct_slice_dataset(
            index=k,
            z_mm=z,
            stored=stored,
            origin_xy=origin,
            pixel_spacing_mm=dx,
            slice_spacing_mm=dz,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            patient_id=patient_id,
            patient_name="Phantom^Nodules",
            accession_number="ZOO0001",
        )
        dataset.SeriesDescription = "CHEST CT nodule phantom"
        path = out_dir / f"CT{k + 1:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return NodulePhantom(paths, study_uid, series_uid, nodules)
