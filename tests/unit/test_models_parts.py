"""Descriptor and manifest parsing, the warm-model cache, device choice and error translation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from celery.exceptions import SoftTimeLimitExceeded

from pacs_ai.analyze.base import AnalysisFailed
from pacs_ai.analyze.volume import Volume
from pacs_ai.models import ModelError
from pacs_ai.models.bundle import smoke_shape
from pacs_ai.models.cache import ModelCache
from pacs_ai.models.descriptor import pair_torchscript, read_descriptor
from pacs_ai.models.device import device_name
from pacs_ai.models.engine import ModelEngine
from pacs_ai.models.store import Manifest, ModelStore, UnknownModelError, file_problems
from tests.model_bundles import write_identity_bundle, write_torchscript_segmenter

DESCRIPTOR = {
    "name": "lung-ts",
    "version": "1.0.0",
    "task": "segmentation",
    "spatial_dims": 3,
    "input": {
        "channels": 1,
        "spatial_shape": [64, 64, 64],
        "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
        "spacing_mm": [4.0, 4.0, 4.0],
    },
    "inference": {"roi_size": [64, 64, 64], "overlap": 0.25, "sw_batch_size": 1},
    "output": {"activation": "softmax", "channels": {"0": "background", "1": "right lung", "2": "left lung"}},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_descriptor_in_the_agreed_format_parses(tmp_path: Path) -> None:
    descriptor = read_descriptor(_write(tmp_path / "m.yaml", DESCRIPTOR))
    assert descriptor.task == "segmentation" and descriptor.roi_size == [64, 64, 64]
    assert descriptor.input.intensity is not None and descriptor.input.intensity.a_max == 400
    without_roi = dict(DESCRIPTOR, inference={"overlap": 0.5})
    assert read_descriptor(_write(tmp_path / "n.yaml", without_roi)).roi_size == [64, 64, 64]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "detection"}, "task"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"inference": {"roi_size": [64, 64]}}, "inference.roi_size has 2 values but spatial_dims is 3"),
        ({"output": {"activation": "relu"}}, "output.activation"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_descriptor_errors_name_file_and_key(tmp_path: Path, change: dict, message: str) -> None:
    path = _write(tmp_path / "bad.yaml", {**DESCRIPTOR, **change})
    with pytest.raises(ModelError) as raised:
        read_descriptor(path)
    assert str(path) in str(raised.value) and message in str(raised.value)


def test_torchscript_and_descriptor_are_paired_by_stem(tmp_path: Path) -> None:
    (tmp_path / "a.ts").write_bytes(b"x")
    _write(tmp_path / "a.yaml", DESCRIPTOR)
    assert pair_torchscript(tmp_path / "a.ts") == (tmp_path / "a.ts", tmp_path / "a.yaml")
    assert pair_torchscript(tmp_path / "a.yaml") == (tmp_path / "a.ts", tmp_path / "a.yaml")
    (tmp_path / "b.ts").write_bytes(b"x")
    with pytest.raises(ModelError, match="b.yaml"):
        pair_torchscript(tmp_path / "b.ts")


def test_manifest_records_hashes_and_detects_changed_files(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    model = store.add(write_torchscript_segmenter(tmp_path / "src"))
    manifest = json.loads((model.directory / "manifest.json").read_text())
    assert manifest["name"] == "lung-ts" and manifest["kind"] == "torchscript"
    assert set(manifest["files"]) == {"model.ts", "descriptor.yaml"}
    assert Manifest.from_json((model.directory / "manifest.json").read_text(), tmp_path) == model.manifest
    assert file_problems(model) == []
    with (model.files_dir / "model.ts").open("ab") as stream:
        stream.write(b"tampered")
    assert any("changed after registration" in p for p in file_problems(model))
    with pytest.raises(ModelError, match="already registered"):
        store.add(tmp_path / "src" / "lung-ts.ts")
    with pytest.raises(UnknownModelError, match="registered: lung-ts"):
        store.get("other")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]


def test_smoke_shape_from_metadata_expressions() -> None:
    assert smoke_shape([96, 96, 96], 3) == (96, 96, 96)
    assert smoke_shape(["16*n", "16*n", "16*n"], 3) == (32, 32, 32)
    assert smoke_shape(["2**n", "2**n"], 2) == (32, 32)
    assert smoke_shape(None, 2) == (64, 64)


def test_cache_evicts_least_recently_used_within_budget() -> None:
    loads: list[str] = []

    def loader(name: str, size: int):  # noqa: ANN202
        def load() -> tuple[str, int]:
            loads.append(name)
            return (name, size)

        return load

    cache: ModelCache[tuple[str, int]] = ModelCache(100, lambda entry: entry[1])
    cache.get(("a", "1"), loader("a", 40))
    cache.get(("b", "1"), loader("b", 40))
    cache.get(("a", "1"), loader("a", 40))  # hit: a becomes most recent
    cache.get(("c", "1"), loader("c", 40))  # over budget: b (least recent) goes
    assert cache.keys() == [("a", "1"), ("c", "1")] and loads == ["a", "b", "c"]
    cache.get(("a", "2"), loader("a", 40))  # re-registered a replaces the old a
    assert cache.keys() == [("c", "1"), ("a", "2")]
    cache.get(("big", "1"), loader("big", 500))  # alone over budget: kept, everything else evicted
    assert cache.keys() == [("big", "1")] and cache.total_bytes == 500


def test_device_choice() -> None:
    assert device_name("auto", 0) == "cpu"
    assert device_name("auto", 2) == "cuda:0"
    assert device_name("cpu", 2) == "cpu"
    assert device_name("cuda:1", 2) == "cuda:1"
    with pytest.raises(ValueError, match="sees 0 CUDA device"):
        device_name("cuda", 0)
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        device_name("gpu", 1)


class _Failing(torch.nn.Module):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("shape mismatch in conv"), "inference failed: RuntimeError: shape mismatch"),
        (MemoryError(), "out of memory on cpu during inference"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"), "out of memory"),
    ],
)
def test_model_errors_become_analysis_failed_but_soft_time_limit_passes(
    tmp_path: Path, error: BaseException, expected: str
) -> None:
    write_identity_bundle(tmp_path / "ident", pixdim=(1.0, 1.0, 1.0))
    ModelStore(tmp_path / "models").add(tmp_path / "ident")
    engine = ModelEngine(tmp_path / "models", tmp_path / "run", device="cpu")
    volume = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), [], [])
    assert engine.run("ident", volume).labels is not None
    engine.model("ident").network = _Failing(error)  # a real module that fails, in the warm cache
    with pytest.raises(AnalysisFailed) as failed:
        engine.run("ident", volume)
    assert "model ident" in str(failed.value) and expected in str(failed.value)
    engine.model("ident").network = _Failing(SoftTimeLimitExceeded())
    with pytest.raises(SoftTimeLimitExceeded):
        engine.run("ident", volume)
