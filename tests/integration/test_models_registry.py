"""The model registry through the real CLI, and the monai-bundle analyzer end to end into SEG/SR."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from pacs_ai.analyze.base import InvalidParameters
from pacs_ai.analyze.monai_bundle import MonaiBundleAnalyzer
from pacs_ai.analyze.registry import get_analyzer
from pacs_ai.config import Settings
from pacs_ai.encode import EquipmentInfo, write_dataset
from pacs_ai.encode.results import build_results
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import AuditEvent
from pacs_ai.models.store import ModelStore
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.test_cli import pacs_ai_in_process
from tests.model_bundles import (
    write_broken_bundle,
    write_torchscript_classifier,
    write_torchscript_segmenter,
    write_unet_bundle,
)
from tests.peers import dciodvfy_errors, dsrdump

AS = ["SCT", "123037004", "Anatomical Structure"]
LUNG_SEGMENTS = {
    "1": {
        "label": "Right lung",
        "category": AS,
        "type": ["SCT", "3341006", "Right lung"],
        "color": [128, 174, 128],
    },
    "2": {"label": "Left lung", "category": AS, "type": ["SCT", "44029006", "Left lung"]},
}


def models_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs-ai models ARGS`` on ``data_dir`` in this process (the verbs are under test, not the process)."""
    return pacs_ai_in_process("models", *args, PACS_AI_DATA_DIR=str(data_dir))


