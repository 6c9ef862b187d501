"""The published MONAI Model Zoo bundles as pacs-ai reads them: references resolved by MONAI's ConfigParser,
labels coded from their metadata, detection boxes placed on the patient, profiles checked against them.

The bundles are read in place from ``../shared/data/monai-model-zoo`` (skipped when absent); where weights
are needed, a temporary copy gets random weights of its own ``network_def`` (tests/zoo_bundles.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.sr._concepts_dict import concepts
from scipy import ndimage

from pacs_ai.analyze.base import AlgorithmInfo, AnalysisResult, Code
from pacs_ai.analyze.volume import Volume
from pacs_ai.encode.results import titles
from pacs_ai.models.boxes import layout_of, patient_boxes
from pacs_ai.models.bundle import open_bundle
from pacs_ai.models.engine import load_registered
from pacs_ai.models.geometry import volume_to_metatensor
from pacs_ai.models.labels import code_for, is_background, label_table
from pacs_ai.models.loaded import TransformFailed, run_transforms
from pacs_ai.models.store import ModelStore
from pacs_ai.models.verify import verify_model
from tests.integration.test_cli import pacs_ai_in_process as pacs_ai
from tests.zoo_bundles import BUNDLES, published, runnable_copy

CPU = torch.device("cpu")


def _dicom_meanings() -> dict[str, set[str]]:
    """SNOMED CT code value -> meanings, as the DICOM standard (PS3.16) lists them (pydicom's copy)."""
    meanings: dict[str, set[str]] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, _cids) in entries.items():
            meanings.setdefault(value, set()).add(meaning)
    return meanings


def test_label_table_codes_are_the_dicom_standards_where_it_lists_them() -> None:
    dicom = _dicom_meanings()
    rows = set(label_table().values())
    assert len(rows) > 100
    for code in rows:
        assert code.source in ("DICOM", "TotalSegmentator"), code
        scheme, value, meaning = code.type
        assert scheme == "SCT" and value.isdigit(), code
        if code.source == "DICOM":
            assert meaning in dicom.get(value, set()), f"{code.type} is not a DICOM SNOMED CT concept"
        for other in (code.category, code.modifier):
            if other is not None:
                assert other[1] in dicom, f"{other} is not a DICOM SNOMED CT concept"


def _label_names(bundle: Path) -> tuple[str, list[str]]:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    names = [str(n) for n in (pred.get("channel_def") or {}).values() if not is_background(str(n))]
    if pred["type"] == "object":  # detection: unnamed classes 0..num_channels-1
        names = [str(i) for i in range(int(pred["num_channels"]))]
    return metadata["name"], names


@pytest.mark.parametrize("name", BUNDLES)
def test_every_label_of_the_published_bundles_is_coded(name: str) -> None:
    model, names = _label_names(published(name))
    assert names
    uncoded = [label for label in names if code_for(label, model) is None]
    assert uncoded == [], f"{name}: no code for {uncoded}"
    for label in names:
        code = code_for(label, model)
        assert code is not None and "<" not in "".join(code.type)


