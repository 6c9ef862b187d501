"""The ct-chest-lung analyzer against the chest phantom's ground truth, plus refusals and the registry.

Two phantoms: the default one (trachea above the apices, main bronchi joining
the lungs), and one with gas below the diaphragm (stomach bubble under the left
lung base, colon gas under the right) on 8 mm slices, where the gas lies in
the slice directly below lung and so touches it in 3D.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from scipy import ndimage

from pacs_ai.analyze.base import AnalysisRefused, AnalysisResult, InvalidParameters
from pacs_ai.analyze.lung import CtChestLungAnalyzer, LungParams
from pacs_ai.analyze.registry import UnknownAnalyzerError, available_analyzers, get_analyzer
from pacs_ai.analyze.volume import Volume, load_series
from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom

VOLUME, MEAN_ATTENUATION = "118565006", "112031"
RIGHT_LUNG, LEFT_LUNG, LUNG = "3341006", "44029006", "39607008"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    return write_chest_phantom(tmp_path_factory.mktemp("phantom"), slices=60, size=192)


@pytest.fixture(scope="module")
def volume(phantom: PhantomTruth) -> Volume:
    return load_series(phantom.paths)


@pytest.fixture(scope="module")
def result(volume: Volume) -> AnalysisResult:
    return CtChestLungAnalyzer().analyze(volume, {})


def value(result: AnalysisResult, code: str, segment: int | None) -> float:
    (found,) = [m.value for m in result.measurements if m.name.value == code and m.segment_number == segment]
    return found


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_lung_volumes_match_the_truth(phantom: PhantomTruth, result: AnalysisResult) -> None:
    assert value(result, VOLUME, 1) == pytest.approx(phantom.right_lung_ml, rel=0.01)
    assert value(result, VOLUME, 2) == pytest.approx(phantom.left_lung_ml, rel=0.01)
    assert value(result, VOLUME, None) == pytest.approx(phantom.total_lung_ml, rel=0.01)


def test_no_lung_on_slices_with_trachea_only(
    phantom: PhantomTruth, volume: Volume, result: AnalysisResult
) -> None:
    assert len(phantom.airway_only_slices) >= 3
    for k in phantom.airway_only_slices:
        assert np.count_nonzero(volume.voxels[k] < -950) > 0  # the trachea is there (and air outside)
        assert np.count_nonzero(result.labels[k]) == 0, k


@pytest.fixture(scope="module")
def gas_phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    return write_chest_phantom(
        tmp_path_factory.mktemp("gas-phantom"),
        slices=30,
        size=192,
        pixel_spacing_mm=1.5,
        slice_spacing_mm=8.0,
        seed=7,
        abdominal_gas=True,
    )


@pytest.fixture(scope="module")
def gas_volume(gas_phantom: PhantomTruth) -> Volume:
    return load_series(gas_phantom.paths)


@pytest.fixture(scope="module")
def gas_result(gas_volume: Volume) -> AnalysisResult:
    return CtChestLungAnalyzer().analyze(gas_volume, {})


def test_abdominal_gas_touches_the_lungs_in_the_phantom(
    gas_phantom: PhantomTruth, gas_volume: Volume
) -> None:
    """The case the analyzer must handle: gas below the diaphragm joins lung in 3D (below -400 HU)."""
    assert gas_phantom.abdominal_gas_ml > 30
    low = gas_volume.voxels < -400
    components, _ = ndimage.label(low)
    for label in (1, 2):
        lung = components[gas_phantom.labels == label]
        lung_component = np.bincount(lung).argmax()
        below = np.flatnonzero(gas_phantom.labels.any(axis=(1, 2)))[0]
        assert np.any(components[below - 1][low[below - 1]] == lung_component), label


def test_gas_below_the_diaphragm_is_not_lung(gas_phantom: PhantomTruth, gas_result: AnalysisResult) -> None:
    assert value(gas_result, VOLUME, 1) == pytest.approx(gas_phantom.right_lung_ml, rel=0.01)
    assert value(gas_result, VOLUME, 2) == pytest.approx(gas_phantom.left_lung_ml, rel=0.01)
    assert value(gas_result, VOLUME, None) == pytest.approx(gas_phantom.total_lung_ml, rel=0.01)
    outside = (gas_result.labels > 0) & (gas_phantom.labels == 0)
    assert np.count_nonzero(outside) * gas_phantom.voxel_volume_ml < 0.5  # mL
    below_the_lungs = np.flatnonzero(gas_phantom.labels.any(axis=(1, 2)))[0]
    assert np.count_nonzero(gas_result.labels[:below_the_lungs]) == 0
    assert any(note.startswith("gas: ") and "removed" in note for note in gas_result.notes)


def test_gas_phantom_keeps_trachea_out_and_densities_right(
    gas_phantom: PhantomTruth, gas_result: AnalysisResult
) -> None:
    assert gas_phantom.airway_only_slices
    for k in gas_phantom.airway_only_slices:
        assert np.count_nonzero(gas_result.labels[k]) == 0, k
    for label in (1, 2):
        assert dice(gas_result.labels == label, gas_phantom.labels == label) >= 0.97
        assert -880 < value(gas_result, MEAN_ATTENUATION, label) < -840


def test_segmentation_overlaps_the_truth(phantom: PhantomTruth, result: AnalysisResult) -> None:
    assert result.labels.shape == phantom.labels.shape
    assert result.labels.dtype == np.uint8
    for label in (1, 2):
        assert dice(result.labels == label, phantom.labels == label) >= 0.95


def test_right_lung_is_on_the_patients_right(volume: Volume, result: AnalysisResult) -> None:
    # LPS: the patient's right is -x.  Checked in patient coordinates, independently of the truth labels.
    xs = {}
    for label in (1, 2):
        columns = np.nonzero(result.labels == label)[2]
        xs[label] = volume.patient_position((0.0, 0.0, float(columns.mean())))[0]
    assert xs[1] < 0 < xs[2]


def test_laa950_matches_the_truth(phantom: PhantomTruth, result: AnalysisResult) -> None:
    assert value(result, "LAA950", 1) == pytest.approx(phantom.right_laa950_percent, abs=1.5)
    assert value(result, "LAA950", 2) == pytest.approx(phantom.left_laa950_percent, abs=1.5)


def test_density_values_are_plausible(result: AnalysisResult) -> None:
    # Lung at -850 HU with 5% emphysema at -980 HU and 15 HU noise.
    for segment in (1, 2, None):
        assert -880 < value(result, MEAN_ATTENUATION, segment) < -840
        assert -890 < value(result, "PERC15", segment) < -850


def test_result_is_described_with_the_agreed_codes(result: AnalysisResult) -> None:
    assert [(s.number, s.type.value, s.category.value) for s in result.segments] == [
        (1, RIGHT_LUNG, "91723000"),
        (2, LEFT_LUNG, "91723000"),
    ]
    assert all(s.recommended_display_cielab is not None for s in result.segments)
    assert len(result.measurements) == 12
    sites = {(m.segment_number, m.finding_site.value) for m in result.measurements}
    assert sites == {(1, RIGHT_LUNG), (2, LEFT_LUNG), (None, LUNG)}
    units = {m.name.value: m.unit.value for m in result.measurements}
    assert units == {VOLUME: "mL", MEAN_ATTENUATION: "[hnsf'U]", "LAA950": "%", "PERC15": "[hnsf'U]"}
    mean = next(m for m in result.measurements if m.name.value == MEAN_ATTENUATION)
    assert mean.derivation is not None and mean.derivation.value == "373098007"
    local = {m.name.scheme for m in result.measurements if m.name.value in ("LAA950", "PERC15")}
    assert local == {"99PACSAI"}
    assert result.algorithm.name == "pacs-ai CT chest lung" and result.algorithm.version == "1.1.0"
    assert result.algorithm.family.value == "123104"
    assert result.algorithm.parameters["lung_threshold_hu"] == "-400"
    assert any(note.startswith("airway: trachea seed") for note in result.notes)


def test_labels_follow_patient_coordinates_not_array_layout(phantom: PhantomTruth, volume: Volume) -> None:
    """The same anatomy stored mirrored (row cosine -x) and in reverse slice order gives the same lungs."""
    voxels = np.ascontiguousarray(volume.voxels[::-1, :, ::-1])
    last = volume.patient_position((volume.voxels.shape[0] - 1, 0, volume.voxels.shape[2] - 1))
    mirrored = Volume(
        voxels=voxels,
        spacing_mm=volume.spacing_mm,
        origin_mm=(float(last[0]), float(last[1]), float(last[2])),
        direction=np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]]),
        headers=volume.headers[::-1],
        paths=volume.paths[::-1],
    )
    labels = CtChestLungAnalyzer().analyze(mirrored, {}).labels
    expected = phantom.labels[::-1, :, ::-1]
    for label in (1, 2):
        assert dice(labels == label, expected == label) >= 0.95


def test_touching_lungs_are_split(phantom: PhantomTruth, volume: Volume) -> None:
    # An airway threshold below any value finds no trachea, so trachea and bronchi join the lungs into
    # one region, which must be split by erosion.
    split = CtChestLungAnalyzer().analyze(volume, {"airway_threshold_hu": -1100})
    assert any("separated by erosion" in note for note in split.notes)
    for label in (1, 2):
        assert dice(split.labels == label, phantom.labels == label) >= 0.95


def ct_header() -> Dataset:
    header = Dataset()
    header.Modality = "CT"
    header.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    return header


def synthetic_volume(voxels: np.ndarray, header: Dataset | None = None) -> Volume:
    return Volume(
        voxels=voxels,
        spacing_mm=(5.0, 1.5, 1.5),
        origin_mm=(-150.0, -150.0, 0.0),
        direction=np.eye(3),
        headers=[header or ct_header()] * voxels.shape[0],
        paths=[Path(f"{i}.dcm") for i in range(voxels.shape[0])],
    )


def water_cylinder(slices: int = 20, size: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    voxels = np.full((slices, size, size), -1000, dtype=np.int16)
    voxels[:, body] = 0
    return voxels


def test_volume_without_lungs_is_refused() -> None:
    with pytest.raises(AnalysisRefused, match="no lung-density region larger than 100 mL"):
        CtChestLungAnalyzer().analyze(synthetic_volume(water_cylinder()), {})


def test_empty_field_of_view_is_refused() -> None:
    with pytest.raises(AnalysisRefused, match="no body found"):
        CtChestLungAnalyzer().analyze(synthetic_volume(np.full((5, 50, 50), -1000, dtype=np.int16)), {})


def test_single_lung_is_refused_with_its_side() -> None:
    voxels = water_cylinder()
    voxels[2:18, 70:130, 40:90] = -850  # columns 40..90: x < 0, the patient's right
    with pytest.raises(AnalysisRefused, match="only one lung region found .* patient's right"):
        CtChestLungAnalyzer().analyze(synthetic_volume(voxels), {})


def test_non_ct_is_refused() -> None:
    header = Dataset()
    header.Modality = "MR"
    with pytest.raises(AnalysisRefused, match="modality is MR"):
        CtChestLungAnalyzer().analyze(synthetic_volume(water_cylinder(), header), {})


def test_non_axial_slices_are_refused() -> None:
    sagittal = synthetic_volume(water_cylinder())
    sagittal.direction = np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]])
    with pytest.raises(AnalysisRefused, match="off axial"):
        CtChestLungAnalyzer().analyze(sagittal, {})


def test_parameters_are_validated() -> None:
    assert LungParams.from_params({"lung_threshold_hu": "-500"}).lung_threshold_hu == -500.0
    with pytest.raises(InvalidParameters, match="unknown ct-chest-lung parameter"):
        LungParams.from_params({"treshold": -400})
    with pytest.raises(InvalidParameters, match="must be a number"):
        LungParams.from_params({"min_lung_ml": "a lot"})


def test_registry_knows_the_lung_analyzer() -> None:
    assert "ct-chest-lung" in available_analyzers()
    analyzer = get_analyzer("ct-chest-lung")
    assert (analyzer.name, analyzer.version) == ("ct-chest-lung", "1.1.0")


def test_registry_names_known_analyzers_for_an_unknown_name() -> None:
    with pytest.raises(KeyError) as error:
        get_analyzer("ct-brain")
    assert isinstance(error.value, UnknownAnalyzerError)
    assert "unknown analyzer 'ct-brain'" in str(error.value) and "ct-chest-lung" in str(error.value)
