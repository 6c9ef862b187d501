"""Tiny untrained models written the way hospitals deliver them, for the model runtime's tests.

Random weights: these test loading, geometry and plumbing, not accuracy (the
modelzoo helpers in ``tests/modelzoo.py`` train real ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.networks.nets import UNet

LUNG_CHANNELS = {"0": "background", "1": "right lung", "2": "left lung"}


def _metadata(
    *, version: str, spatial_shape: list[int], task: str, channels: dict[str, str]
) -> dict[str, Any]:
    pred_type = "image" if task == "segmentation" else "probabilities"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": version,
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "name": "pacs-ai test bundle",
        "task": task,
        "description": "untrained test model",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": 1,
                    "spatial_shape": spatial_shape,
                    "dtype": "float32",
                    "value_range": [-1000, 400],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": pred_type,
                    "format": "segmentation" if task == "segmentation" else "classes",
                    "num_channels": len(channels),
                    "spatial_shape": spatial_shape if task == "segmentation" else [len(channels)],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": task == "segmentation",
                    "channel_def": channels,
                }
            },
        },
    }


def _write_bundle(root: Path, metadata: dict[str, Any], inference: dict[str, Any], state: dict) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    torch.save(state, root / "models" / "model.pt")
    return root


def tiny_unet(spatial_dims: int = 3, out_channels: int = 3, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=out_channels,
        channels=(4, 8),
        strides=(2,),
        num_res_units=0,
    )


def write_unet_bundle(
    root: Path,
    *,
    version: str = "0.1.0",
    pixdim: tuple[float, float, float] = (6.0, 6.0, 12.0),
    roi_size: tuple[int, int, int] = (32, 32, 16),
) -> Path:
    """A Model Zoo style 3D segmentation bundle: RAS orientation, resampling, sliding window, Invertd."""
    network_def = {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    }
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/nonexistent/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 400,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image", "device": "@device"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(roi_size),
            "sw_batch_size": 1,
            "overlap": 0.25,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "resample": False},
            ],
        },
        "run": ["$@evaluator.run()"],
    }
    metadata = _metadata(
        version=version, spatial_shape=list(roi_size), task="segmentation", channels=LUNG_CHANNELS
    )
    return _write_bundle(root, metadata, inference, tiny_unet().state_dict())


def write_identity_bundle(root: Path, *, pixdim: tuple[float, float, float]) -> Path:
    """A bundle whose network is the identity: labels = input > 0.5 after RAS reorientation and resampling.

    With nearest-neighbour resampling to the input's own spacing the round trip
    is exact, so the labels must equal the input voxel for voxel.
    """
    inference = {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "torch.nn.Identity"},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "nearest"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            ],
        },
    }
    metadata = _metadata(
        version="0.0.1",
        spatial_shape=[16, 16, 8],
        task="segmentation",
        channels={"0": "background", "1": "foreground"},
    )
    return _write_bundle(root, metadata, inference, {})


def write_broken_bundle(root: Path) -> Path:
    """A bundle whose network_def names a class that does not exist."""
    write_unet_bundle(root)
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["network_def"]["_target_"] = "NoSuchNetwork"
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    return root


class _TinyClassifier(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.features(x)).mean(dim=(2, 3))
        return self.head(pooled)


def write_torchscript_segmenter(directory: Path, name: str = "lung-ts") -> Path:
    """A scripted 3D UNet plus descriptor (resampling, intensity window, sliding window); the .ts path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.ts"
    torch.jit.script(tiny_unet(seed=1).eval()).save(str(path))
    descriptor = {
        "name": name,
        "version": "1.0.0",
        "task": "segmentation",
        "spatial_dims": 3,
        "input": {
            "channels": 1,
            "spatial_shape": [32, 32, 16],
            "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
            "spacing_mm": [6.0, 6.0, 12.0],
        },
        "inference": {"roi_size": [32, 32, 16], "overlap": 0.25, "sw_batch_size": 2},
        "output": {"activation": "softmax", "channels": LUNG_CHANNELS},
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(descriptor, sort_keys=False))
    return path


def write_torchscript_classifier(directory: Path, name: str = "ptx-ts", classes: int = 2) -> Path:
    """A scripted 2D classifier plus descriptor (resize to 64x64, sigmoid outputs); returns the .ts path."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(2)
    path = directory / f"{name}.ts"
    torch.jit.script(_TinyClassifier(classes).eval()).save(str(path))
    descriptor = {
        "name": name,
        "version": "0.3.0",
        "task": "classification",
        "spatial_dims": 2,
        "input": {"channels": 1, "spatial_shape": [64, 64], "resize": [64, 64]},
        "output": {"activation": "sigmoid", "channels": {str(i): f"finding {i}" for i in range(classes)}},
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(descriptor, sort_keys=False))
    return path