def _audit_actions(data_dir: Path) -> list[tuple[str, str]]:
    engine = make_engine(f"sqlite:///{data_dir / 'index.sqlite3'}")
    with session_scope(make_session_factory(engine)) as session:
        return [(e.action, e.object_uid) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_cli_add_list_verify_remove_bundle_and_torchscript(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_unet_bundle(tmp_path / "src" / "lung-unet")
    torchscript = write_torchscript_segmenter(tmp_path / "src")

    added = models_cli(data, "add", str(tmp_path / "src" / "lung-unet"), "--json")
    assert added.returncode == 0, added.stdout + added.stderr
    assert json.loads(added.stdout)["kind"] == "bundle"
    added = models_cli(data, "add", str(torchscript), "--name", "lung-ts2", "--json")
    assert added.returncode == 0, added.stdout + added.stderr
    assert json.loads(added.stdout)["task"] == "segmentation"

    listed = models_cli(data, "list", "--json")
    assert [(m["name"], m["kind"]) for m in json.loads(listed.stdout)] == [
        ("lung-ts2", "torchscript"),
        ("lung-unet", "bundle"),
    ]
    for name in ("lung-unet", "lung-ts2"):
        verified = models_cli(data, "verify", name, "--json")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        report = json.loads(verified.stdout)
        assert report["ok"] and report["output_shape"] == [1, 32, 32, 16]
        assert [c["name"] for c in report["checks"]][-1] == "smoke inference"

    assert models_cli(data, "add", str(torchscript), "--name", "lung-ts2").returncode == 1
    removed = models_cli(data, "remove", "lung-ts2", "--json")
    assert removed.returncode == 0 and not (data / "models" / "lung-ts2").exists()
    missing = models_cli(data, "verify", "lung-ts2", "--json")
    assert missing.returncode == 1 and "registered: lung-unet" in json.loads(missing.stdout)["error"]
    assert models_cli(data, "verify").returncode == 2
    assert _audit_actions(data) == [
        ("model.added", "lung-unet"),
        ("model.added", "lung-ts2"),
        ("model.verified", "lung-unet"),
        ("model.verified", "lung-ts2"),
        ("model.removed", "lung-ts2"),
    ]


def test_cli_verify_reports_broken_config_and_tampered_weights(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert models_cli(data, "add", str(write_broken_bundle(tmp_path / "broken")), "--json").returncode == 0
    verified = models_cli(data, "verify", "broken")
    assert verified.returncode == 1
    text = " ".join(verified.stdout.split())
    assert "inference.json" in text and "network_def" in text and "NoSuchNetwork" in text

    assert models_cli(data, "add", str(write_unet_bundle(tmp_path / "ok")), "--json").returncode == 0
    with (data / "models" / "ok" / "model" / "models" / "model.pt").open("ab") as stream:
        stream.write(b"\0")
    report = json.loads(models_cli(data, "verify", "ok", "--json").stdout)
    assert not report["ok"] and report["checks"][-1]["name"] == "files"
    assert "changed after registration" in report["checks"][-1]["detail"]

    not_a_model = models_cli(data, "add", str(tmp_path), "--json")
    assert not_a_model.returncode == 1 and "configs/metadata.json" in json.loads(not_a_model.stdout)["error"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("phantom")
    write_chest_phantom(directory, slices=24, size=128, pixel_spacing_mm=3.0, slice_spacing_mm=12.0)
    return sorted(directory.glob("*.dcm"))


def test_monai_bundle_analyzer_segments_phantom_into_valid_seg_and_sr(
    tmp_path: Path, phantom: list[Path]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", fsync=False)
    ModelStore(settings.effective_models_dir).add(write_unet_bundle(tmp_path / "lung-unet"))
    analyzer = MonaiBundleAnalyzer(settings)
    params = {"model": "lung-unet", "overlap": 0.5, "sw_batch_size": 2, "segments": LUNG_SEGMENTS}
    volume = analyzer.load(phantom, params)
    result = analyzer.analyze(volume, params)

    assert result.labels is not None and result.labels.shape == volume.voxels.shape
    assert set(np.unique(result.labels)) <= {0, 1, 2} and result.labels.any()
    assert [s.type.meaning for s in result.segments] == ["Right lung", "Left lung"]
    assert result.segments[0].recommended_display_cielab is not None
    volumes = {m.segment_number: m.value for m in result.measurements}
    for number in (1, 2):
        expected = np.count_nonzero(result.labels == number) * volume.voxel_volume_ml
        assert volumes[number] == pytest.approx(expected)
    assert result.algorithm.name == "lung-unet" and result.algorithm.version == "0.1.0"
    assert result.algorithm.family.value == "123110"
    assert result.algorithm.parameters["roi_size"] == "32x32x16"
    assert result.algorithm.parameters["overlap"] == "0.5"

    objects = dict(build_results(volume, result, key="models-test", equipment=EquipmentInfo()))
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    write_dataset(objects["SEG"], seg_path, fsync=False)
    write_dataset(objects["SR"], sr_path, fsync=False)
    assert dciodvfy_errors(seg_path) == []
    assert dsrdump(sr_path).returncode == 0

    # A label the profile does not code is coded from the bundle's own name ("right lung") by the table.
    from_table = analyzer.analyze(volume, {**params, "segments": {"2": LUNG_SEGMENTS["2"]}})
    coded = {s.label: (s.type.value, s.category.value) for s in from_table.segments}
    if 1 in set(np.unique(result.labels)):  # the untrained network's output decides which labels occur
        assert coded["Lung, right"] == ("39607008", "123037004"), coded


def test_monai_bundle_analyzer_parameter_errors(tmp_path: Path, phantom: list[Path]) -> None:
    settings = Settings(data_dir=tmp_path / "data", fsync=False)
    ModelStore(settings.effective_models_dir).add(write_torchscript_segmenter(tmp_path / "src"))
    analyzer = MonaiBundleAnalyzer(settings)
    with pytest.raises(InvalidParameters, match="no model 'nope' is registered.*registered: lung-ts"):
        analyzer.load(phantom, {"model": "nope"})
    with pytest.raises(InvalidParameters, match="overlap"):
        analyzer.load(phantom, {"model": "lung-ts", "overlap": 1.5})
    with pytest.raises(InvalidParameters, match="segments"):
        analyzer.load(phantom, {"model": "lung-ts", "segments": {"0": LUNG_SEGMENTS["1"]}})
    volume = analyzer.load(phantom, {"model": "lung-ts"})
    with pytest.raises(InvalidParameters, match="keep: 'spleen' is not a label of model lung-ts"):
        analyzer.analyze(volume, {"model": "lung-ts", "keep": ["spleen"]})
    result = analyzer.analyze(
        volume, {"model": "lung-ts", "roi_size": [48, 48, 16], "segments": LUNG_SEGMENTS}
    )
    assert result.labels is not None and result.algorithm.parameters["roi_size"] == "48x48x16"
    assert get_analyzer("monai-bundle").name == "monai-bundle"


def test_monai_bundle_analyzer_classifies_a_radiograph(tmp_path: Path) -> None:
    from pacs_ai.synthetic.radiograph import write_chest_radiograph

    settings = Settings(data_dir=tmp_path / "data", fsync=False)
    ModelStore(settings.effective_models_dir).add(write_torchscript_classifier(tmp_path / "src"))
    write_chest_radiograph(tmp_path / "cxr", rows=128, columns=128, pixel_spacing_mm=2.8)
    analyzer = MonaiBundleAnalyzer(settings)
    params = {"model": "ptx-ts", "findings": {"1": {"finding": ["SCT", "36118008", "Pneumothorax"]}}}
    volume = analyzer.load(sorted((tmp_path / "cxr").glob("*.dcm")), params)
    result = analyzer.analyze(volume, params)
    assert result.labels is None and result.segments == [] and len(result.findings) == 1
    finding = result.findings[0]
    assert finding.finding.meaning == "Pneumothorax" and 0.0 <= finding.probability <= 1.0
    assert finding.threshold == 0.5
    with pytest.raises(InvalidParameters, match="label 5 is not an output of model ptx-ts"):
        analyzer.analyze(volume, {**params, "findings": {"5": params["findings"]["1"]}})
    objects = dict(build_results(volume, result, key="cxr-test", equipment=EquipmentInfo()))
    assert set(objects) == {"SR"}
