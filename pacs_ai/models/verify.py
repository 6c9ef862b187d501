"""``pacs-ai models verify``: is a registered model usable, and does it run?

Checks run in order and stop at the first failure, because each needs the
previous one: metadata (or descriptor), file hashes against the manifest,
the inference config, network instantiation with its weights and transforms,
and a smoke inference on a synthetic input of the declared shape through the
same pipeline real studies take.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import torch

from pacs_ai.models import ModelError
from pacs_ai.models.descriptor import read_descriptor
from pacs_ai.models.store import (
    DESCRIPTOR_FILE,
    RegisteredModel,
    bundle_config_path,
    bundle_summary,
    bundle_weights_path,
    file_problems,
    read_json_or_yaml,
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    model: str
    device: str
    checks: list[Check] = field(default_factory=list)
    smoke_seconds: float | None = None
    output_shape: list[int] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "ok": self.ok,
            "device": self.device,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "smoke_seconds": self.smoke_seconds,
            "output_shape": self.output_shape,
        }


def _metadata(model: RegisteredModel) -> str:
    if model.manifest.kind == "torchscript":
        descriptor = read_descriptor(model.files_dir / DESCRIPTOR_FILE)
        return f"descriptor: {descriptor.task}, {descriptor.spatial_dims}D, version {descriptor.version}"
    summary = bundle_summary(model.files_dir)
    return f"metadata.json: {summary['task']}, {summary['spatial_dims']}D, version {summary['version']}"


def _config(model: RegisteredModel) -> str:
    if model.manifest.kind == "torchscript":
        return "TorchScript descriptor (no bundle config)"
    path = bundle_config_path(model.files_dir)
    config = read_json_or_yaml(path)
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a mapping of config keys, got {type(config).__name__}")
    weights = bundle_weights_path(model.files_dir)
    if weights.name == "model.pt" and "network_def" not in config:
        raise ModelError(f"{path}: key 'network_def' is missing; it is needed to load {weights.name}")
    present = [k for k in ("network_def", "preprocessing", "inferer", "postprocessing") if k in config]
    return f"{path.name}: {', '.join(present)}"


def smoke_volume(shape: tuple[int, ...], value_range: tuple[float, float], spatial_dims: int):  # noqa: ANN201
    """A synthetic :class:`~pacs_ai.analyze.volume.Volume` whose MONAI-order shape is ``shape``."""
    from pacs_ai.analyze.volume import Volume

    low, high = value_range
    monai_shape = tuple(shape) if spatial_dims == 3 else (*shape, 1)
    rng = np.random.default_rng(0)
    voxels = rng.uniform(low, high, size=monai_shape[::-1]).astype(np.float32)
    return Volume(
        voxels=voxels,
        spacing_mm=(1.0, 1.0, 1.0),
        origin_mm=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        headers=[],
        paths=[],
    )


T = TypeVar("T")


def verify_model(
    model: RegisteredModel, device: torch.device, roi_size: tuple[int, ...] | None = None
) -> VerifyReport:
    """Run every check on ``model``; a failure is recorded with an actionable detail, never raised.

    ``roi_size``: run the smoke inference with this sliding window instead of
    the model's own (a large window of a heavy network takes minutes on a CPU;
    the pipeline is checked the same way).
    """
    from pacs_ai.models.boxes import patient_boxes
    from pacs_ai.models.engine import load_registered
    from pacs_ai.models.geometry import labels_to_volume, volume_to_metatensor
    from pacs_ai.models.loaded import InfererOverrides

    report = VerifyReport(model=model.name, device=str(device))

    def check(name: str, action: Callable[[], T]) -> T | Literal[True] | None:
        try:
            result = action()
        except ModelError as exc:
            report.checks.append(Check(name, False, str(exc)))
            return None
        except Exception as exc:  # the model's own code may raise anything; report it, do not crash
            report.checks.append(Check(name, False, f"{type(exc).__name__}: {exc}"))
            return None
        report.checks.append(Check(name, True, result if isinstance(result, str) else "ok"))
        return result if result is not None else True

    if check("metadata", lambda: _metadata(model)) is None:
        return report

    def hashes() -> str:
        problems = file_problems(model)
        if problems:
            raise ModelError("; ".join(problems))
        return f"{len(model.manifest.files)} files match the manifest"

    if check("files", hashes) is None or check("config", lambda: _config(model)) is None:
        return report
    loaded = check("network and weights", lambda: load_registered(model, device))
    if loaded is None or loaded is True:  # (load_registered returns the model, never None)
        return report
    report.checks[
        -1
    ].detail = (
        f"{type(loaded.network).__name__} on {device}, {loaded.size_bytes / 2**20:.1f} MB of parameters"
    )

    def smoke() -> str:
        volume = smoke_volume(loaded.smoke_shape, loaded.smoke_range, loaded.spatial_dims)
        image = volume_to_metatensor(
            volume,
            loaded.spatial_dims,
            channel_first=loaded.channel_first_input,
            channels=loaded.input_channels,
        )
        started = time.perf_counter()
        output = loaded.predict(image, InfererOverrides(roi_size=roi_size) if roi_size else None)
        report.smoke_seconds = round(time.perf_counter() - started, 3)
        if loaded.task == "detection":
            assert loaded.box_layout is not None
            patient_boxes(output, loaded.box_layout)  # the keys and layout a detection result needs
            shapes = {k: list(np.shape(v)) for k, v in output.items()}
            return f"input {list(loaded.smoke_shape)} -> {shapes} in {report.smoke_seconds:.2f} s"
        report.output_shape = list(output.shape)
        if loaded.task == "segmentation":
            labels_to_volume(output, loaded.spatial_dims, volume.voxels.shape)
        return (
            f"input {list(loaded.smoke_shape)} -> output {list(output.shape)} in {report.smoke_seconds:.2f} s"
        )

    check("smoke inference", smoke)
    return report
