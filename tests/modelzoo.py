"""Small models that the tests train themselves, saved in the formats hospitals bring.

No model weights can be downloaded in tests or CI, so every model the model
runtime is tested with is trained here, on synthetic data with exact truth,
in about a minute on a CPU:

* :func:`train_lung_segmentation_bundle`: a 3D MONAI ``UNet`` segmenting the
  right and left lung of the chest CT phantom, saved as a standard MONAI bundle
  (``configs/metadata.json``, ``configs/inference.json`` in the Model Zoo
  style, ``models/model.pt``);
* :func:`train_pneumothorax_classifier_bundle`: a small 2D MONAI ``Classifier``
  (a CNN) telling synthetic chest radiographs with a pneumothorax from
  those without, also a MONAI bundle;
* :func:`export_torchscript_model`: the segmentation network as TorchScript
  (``model.ts``) with the agreed YAML descriptor (``model.yaml``);
* :func:`write_broken_bundle` and :func:`write_failing_bundle`: bundles that
  must fail verification, or fail at inference time.

The training input pipelines apply the very transforms the bundles declare
(same classes, same parameters, built from the same constants), so a bundle
run through MONAI with its own configuration sees what the network was
trained on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
import yaml
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.networks.nets import Classifier, UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandSpatialCropd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from pacs_ai.synthetic.phantom import write_chest_phantom
from pacs_ai.synthetic.radiograph import radiograph_pixels

# ---------------------------------------------------------------------------------------------------------
# Lung segmentation (3D CT)
# ---------------------------------------------------------------------------------------------------------

LUNG_CHANNEL_DEF = {"0": "background", "1": "right lung", "2": "left lung"}
#: Isotropic resampling of the network input, mm: coarse enough to train in a minute, fine enough for
#: Dice >= 0.9 once the probabilities are resampled back to the source grid.
LUNG_SPACING_MM = (5.0, 5.0, 5.0)
#: 320 mm cubes: a window sees most of a chest, so which lung is which is decidable.
LUNG_ROI = (64, 64, 64)
LUNG_INTENSITY = {"a_min": -1000.0, "a_max": 400.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
LUNG_NETWORK = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
}
#: Training phantoms: fields of view 300-450 mm and scan lengths 240-360 mm, so a new phantom of a
#: different size or spacing is within what the network has seen.
LUNG_TRAINING_PHANTOMS = [
    {"slices": 40, "size": 160, "pixel_spacing_mm": 2.0, "slice_spacing_mm": 7.5, "seed": 101},
    {"slices": 60, "size": 200, "pixel_spacing_mm": 2.0, "slice_spacing_mm": 5.0, "seed": 102},
    {"slices": 48, "size": 180, "pixel_spacing_mm": 2.5, "slice_spacing_mm": 6.0, "seed": 103},
    {"slices": 72, "size": 256, "pixel_spacing_mm": 1.5, "slice_spacing_mm": 5.0, "seed": 104},
    {"slices": 36, "size": 150, "pixel_spacing_mm": 2.0, "slice_spacing_mm": 8.0, "seed": 105},
    {"slices": 90, "size": 224, "pixel_spacing_mm": 1.75, "slice_spacing_mm": 3.0, "seed": 106},
]
#: 120 steps are too few (the right lung is not learned yet); 200 give Dice 0.98 on new phantoms.
LUNG_TRAINING_STEPS = 250


def lung_preprocessing_config() -> dict[str, Any]:
    """The bundle's ``preprocessing`` (Model Zoo style: load, channel first, RAS, resample, window)."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(LUNG_SPACING_MM), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", **LUNG_INTENSITY},
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    }


def lung_training_transforms() -> Compose:
    """The bundle preprocessing after loading, on image and label (nearest neighbour for the label)."""
    return Compose(
        [
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            Spacingd(keys=["image", "label"], pixdim=LUNG_SPACING_MM, mode=["bilinear", "nearest"]),
            ScaleIntensityRanged(keys="image", **LUNG_INTENSITY),
            EnsureTyped(keys=["image", "label"]),
        ]
    )


