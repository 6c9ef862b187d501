"""Hospital models through the whole pipeline: registered with ``pacs-ai models``, run by the ``monai-bundle``
analyzer on studies sent by DICOM, results back in the PACS (Orthanc).

The models are trained by the suite itself (``tests/modelzoo.py``, session fixtures in
``tests/conftest.py``) because no weights can be downloaded: a 3D UNet lung bundle, the same network
as TorchScript with a YAML descriptor, a 2D pneumothorax classifier bundle, a bundle that cannot be
instantiated and one whose network raises on real input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from pacs_ai.synthetic.radiograph import write_chest_radiograph
from tests import modelzoo
from tests.e2e.conftest import orthanc_destination
from tests.e2e.test_chest_ct_roundtrip import DRAFT_REPORT_SR
from tests.peers import OrthancServer, dciodvfy_errors, dsrdump, storescu, wait_for
from tests.sr_reading import measurements, volume_ml

pytestmark = pytest.mark.e2e

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RIGHT_LUNG, LEFT_LUNG, PNEUMOTHORAX = "3341006", "44029006", "36118008"


def ct_profile(name: str, model: str) -> str:
    """A chest CT profile running ``model`` with the agreed lung segment descriptions."""
    return f"""
name: {name}
match: {{modality: [CT], min_instances: 10}}
analyzers:
  - name: monai-bundle
    queue: gpu
    params:
      model: {model}
      segments:
        "1": {{label: "Right lung", category: [SCT, "123037004", "Anatomical Structure"],
              type: [SCT, "3341006", "Right lung"]}}
        "2": {{label: "Left lung", category: [SCT, "123037004", "Anatomical Structure"],
              type: [SCT, "44029006", "Left lung"]}}
destinations: [pacs]
"""


PNEUMOTHORAX_PROFILE = """
name: cxr-pneumothorax
match: {modality: [DX, CR]}
analyzers:
  - name: monai-bundle
    queue: gpu
    params:
      model: cxr-ptx
      findings:
        "0": {finding: [SCT, "36118008", "Pneumothorax"], threshold: 0.5}
    priority: [{finding: "36118008", above: 0.8, set: STAT}]
destinations: [pacs]
"""

#: Not one of the training phantoms: other seed, matrix and spacings.
NEW_PHANTOM = {"slices": 52, "size": 240, "pixel_spacing_mm": 1.5, "slice_spacing_mm": 6.0, "seed": 777}


def write_profiles(directory: Path, profiles: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in profiles.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


def add_model(service: Any, path: Path, name: str) -> None:
    added = service.cli("models", "add", str(path), "--name", name, "--json")
    assert added.returncode == 0, added.stdout + added.stderr


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def codes_in(sr: Dataset) -> set[str]:
    """Every code value used anywhere in the SR content tree (concept names and values)."""
    found: set[str] = set()

    def walk(items: Any) -> None:
        for item in items:
            for attribute in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                if attribute in item:
                    found.add(str(item[attribute][0].CodeValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def downloaded_results(
    orthanc: OrthancServer, study_uid: str, into: Path, segs: int, srs: int
) -> dict[str, list[Path]]:
    """Wait until the study holds ``segs`` SEG and ``srs`` SR instances in Orthanc; download them.

    The SR counted are the analysis results (TID 1500 and findings), not report drafts.
    """

    def ready() -> dict[str, list[str]] | None:
        found: dict[str, list[str]] = {"SEG": [], "SR": []}
        for series in orthanc.series_of_study(study_uid):
            kind = (
                "SEG"
                if SEG_STORAGE in series["SOPClassUIDs"]
                else (
                    "SR"
                    if any(
                        uid.startswith("1.2.840.10008.5.1.4.1.1.88.") and uid != DRAFT_REPORT_SR
                        for uid in series["SOPClassUIDs"]
                    )
                    else None
                )
            )
            if kind:
                found[kind] += series["Instances"]
        return found if len(found["SEG"]) >= segs and len(found["SR"]) >= srs else None

    found = wait_for(ready, timeout=240, interval=0.5, description=f"{segs} SEG and {srs} SR in Orthanc")
    assert (len(found["SEG"]), len(found["SR"])) == (segs, srs), found
    into.mkdir(parents=True, exist_ok=True)
    return {
        kind: [orthanc.download_instance(uid, into / f"{kind}-{i}.dcm") for i, uid in enumerate(uids)]
        for kind, uids in found.items()
    }


def seg_labels(seg_path: Path, phantom: PhantomTruth) -> np.ndarray:
    """The SEG as a (slice, row, column) label map on the phantom's grid: 1 right lung, 2 left lung."""
    seg = hd.seg.segread(seg_path)
    types = {
        int(item.SegmentNumber): str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for item in seg.SegmentSequence
    }
    source_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom.paths]
    labels = np.zeros(phantom.labels.shape, dtype=np.uint8)
    for number, code in types.items():
        value = {RIGHT_LUNG: 1, LEFT_LUNG: 2}[code]
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
        )
        labels[np.asarray(mask)[..., 0] > 0] = value
    return labels