def test_published_config_references_resolve_and_the_bundle_verifies(tmp_path: Path) -> None:
    bundle = runnable_copy("spleen_ct_segmentation", tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["preprocessing"]["transforms"][0]["keys"] == "@image_key"  # as published
    registered = ModelStore(tmp_path / "models").add(bundle, "spleen")
    report = verify_model(registered, CPU)
    assert report.ok, report.as_dict()
    loaded = load_registered(registered, CPU)
    assert loaded.image_key == "image" and loaded.title == "Spleen CT segmentation"
    assert loaded.channel_names == {0: "background", 1: "spleen"}

    # A transform that fails is named, with its key and the real cause (not "<... object at 0x..>").
    # (The image under another key: what the old reading of the raw "@image_key" did.)
    image = volume_to_metatensor(_volume(np.zeros((4, 8, 8), np.float32)), 3)
    with pytest.raises(TransformFailed) as failure:
        run_transforms(loaded.preprocessing, {"@image_key": image}, "preprocessing")  # type: ignore[arg-type]
    message = str(failure.value)
    assert "preprocessing transform EnsureChannelFirstd on key(s) image failed: KeyError" in message, message
    assert "object at 0x" not in message


def _volume(voxels: np.ndarray, direction: np.ndarray | None = None, **geometry: object) -> Volume:
    return Volume(
        voxels=voxels,
        spacing_mm=geometry.get("spacing_mm", (1.0, 1.0, 1.0)),  # type: ignore[arg-type]
        origin_mm=geometry.get("origin_mm", (0.0, 0.0, 0.0)),  # type: ignore[arg-type]
        direction=np.eye(3) if direction is None else direction,
        headers=[],
        paths=[],
    )


def test_detection_boxes_come_back_in_patient_coordinates() -> None:
    """Known nodules, found in the bundle's own prepared image, through its postprocessing to LPS."""
    # Columns run towards +y, rows towards +x, slices towards -z (feet first): nothing lines up with RAS.
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    spacing, origin = (2.5, 1.2, 0.8), (10.0, -30.0, 50.0)
    voxels = np.full((20, 60, 70), -850.0, dtype=np.float32)
    volume = _volume(voxels, direction, spacing_mm=spacing, origin_mm=origin)
    # The volume spans x 10..80.8, y -30..25.2, z 2.5..50 mm.
    nodules = [((30.0, 12.0, 30.0), 5.0), ((50.0, -8.0, 15.0), 4.0)]  # centre (LPS mm), radius
    index = np.stack(np.meshgrid(*(np.arange(n) for n in voxels.shape), indexing="ij"), axis=-1)
    steps = (direction * np.asarray(spacing)[::-1, None])[[2, 1, 0]]  # per (slice, row, column) step, mm
    positions = np.asarray(origin) + index @ steps
    assert np.allclose(positions[3, 4, 5], volume.patient_position((3, 4, 5)))
    for centre, radius in nodules:
        voxels[np.linalg.norm(positions - np.asarray(centre), axis=-1) <= radius] = 30.0

    bundle = open_bundle(published("lung_nodule_ct_detection"), CPU)
    preprocessing, postprocessing = bundle.section("preprocessing"), bundle.section("postprocessing")
    prepared = run_transforms(preprocessing, {bundle.image_key: volume_to_metatensor(volume, 3)}, "pre")
    image = prepared[bundle.image_key]
    blobs, count = ndimage.label(np.asarray(image[0]) > 0.5)
    assert count == 2
    boxes = np.array(
        [[s.start for s in found] + [s.stop - 1 for s in found] for found in ndimage.find_objects(blobs)],
        dtype=np.float32,
    )  # xyzxyz through the voxel centres at each blob's ends, in the prepared image's index space

    data = {"box": torch.as_tensor(boxes), "label": torch.zeros(2), "label_scores": torch.tensor([0.9, 0.7])}
    output = run_transforms(postprocessing, {**data, bundle.image_key: image}, "post")
    layout = layout_of(None, postprocessing)
    assert (layout.mode, layout.space) == ("cccwhd", "LPS")  # what the published config declares
    found = patient_boxes({k: np.asarray(v) for k, v in output.items() if k != "image"}, layout)
    boxes_by_centre = sorted((tuple(np.add(b.box_min_mm, b.box_max_mm) / 2), b) for b in found)
    for (centre, radius), (got, box) in zip(sorted(nodules), boxes_by_centre, strict=True):
        assert np.allclose(got, centre, atol=1.3), (got, centre)
        # Through the centres of the outermost voxels: the diameter less up to one voxel per axis.
        size = np.subtract(box.box_max_mm, box.box_min_mm)
        assert np.all(size <= 2 * radius) and np.all(size >= 2 * radius - 2 * 2.5), (size, radius)


def test_titles_name_the_model() -> None:
    algorithm = AlgorithmInfo("spleen", "0.5.9", Code("123110", "DCM", "Artificial Intelligence"))
    result = AnalysisResult(algorithm, np.zeros((1, 1, 1), np.uint8), [], [], title="Spleen CT segmentation")
    assert titles(result) == (
        "AI Spleen CT segmentation (unverified)",
        "AI Spleen CT segmentation measurements (unverified)",
    )
    long = AnalysisResult(algorithm, None, [], [], title="A very long model name " * 4)
    assert all(len(title) <= 64 and title.endswith("(unverified)") for title in titles(long))


def test_profiles_validate_checks_models_labels_and_codes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bundle = runnable_copy("spleen_ct_segmentation", tmp_path)
    added = pacs_ai("models", "add", str(bundle), "--name", "spleen", PACS_AI_DATA_DIR=str(data))
    assert added.returncode == 0, added.stdout + added.stderr
    labels = pacs_ai("models", "labels", "spleen", "--json", PACS_AI_DATA_DIR=str(data))
    assert json.loads(labels.stdout) == [
        {
            "value": 1,
            "name": "spleen",
            "label": "Spleen",
            "type": ["SCT", "78961009", "Spleen"],
            "category": ["SCT", "123037004", "Anatomical Structure"],
            "source": "DICOM",
        }
    ], labels.stdout + labels.stderr
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    step = "analyzers: [{{name: monai-bundle, params: {params}}}]"
    cases = {
        "good": "{model: spleen}",
        "unregistered": "{model: liver-model}",
        "placeholder": '{model: spleen, segments: {"1": {type: [SCT, "<code>", "Spleen"]}}}',
        "unknown-label": "{model: spleen, keep: [liver]}",
        "not-an-output": '{model: spleen, segments: {"2": {label: Liver}}}',
        "no-model": "{segments: {}}",
    }
    for name, params in cases.items():
        (profiles / f"{name}.yaml").write_text(
            f"name: {name}\nmatch: {{modality: [CT]}}\n" + step.format(params=params) + "\n"
        )
    result = pacs_ai("profiles", "validate", str(profiles), "--json", PACS_AI_DATA_DIR=str(data))
    assert result.returncode == 1, result.stdout + result.stderr
    problems = json.loads(result.stdout)["problems"]
    by_profile = {name: [p for p in problems if p.startswith(f"{name}:")] for name in cases}
    assert by_profile["good"] == []
    assert "no model 'liver-model' is registered" in by_profile["unregistered"][0]
    assert "not a code" in by_profile["placeholder"][0]
    assert "keep: 'liver' is not a label of model spleen" in by_profile["unknown-label"][0]
    assert "label 2 is not an output of model spleen" in by_profile["not-an-output"][0]
    assert "model: Field required" in by_profile["no-model"][0]


def test_torchscript_descriptor_orientation_is_applied_and_inverted() -> None:
    """``input.orientation`` reorients what the network receives, and the prediction comes back unchanged."""
    import nibabel

    from pacs_ai.models.descriptor import TorchScriptDescriptor
    from pacs_ai.models.loaded import PRED_KEY
    from pacs_ai.models.torchscript import IMAGE_KEY, build_transforms

    descriptor = TorchScriptDescriptor.model_validate(
        {
            "name": "oriented",
            "version": "1",
            "task": "segmentation",
            "spatial_dims": 3,
            "input": {"spatial_shape": [8, 8, 8], "orientation": "RAS"},
            "output": {"channels": {"0": "background", "1": "spleen"}},
        }
    )
    # A feet-first series with transposed rows and columns: its array axes are not R, A, S.
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    voxels = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    volume = _volume(voxels, direction, spacing_mm=(2.0, 1.0, 1.0))
    image = volume_to_metatensor(volume, 3, channel_first=True)
    assert nibabel.aff2axcodes(np.asarray(image.affine)) != ("R", "A", "S")
    preprocessing, postprocessing = build_transforms(descriptor)
    prepared = preprocessing({IMAGE_KEY: image})[IMAGE_KEY]  # type: ignore[operator]
    assert nibabel.aff2axcodes(np.asarray(prepared.affine)) == ("R", "A", "S")
    # A "network" output that is the input itself: after inversion it must lie on the input grid again.
    prediction = torch.cat([1 - prepared / prepared.max(), prepared / prepared.max()])
    restored = postprocessing({IMAGE_KEY: prepared, PRED_KEY: prediction})[PRED_KEY]  # type: ignore[operator]
    assert tuple(restored.shape[1:]) == tuple(image.shape[1:])
    expected = (np.asarray(image[0]) / voxels.max()) >= 0.5
    assert np.array_equal(np.asarray(restored[0]).astype(bool), expected)


def test_published_classifier_preprocessing_takes_a_grey_radiograph(tmp_path: Path) -> None:
    """breast_density_classification expects a colour image (EnsureChannelFirstd(channel_dim=2)): a grey
    radiograph is handed over as LoadImage gives one, with the grey values repeated in a last axis."""
    from pacs_ai.analyze.radiograph import load_radiograph
    from pacs_ai.synthetic.radiograph import write_chest_radiograph

    bundle = open_bundle(published("breast_density_classification"), CPU)
    metadata = bundle.metadata["network_data_format"]["inputs"]["image"]
    assert metadata["num_channels"] == 3 and bundle.image_key == "image"
    truth = write_chest_radiograph(tmp_path / "cxr.dcm", rows=200, columns=160, pixel_spacing_mm=2.0)
    radiograph = load_radiograph([truth.path])
    image = volume_to_metatensor(radiograph, 2, channels=metadata["num_channels"])
    prepared = run_transforms(bundle.section("preprocessing"), {"image": image}, "preprocessing")["image"]
    assert tuple(prepared.shape) == (3, 299, 299)
    assert torch.equal(prepared[0], prepared[1]) and torch.equal(prepared[1], prepared[2])
    assert float(prepared.min()) >= 0.0 and float(prepared.max()) <= 1.0