def _inference_config(
    *,
    network_def: dict[str, Any] | str,
    preprocessing: dict[str, Any],
    inferer: dict[str, Any],
    postprocessing: list[dict[str, Any]],
    output_ext: str,
) -> dict[str, Any]:
    """An ``inference.json`` laid out like the MONAI Model Zoo bundles (spleen_ct_segmentation)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": output_ext,
        "output_postfix": "trans",
        "separate_folder": True,
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing,
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def lung_inference_config() -> dict[str, Any]:
    """The lung bundle's ``inference.json``."""
    return _inference_config(
        network_def={"_target_": "UNet", **LUNG_NETWORK},
        preprocessing=lung_preprocessing_config(),
        inferer={
            "_target_": "SlidingWindowInferer",
            "roi_size": list(LUNG_ROI),
            "sw_batch_size": 1,
            "overlap": 0.25,
        },
        postprocessing=[
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "meta_key_postfix": "meta_dict",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_ext": "@output_ext",
                "output_postfix": "@output_postfix",
                "separate_folder": "@separate_folder",
                "resample": False,
            },
        ],
        output_ext=".nii.gz",
    )


def _metadata(
    *,
    version: str,
    task: str,
    description: str,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    eval_metrics: dict[str, float],
    data_source: str,
    label_classes: str,
    pred_classes: str,
) -> dict[str, Any]:
    """A ``metadata.json`` with the fields of the MONAI bundle metadata schema."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
        "meta_schema_20220324.json",
        "version": version,
        "changelog": {version: "trained by the pacs-ai test suite on synthetic data"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"nibabel": _version_of("nibabel")},
        "task": task,
        "description": description,
        "authors": "pacs-ai test suite",
        "copyright": "Copyright (c) pacs-ai contributors",
        "data_source": data_source,
        "data_type": "dicom",
        "image_classes": "single channel data",
        "label_classes": label_classes,
        "pred_classes": pred_classes,
        "eval_metrics": eval_metrics,
        "intended_use": "Testing only: trained on synthetic images, not for diagnostic use",
        "references": [],
        "network_data_format": {"inputs": inputs, "outputs": outputs},
    }


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def lung_metadata(eval_metrics: dict[str, float]) -> dict[str, Any]:
    """The lung bundle's ``metadata.json``."""
    return _metadata(
        version="0.1.0",
        task="Lung segmentation (right and left lung) in chest CT",
        description="A small 3D UNet segmenting the right and left lung of chest CT at 5 mm, "
        "trained on the pacs-ai synthetic chest phantom",
        inputs={
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": list(LUNG_ROI),
                "dtype": "float32",
                "value_range": [LUNG_INTENSITY["a_min"], LUNG_INTENSITY["a_max"]],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        outputs={
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 3,
                "spatial_shape": list(LUNG_ROI),
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": dict(LUNG_CHANNEL_DEF),
            }
        },
        eval_metrics=eval_metrics,
        data_source="pacs_ai.synthetic.phantom.write_chest_phantom",
        label_classes="single channel data, 1 is right lung, 2 is left lung, 0 is everything else",
        pred_classes="3 channels softmax data: 0 background, 1 right lung, 2 left lung",
    )