def test_lung_bundle_and_torchscript_model_segment_a_new_phantom(
    lung_bundle: Path, lung_torchscript: Path, orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    profiles = write_profiles(
        tmp_path / "profiles",
        {"bundle": ct_profile("ct-lung-model", "lung-unet"), "ts": ct_profile("ct-lung-ts", "lung-ts")},
    )
    service = service_factory(profiles_dir=profiles, destinations=orthanc_destination(orthanc))
    add_model(service, lung_bundle, "lung-unet")
    add_model(service, lung_torchscript / "model.ts", "lung-ts")
    listed = service.cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"lung-unet", "lung-ts"} <= {row["name"] for row in json.loads(listed.stdout)}

    phantom = write_chest_phantom(tmp_path / "phantom", **NEW_PHANTOM)
    sent = storescu("127.0.0.1", service.port, service.ae_title, phantom.paths, calling_aet="CT_SCANNER")
    assert sent.returncode == 0, sent.stderr

    results = downloaded_results(orthanc, phantom.study_uid, tmp_path / "results", segs=2, srs=2)
    for seg_path in results["SEG"]:
        assert dciodvfy_errors(seg_path) == []
        labels = seg_labels(seg_path, phantom)
        for value in (1, 2):
            assert dice(labels == value, phantom.labels == value) >= 0.9, (seg_path, value)
    for sr_path in results["SR"]:
        assert dciodvfy_errors(sr_path) == []
        assert dsrdump(sr_path).returncode == 0
        sr = pydicom.dcmread(sr_path)
        assert volume_ml(sr, RIGHT_LUNG) == pytest.approx(phantom.right_lung_ml, rel=0.08)
        assert volume_ml(sr, LEFT_LUNG) == pytest.approx(phantom.left_lung_ml, rel=0.08)
    jobs = service.query("SELECT state, error FROM jobs")
    assert sorted(jobs) == [("SUCCEEDED", None), ("SUCCEEDED", None)]


def test_pneumothorax_classifier_reports_the_finding_and_raises_the_study_priority(
    pneumothorax_bundle: Path, orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    profiles = write_profiles(tmp_path / "profiles", {"cxr": PNEUMOTHORAX_PROFILE})
    service = service_factory(profiles_dir=profiles, destinations=orthanc_destination(orthanc))
    add_model(service, pneumothorax_bundle, "cxr-ptx")

    radiograph = write_chest_radiograph(
        tmp_path / "cxr.dcm",
        seed=424242,
        pneumothorax=True,
        rows=640,
        columns=576,
        photometric_interpretation="MONOCHROME1",
        patient_id="CXR-E2E",
        accession_number="ACCX-E2E",
    )
    sent = storescu("127.0.0.1", service.port, service.ae_title, [radiograph.path], calling_aet="DX_ROOM")
    assert sent.returncode == 0, sent.stderr

    results = downloaded_results(orthanc, radiograph.study_uid, tmp_path / "results", segs=0, srs=1)
    (sr_path,) = results["SR"]
    assert dciodvfy_errors(sr_path) == []
    assert dsrdump(sr_path).returncode == 0
    sr = pydicom.dcmread(sr_path)
    assert PNEUMOTHORAX in codes_in(sr)
    probabilities = [m.value for m in measurements(sr) if m.unit == "{probability}"]
    assert len(probabilities) == 1 and probabilities[0] > 0.8, probabilities

    studies = service.cli("studies", "list", "--json")
    assert studies.returncode == 0, studies.stderr
    rows = [
        row for row in json.loads(studies.stdout) if row.get("study_instance_uid") == radiograph.study_uid
    ]
    assert len(rows) == 1, studies.stdout
    assert rows[0]["ai_priority"] == "STAT", rows[0]


def test_broken_and_failing_models_are_reported_and_the_worker_carries_on(
    lung_bundle: Path,
    broken_bundle: Path,
    failing_bundle: Path,
    orthanc: OrthancServer,
    service_factory: Any,
    tmp_path: Path,
) -> None:
    profiles = write_profiles(
        tmp_path / "profiles",
        {
            "failing": ct_profile("ct-lung-failing", "lung-failing"),
            "good": ct_profile("ct-lung-model", "lung-unet"),
        },
    )
    service = service_factory(profiles_dir=profiles, destinations=orthanc_destination(orthanc))

    # A network class that does not exist: refused at registration or by verify, naming the class.
    added = service.cli("models", "add", str(broken_bundle), "--name", "lung-broken")
    if added.returncode == 0:
        verified = service.cli("models", "verify", "lung-broken")
        assert verified.returncode == 1, verified.stdout + verified.stderr
        assert modelzoo.MISSING_NETWORK_CLASS in verified.stdout + verified.stderr
    else:
        assert added.returncode == 1
        assert modelzoo.MISSING_NETWORK_CLASS in added.stdout + added.stderr

    # A model that verifies but raises on a real study.
    add_model(service, failing_bundle, "lung-failing")
    verified = service.cli("models", "verify", "lung-failing")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    add_model(service, lung_bundle, "lung-unet")

    phantom = write_chest_phantom(tmp_path / "phantom", **NEW_PHANTOM)
    sent = storescu("127.0.0.1", service.port, service.ae_title, phantom.paths)
    assert sent.returncode == 0, sent.stderr

    wait_for(
        lambda: len(service.query("SELECT id FROM jobs WHERE state IN ('FAILED', 'SUCCEEDED')")) == 2,
        timeout=240,
        description="both jobs to finish",
    )
    failed = service.cli("jobs", "list", "--state", "failed", "--json")
    assert failed.returncode == 0, failed.stderr
    rows = json.loads(failed.stdout)
    assert len(rows) == 1, failed.stdout
    assert modelzoo.FAILURE_MESSAGE in json.dumps(rows[0]), rows[0]
    states = sorted(state for (state,) in service.query("SELECT state FROM jobs"))
    assert states == ["FAILED", "SUCCEEDED"]

    # The good model's results arrived, and the worker still takes work.
    downloaded_results(orthanc, phantom.study_uid, tmp_path / "results", segs=1, srs=1)
    status = service.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["workers_ready"], status.stdout
