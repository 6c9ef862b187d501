"""The models the suite trains (tests/modelzoo.py) are real MONAI bundles and are good enough to test with.

Each model is run the way its format says, with MONAI alone (not pacs-ai's
runtime): the lung bundle through its own inference.json, including loading
the DICOM series with ``LoadImaged`` and writing the result with ``SaveImaged``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    ScaleIntensityRanged,
    Spacingd,
)

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from pacs_ai.synthetic.radiograph import radiograph_pixels
from tests import modelzoo

#: Not one of the training phantoms: other seed, matrix, pixel and slice spacing.
NEW_PHANTOM = {"slices": 56, "size": 224, "pixel_spacing_mm": 1.6, "slice_spacing_mm": 5.5, "seed": 4242}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def new_phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    return write_chest_phantom(tmp_path_factory.mktemp("new-phantom"), **NEW_PHANTOM)


def parse_bundle(bundle: Path, output_dir: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = str(output_dir)
    parser["device"] = torch.device("cpu")
    return parser


def test_lung_bundle_is_standard(lung_bundle: Path) -> None:
    for name in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "LICENSE",
        "docs/README.md",
    ):
        assert (lung_bundle / name).is_file(), name
    metadata = json.loads((lung_bundle / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["format"], pred["num_channels"]) == ("image", "segmentation", 3)
    assert pred["channel_def"] == {"0": "background", "1": "right lung", "2": "left lung"}
    image = metadata["network_data_format"]["inputs"]["image"]
    assert (image["type"], image["format"], image["num_channels"]) == ("image", "hounsfield", 1)
    config = json.loads((lung_bundle / "configs" / "inference.json").read_text())
    targets = [t["_target_"] for t in config["preprocessing"]["transforms"]]
    assert targets == [
        "LoadImaged",
        "EnsureChannelFirstd",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
        "EnsureTyped",
    ]
    assert [t["_target_"] for t in config["postprocessing"]["transforms"]] == [
        "Activationsd",
        "Invertd",
        "AsDiscreted",
        "SaveImaged",
    ]


def test_lung_bundle_segments_a_new_phantom(
    lung_bundle: Path, new_phantom: PhantomTruth, tmp_path: Path
) -> None:
    """The bundle's own config, DICOM files to label file: Dice >= 0.9 per lung at source resolution."""
    parser = parse_bundle(lung_bundle, tmp_path / "eval")
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(lung_bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(new_phantom.paths[0].parent)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    data = parser.get_parsed_content("postprocessing")(data)
    predicted = np.asarray(data["pred"][0]).transpose(2, 1, 0)  # (x, y, z) -> (slice, row, column)
    assert predicted.shape == new_phantom.labels.shape
    for label in (1, 2):
        assert dice(predicted == label, new_phantom.labels == label) >= 0.9, label
    assert list((tmp_path / "eval").rglob("*.nii.gz")), "SaveImaged wrote no file"


def test_lung_torchscript_follows_its_descriptor(lung_torchscript: Path, new_phantom: PhantomTruth) -> None:
    """model.ts run as model.yaml describes (no reorientation, LoadImage layout) segments the new phantom."""
    descriptor = yaml.safe_load((lung_torchscript / "model.yaml").read_text())
    assert list(descriptor) == ["name", "version", "task", "spatial_dims", "input", "inference", "output"]
    assert descriptor["output"]["channels"] == {"0": "background", "1": "right lung", "2": "left lung"}
    network = torch.jit.load(str(lung_torchscript / "model.ts"), map_location="cpu").eval()
    spec = descriptor["input"]
    preprocessing = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Spacingd(keys="image", pixdim=spec["spacing_mm"], mode="bilinear"),
            ScaleIntensityRanged(keys="image", **spec["intensity"]),
        ]
    )
    data = preprocessing({"image": str(new_phantom.paths[0].parent)})
    inferer = SlidingWindowInferer(**descriptor["inference"])
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    data = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )(data)
    predicted = np.asarray(data["pred"][0]).transpose(2, 1, 0)
    for label in (1, 2):
        assert dice(predicted == label, new_phantom.labels == label) >= 0.9, label


def test_pneumothorax_bundle_separates_held_out_radiographs(
    pneumothorax_bundle: Path, tmp_path: Path
) -> None:
    parser = parse_bundle(pneumothorax_bundle, tmp_path)
    metadata = json.loads((pneumothorax_bundle / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["format"], pred["channel_def"]) == (
        "probabilities",
        "classification",
        {"0": "pneumothorax"},
    )
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(pneumothorax_bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    # The runtime gives the image in memory (LoadImaged's layout: x = column, y = row), so skip LoadImaged.
    preprocessing = Compose(parser.get_parsed_content("preprocessing").transforms[1:])
    postprocessing = parser.get_parsed_content("postprocessing")
    probabilities: dict[bool, list[float]] = {True: [], False: []}
    for i in range(16):
        pneumothorax = i % 2 == 0
        pixels = radiograph_pixels(seed=90_000 + i, pneumothorax=pneumothorax, rows=400 + 16 * i, columns=400)
        # As LoadImage gives it: no channel axis yet, which EnsureChannelFirstd reads from the metadata.
        image = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(pixels.T)), meta={"original_channel_dim": math.nan}
        )
        data = preprocessing({"image": image})
        with torch.no_grad():
            data["pred"] = network(data["image"][None])[0]
        probabilities[pneumothorax].append(float(postprocessing(data)["pred"][0]))
    assert min(probabilities[True]) > 0.8, probabilities
    assert max(probabilities[False]) < 0.2, probabilities


def test_broken_bundle_names_the_missing_class(broken_bundle: Path, tmp_path: Path) -> None:
    parser = parse_bundle(broken_bundle, tmp_path)
    with pytest.raises(Exception, match=modelzoo.MISSING_NETWORK_CLASS):
        parser.get_parsed_content("network_def")


def test_failing_bundle_loads_but_fails_on_a_chest_ct(
    failing_bundle: Path, new_phantom: PhantomTruth, tmp_path: Path
) -> None:
    parser = parse_bundle(failing_bundle, tmp_path)
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(failing_bundle / "models" / "model.pt", weights_only=True))
    inferer = parser.get_parsed_content("inferer")
    # A smoke input like `pacs-ai models verify` uses (noise, mostly padding) runs.
    with torch.no_grad():
        assert inferer(torch.rand(1, 1, 13, 13, 13), network).shape == (1, 3, 13, 13, 13)
    data = parser.get_parsed_content("preprocessing")({"image": str(new_phantom.paths[0].parent)})
    # TorchScript re-raises as torch.jit.Error, whose message carries the RuntimeError and its text.
    with pytest.raises(Exception, match=modelzoo.FAILURE_MESSAGE):
        inferer(data["image"][None], network)