def _write_bundle_files(
    bundle: Path, *, metadata: dict[str, Any], inference: dict[str, Any], readme: str
) -> None:
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(exist_ok=True)
    (bundle / "docs").mkdir(exist_ok=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
    (bundle / "docs" / "README.md").write_text(readme)
    (bundle / "LICENSE").write_text(
        "Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0).\n"
        "Model trained by the pacs-ai test suite on synthetic data; not for diagnostic use.\n"
    )


@dataclass
class LungSample:
    """A preprocessed training volume: image (1, X, Y, Z) in [0, 1] and label (1, X, Y, Z), RAS at 5 mm."""

    image: torch.Tensor
    label: torch.Tensor


def lung_sample(work_dir: Path, **phantom: Any) -> LungSample:
    """Write a phantom and run it through the bundle's preprocessing, with its truth as the label.

    The label goes in as a MetaTensor on the grid MONAI's DICOM reader gives
    the image ((column, row, slice) = LPS x, y, z, with the image's affine), so
    both follow the same orientation and spacing transforms.
    """
    truth = write_chest_phantom(work_dir, **phantom)
    loaded = EnsureChannelFirstd(keys="image")(LoadImaged(keys="image")({"image": str(work_dir)}))
    image = loaded["image"]
    labels = truth.labels.transpose(2, 1, 0)[np.newaxis]
    if tuple(labels.shape) != tuple(image.shape):
        raise RuntimeError(f"label grid {labels.shape} does not match the loaded image {tuple(image.shape)}")
    label = MetaTensor(torch.from_numpy(labels.astype(np.float32)), affine=image.affine.clone())
    data = lung_training_transforms()({"image": image, "label": label})
    return LungSample(image=data["image"].as_tensor().float(), label=data["label"].as_tensor().float())


def _train_lung_network(samples: Sequence[LungSample], steps: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    np.random.seed(seed)
    crop = Compose(
        [
            SpatialPadd(keys=["image", "label"], spatial_size=LUNG_ROI),
            RandSpatialCropd(keys=["image", "label"], roi_size=LUNG_ROI, random_size=False),
        ]
    )
    crop.set_random_state(seed)
    network = UNet(**LUNG_NETWORK)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=2e-4)
    rng = np.random.default_rng(seed)
    network.train()
    for _ in range(steps):
        batch = [crop({"image": s.image, "label": s.label}) for s in rng.choice(samples, size=2)]  # type: ignore[arg-type]
        images = torch.stack([torch.as_tensor(b["image"]) for b in batch])
        labels = torch.stack([torch.as_tensor(b["label"]) for b in batch])
        optimizer.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
    network.eval()
    return network


def train_lung_network(work_dir: Path, steps: int = LUNG_TRAINING_STEPS) -> UNet:
    """Train the lung UNet on the training phantoms (written under ``work_dir``)."""
    samples = [lung_sample(work_dir / f"phantom-{i}", **p) for i, p in enumerate(LUNG_TRAINING_PHANTOMS)]
    return _train_lung_network(samples, steps)


def train_lung_segmentation_bundle(out_dir: Path, *, steps: int = LUNG_TRAINING_STEPS) -> Path:
    """Train the lung UNet and write it as a MONAI bundle at ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lung-training-") as work:
        network = train_lung_network(Path(work), steps)
    seconds = time.monotonic() - started
    _write_bundle_files(
        out_dir,
        metadata=lung_metadata({"training_seconds": round(seconds, 1), "training_steps": steps}),
        inference=lung_inference_config(),
        readme=(
            "# Lung segmentation (synthetic)\n\n"
            "A small 3D UNet (MONAI) for the right (label 1) and left (label 2) lung in chest CT,\n"
            "trained by the pacs-ai test suite on synthetic chest phantoms resampled to 5 mm.\n"
            "Input: CT in HU, RAS, windowed -1000..400 to 0..1. Not for diagnostic use.\n"
        ),
    )
    torch.save(network.state_dict(), out_dir / "models" / "model.pt")
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# TorchScript export with the agreed YAML descriptor
# ---------------------------------------------------------------------------------------------------------


def torchscript_descriptor(name: str = "lung-ts") -> dict[str, Any]:
    """The agreed ``model.yaml`` contents for the TorchScript lung network."""
    return {
        "name": name,
        "version": "1.0.0",
        "task": "segmentation",
        "spatial_dims": 3,
        "input": {
            "channels": 1,
            "spatial_shape": list(LUNG_ROI),
            "intensity": dict(LUNG_INTENSITY),
            "spacing_mm": list(LUNG_SPACING_MM),
        },
        "inference": {"roi_size": list(LUNG_ROI), "overlap": 0.25, "sw_batch_size": 1},
        "output": {"activation": "softmax", "channels": dict(LUNG_CHANNEL_DEF)},
    }


class AxialLpsToRas(torch.nn.Module):
    """Runs a network trained on RAS-oriented input on MONAI ``LoadImage``-layout axial input.

    The TorchScript runtime hands the network the image as ``LoadImage`` gives
    it, without reorientation (see ``pacs_ai.models.descriptor``): for an axial
    series with ImageOrientationPatient [1, 0, 0, 0, 1, 0], x runs to the
    patient's left and y to posterior, the reverse of RAS on both axes.  Flipping
    those two axes in and out reproduces what the bundle's ``Orientationd``
    does, so the exported model gives the bundle's result on such series.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(self.network(torch.flip(x, [2, 3])), [2, 3])


def export_torchscript_model(out_dir: Path, bundle: Path | None = None) -> Path:
    """Write ``model.ts`` (the lung UNet, scripted) and ``model.yaml`` into ``out_dir``; returns ``out_dir``.

    Uses the weights of ``bundle`` (a lung bundle from
    :func:`train_lung_segmentation_bundle`) when given, else trains the network.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    network = UNet(**LUNG_NETWORK)
    if bundle is not None:
        state = torch.load(Path(bundle) / "models" / "model.pt", map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    else:
        with tempfile.TemporaryDirectory(prefix="lung-training-") as work:
            network = train_lung_network(Path(work))
    wrapped = AxialLpsToRas(network).eval()
    torch.jit.save(torch.jit.script(wrapped), str(out_dir / "model.ts"))
    (out_dir / "model.yaml").write_text(yaml.safe_dump(torchscript_descriptor(), sort_keys=False))
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Pneumothorax classifier (2D radiographs)
# ---------------------------------------------------------------------------------------------------------

CXR_SIZE = (128, 128)
CXR_NETWORK = {
    "in_shape": [1, *CXR_SIZE],
    "classes": 1,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2, 2],
}
CXR_TRAINING_STEPS = 200
CXR_TRAINING_CASES = 128
#: Training images come in several matrix sizes, as radiographs do, so the resize is part of what is learnt.
CXR_TRAINING_SHAPES = [(256, 256), (320, 288), (288, 320), (352, 352)]


def cxr_preprocessing_config() -> dict[str, Any]:
    """The classifier bundle's ``preprocessing``: the runtime gives display-oriented [0, 1] images."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Resized", "keys": "image", "spatial_size": list(CXR_SIZE), "mode": "area"},
            {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    }


def cxr_training_transforms() -> Compose:
    """The bundle preprocessing after loading (images enter as (1, rows, columns) arrays)."""
    return Compose(
        [
            Resized(keys="image", spatial_size=CXR_SIZE, mode="area"),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            EnsureTyped(keys="image"),
        ]
    )


def cxr_inference_config() -> dict[str, Any]:
    """The classifier bundle's ``inference.json``."""
    return _inference_config(
        network_def={"_target_": "Classifier", **CXR_NETWORK},
        preprocessing=cxr_preprocessing_config(),
        inferer={"_target_": "SimpleInferer"},
        postprocessing=[{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}],
        output_ext=".csv",
    )


def cxr_metadata(eval_metrics: dict[str, float]) -> dict[str, Any]:
    """The classifier bundle's ``metadata.json``."""
    return _metadata(
        version="0.1.0",
        task="Pneumothorax classification in chest radiographs",
        description="A small 2D CNN (MONAI Classifier) giving the probability of a pneumothorax on a "
        "frontal chest "
        "radiograph, trained on pacs-ai synthetic radiographs",
        inputs={
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "DX",
                "num_channels": 1,
                "spatial_shape": list(CXR_SIZE),
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        },
        outputs={
            "pred": {
                "type": "probabilities",
                "format": "classification",
                "num_channels": 1,
                "spatial_shape": [1],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_onehot": False,
                "channel_def": {"0": "pneumothorax"},
            }
        },
        eval_metrics=eval_metrics,
        data_source="pacs_ai.synthetic.radiograph",
        label_classes="1 if a pneumothorax is present, else 0",
        pred_classes="1 channel, sigmoid probability of pneumothorax",
    )


def cxr_case(index: int, pneumothorax: bool) -> torch.Tensor:
    """One training or validation image after the bundle preprocessing, (1, 128, 128).

    MONAI's ``LoadImage`` gives a 2D DICOM image indexed (x = column, y = row),
    the transpose of the (row, column) pixel array, so the network is trained
    on that layout.
    """
    rows, columns = CXR_TRAINING_SHAPES[index % len(CXR_TRAINING_SHAPES)]
    pixels = radiograph_pixels(seed=index, pneumothorax=pneumothorax, rows=rows, columns=columns)
    data = cxr_training_transforms()({"image": torch.from_numpy(pixels.T[np.newaxis].astype(np.float32))})
    return torch.as_tensor(data["image"]).float()


def _train_cxr_network(steps: int, cases: int, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    # Seeds pair up (i // 2) so each anatomy is seen with and without a pneumothorax: the difference is
    # the only thing that tells the classes apart.
    images = torch.stack([cxr_case(10_000 + i // 2, pneumothorax=i % 2 == 1) for i in range(cases)])
    targets = torch.tensor([[float(i % 2 == 1)] for i in range(cases)])
    network = Classifier(**CXR_NETWORK)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    loss_function = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed)
    network.train()
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(cases, size=16, replace=False))
        batch = images[pick]
        if rng.random() < 0.5:  # brightness/contrast jitter: robust to exposure, not to anatomy
            batch = (batch * float(rng.uniform(0.85, 1.15)) + float(rng.uniform(-0.05, 0.05))).clamp(0, 1)
        optimizer.zero_grad()
        loss = loss_function(network(batch), targets[pick])
        loss.backward()
        optimizer.step()
    network.eval()
    return network


def train_pneumothorax_classifier_bundle(
    out_dir: Path, *, steps: int = CXR_TRAINING_STEPS, cases: int = CXR_TRAINING_CASES
) -> Path:
    """Train the pneumothorax classifier, write it as a MONAI bundle at ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    started = time.monotonic()
    network = _train_cxr_network(steps, cases)
    seconds = time.monotonic() - started
    _write_bundle_files(
        out_dir,
        metadata=cxr_metadata({"training_seconds": round(seconds, 1), "training_steps": steps}),
        inference=cxr_inference_config(),
        readme=(
            "# Pneumothorax classifier (synthetic)\n\n"
            "A small 2D CNN (MONAI Classifier) giving the probability of a pneumothorax on a frontal chest\n"
            "radiograph (display-oriented, intensities 0..1, resized to 128 x 128). Trained by the pacs-ai\n"
            "test suite on synthetic radiographs. Not for diagnostic use.\n"
        ),
    )
    torch.save(network.state_dict(), out_dir / "models" / "model.pt")
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Bundles that must fail
# ---------------------------------------------------------------------------------------------------------

#: The class a broken bundle names; no such network exists in MONAI.
MISSING_NETWORK_CLASS = "UNetThatDoesNotExist"


def write_broken_bundle(out_dir: Path, lung_bundle: Path | None = None) -> Path:
    """A bundle whose ``network_def`` names a class that does not exist; verifying it must fail.

    The rest is a complete lung bundle (weights copied from ``lung_bundle``
    when given, else random weights), so the class name is the only defect.
    """
    out_dir = Path(out_dir)
    inference = lung_inference_config()
    inference["network_def"] = {**inference["network_def"], "_target_": MISSING_NETWORK_CLASS}
    _write_bundle_files(
        out_dir,
        metadata=lung_metadata({}),
        inference=inference,
        readme="# Broken bundle\n\nIts network_def names a network class that does not exist.\n",
    )
    if lung_bundle is not None:
        shutil.copyfile(Path(lung_bundle) / "models" / "model.pt", out_dir / "models" / "model.pt")
    else:
        torch.save(UNet(**LUNG_NETWORK).state_dict(), out_dir / "models" / "model.pt")
    return out_dir


class FailingNetwork(torch.nn.Module):
    """A lung-shaped network that raises on real chest CT, as a model with a runtime defect would.

    It raises when more than a tenth of its input window is soft tissue
    (windowed value above 0.6, i.e. above about -160 HU): every window of a
    chest CT is, while the synthetic smoke input of ``pacs-ai models verify``
    (uniform noise, mostly padding once resampled to 5 mm) is not, so the
    model registers and verifies but fails mid-inference on a study.
    """

    def __init__(self) -> None:
        super().__init__()
        # One real parameter, so the state dict is not empty and a checkpoint loader has work to do.
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float((x > 0.6).float().mean()) > 0.1:
            raise RuntimeError("simulated model failure")
        background = torch.ones_like(x) * self.scale
        return torch.cat([background, torch.zeros_like(x), torch.zeros_like(x)], dim=1)


FAILURE_MESSAGE = "simulated model failure"


def write_failing_bundle(out_dir: Path) -> Path:
    """A valid lung bundle whose network (TorchScript, ``models/model.ts``) raises in ``forward``.

    ``network_def`` loads the TorchScript module with ``torch.jit.load``, the
    way bundles that ship only ``model.ts`` are wired; ``models/model.pt`` holds
    its state dict as well, so a runtime that loads ``model.pt`` into
    ``network_def`` gets the same module.  No custom Python files are needed.
    """
    out_dir = Path(out_dir)
    inference = lung_inference_config()
    inference["network_def"] = "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')"
    _write_bundle_files(
        out_dir,
        metadata=lung_metadata({}),
        inference=inference,
        readme="# Failing bundle\n\nIts network raises RuntimeError('simulated model failure') in forward.\n",
    )
    scripted = torch.jit.script(FailingNetwork())
    extra_files = {
        "metadata.json": (out_dir / "configs" / "metadata.json").read_text(),
        "inference.json": (out_dir / "configs" / "inference.json").read_text(),
    }
    torch.jit.save(scripted, str(out_dir / "models" / "model.ts"), _extra_files=extra_files)
    torch.save(scripted.state_dict(), out_dir / "models" / "model.pt")
    return out_dir
