"""The YAML descriptor that accompanies a TorchScript model file.

A TorchScript file says nothing about the input it expects or what its output
channels mean, so a small YAML file next to it (same stem, ``.yaml`` or
``.yml``) does::

    name: lung-ts
    version: 1.0.0
    task: segmentation          # or classification
    spatial_dims: 3             # or 2
    input:
      channels: 1
      spatial_shape: [64, 64, 64]
      orientation: RAS          # optional: reorient first (MONAI axis codes, as Orientationd)
      intensity: {a_min: -1000, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}
      spacing_mm: [4.0, 4.0, 4.0]
      resize: [128, 128]
    inference: {roi_size: [64, 64, 64], overlap: 0.25, sw_batch_size: 1}
    output:
      activation: softmax       # softmax | sigmoid | none
      channels: {"0": background, "1": right lung, "2": left lung}

Array layout: the network receives a channel-first array in MONAI's layout,
i.e. the spatial axes as MONAI's ``LoadImage`` gives them for a DICOM image
(x = column, y = row[, z = slice along the normal]); with ``orientation``
(e.g. ``RAS``, as a bundle's ``Orientationd(axcodes="RAS")``) the array is
first reoriented so its axes run towards those directions, whatever the
scanner's orientation was.  ``spacing_mm`` and ``resize`` are given in the
axis order the network receives.  Segmentations are brought back onto the
source grid (``Invertd``) in every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pacs_ai.models import ModelError
from pacs_ai.yaml_files import load_yaml_model

#: Suffixes tried for the descriptor next to a TorchScript file (same stem).
DESCRIPTOR_SUFFIXES = (".yaml", ".yml")
#: Suffixes tried for the TorchScript file next to a descriptor (same stem).
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".torchscript", ".jit")


class IntensityRange(BaseModel):
    """``ScaleIntensityRange``: [a_min, a_max] to [b_min, b_max], optionally clipped."""

    model_config = ConfigDict(extra="forbid")
    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True

    @model_validator(mode="after")
    def _range_is_not_empty(self) -> IntensityRange:
        if self.a_max <= self.a_min:
            raise ValueError(f"a_max ({self.a_max}) must be greater than a_min ({self.a_min})")
        return self


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(default=1, ge=1)
    #: Shape of the synthetic smoke-test input, and the ROI when ``inference.roi_size`` is absent.
    spatial_shape: list[int] = Field(min_length=2, max_length=3)
    intensity: IntensityRange | None = None
    #: Reorient to these MONAI axis codes first (``RAS``, ``LPS``, ...; 2D: two letters, e.g. ``RA``).
    orientation: str | None = Field(default=None, pattern=r"^[LRAPSIlrapsi]{2,3}$")
    spacing_mm: list[float] | None = None
    resize: list[int] | None = None


class InferenceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roi_size: list[int] | None = None
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(default=1, ge=1)


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    activation: Literal["softmax", "sigmoid", "none"] = "none"
    #: Output channel index (as a string, YAML keys) -> name.
    channels: dict[str, str] = Field(default_factory=dict)


class TorchScriptDescriptor(BaseModel):
    """What :mod:`pacs_ai.models.torchscript` needs to run a TorchScript file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(min_length=1)
    task: Literal["segmentation", "classification"]
    spatial_dims: Literal[2, 3]
    input: InputSpec
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _shapes_match_dimensions(self) -> TorchScriptDescriptor:
        n = self.spatial_dims
        checks = {
            "input.spatial_shape": self.input.spatial_shape,
            "input.spacing_mm": self.input.spacing_mm,
            "input.resize": self.input.resize,
            "inference.roi_size": self.inference.roi_size,
        }
        for key, value in checks.items():
            if value is not None and len(value) != n:
                raise ValueError(f"{key} has {len(value)} values but spatial_dims is {n}")
            if value is not None and any(v <= 0 for v in value):
                raise ValueError(f"{key} must be positive, got {value}")
        orientation = self.input.orientation
        if orientation is not None:
            axes = {"L": "x", "R": "x", "A": "y", "P": "y", "S": "z", "I": "z"}
            if len(orientation) != n or len({axes[c] for c in orientation.upper()}) != n:
                raise ValueError(
                    f"input.orientation {orientation!r} must name {n} different axes (e.g. "
                    f"{'RAS' if n == 3 else 'RA'})"
                )
        for key in self.output.channels:
            if not key.isdigit():
                raise ValueError(f"output.channels keys are channel indices (0, 1, ...), got {key!r}")
        return self

    @property
    def roi_size(self) -> list[int]:
        return list(self.inference.roi_size or self.input.spatial_shape)


def read_descriptor(path: Path) -> TorchScriptDescriptor:
    """Parse and validate a descriptor; :class:`ModelError` names the file and every wrong key."""
    return load_yaml_model(path, TorchScriptDescriptor, ModelError, what="a TorchScript descriptor")


def pair_torchscript(path: Path) -> tuple[Path, Path]:
    """``(torchscript file, descriptor)`` for either of the two, matched by file stem.

    Raises :class:`ModelError` listing the names tried when the partner is missing.
    """
    if path.suffix.lower() in DESCRIPTOR_SUFFIXES:
        candidates = [path.with_suffix(s) for s in TORCHSCRIPT_SUFFIXES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ModelError(
                f"{path} is a descriptor but no TorchScript file sits next to it "
                f"(looked for {', '.join(c.name for c in candidates)})"
            )
        return found[0], path
    candidates = [path.with_suffix(s) for s in DESCRIPTOR_SUFFIXES]
    candidates += [path.with_name(path.name + s) for s in DESCRIPTOR_SUFFIXES]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise ModelError(
            f"{path} needs a YAML descriptor next to it (looked for "
            f"{', '.join(c.name for c in candidates)}); see pacs_ai/models/descriptor.py for the format"
        )
    return path, found[0]
