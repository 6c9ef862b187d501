"""The published MONAI Model Zoo bundles through the whole pipeline: ``pacs-ai models add`` and ``verify`` on
the bundles exactly as published (random weights of their own ``network_def``), one study sent by DICOM,
each model's results in Orthanc, valid, coded from the bundles' own label names and titled by the model.

Read from ``../shared/data/monai-model-zoo`` (skipped when absent).  The CT is a small nodule phantom so
each bundle's sliding window runs one patch on a CPU.  ``breast_density_classification`` and the published
``lung_nodule_ct_detection`` need torchvision; where it cannot be imported (CPU torch without a matching
torchvision build) the first is checked to fail verification naming the missing package, and the second
runs with its feature extractor built from MONAI blocks (tests/zoo_networks.py), all else as published.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch

from pacs_ai.report.drafters.template import TemplateDrafter
from pacs_ai.report.evidence import evidence_from_findings
from pacs_ai.report.guardrails import check_draft
from tests import zoo_bundles
from tests.e2e.conftest import orthanc_destination
from tests.e2e.test_model_runtime import codes_in, downloaded_results, write_profiles
from tests.integration.test_cli import pacs_ai
from tests.peers import OrthancServer, dciodvfy_errors, dsrdump, storescu, wait_for

pytestmark = pytest.mark.e2e

NODULE = "27925004"

#: registry name -> profile params
MODELS: dict[str, str] = {
    "spleen": "{model: spleen, keep: [liver]}",  # wrong on purpose: fixed before `retry` below
    "wholebody": "{model: wholebody}",
    # SwinUNETR's 96^3 window takes a minute per patch on a CPU: 64^3 (divisible by 32, as it needs).
    "swin": "{model: swin, roi_size: [64, 64, 64]}",
    # Untrained: its scores are low, so the profile lowers the threshold to see boxes reach the SR.
    "nodules": '{model: nodules, findings: {"0": {threshold: 0.02}}, max_detections: 3}',
}
SWIN_VERIFY = ["--roi-size", "64", "--roi-size", "64", "--roi-size", "64"]
TITLES = {
    "spleen": "AI Spleen CT segmentation",
    "wholebody": "AI Whole body CT segmentation",
    "swin": "AI Swin UNETR BTCV segmentation",
    "nodules": "AI Lung nodule CT detection",
}


def profile(name: str, params: str) -> str:
    return f"""
name: zoo-{name}
match: {{modality: [CT], min_instances: 10}}
analyzers:
  - name: monai-bundle
    queue: gpu
    params: {params}
destinations: [pacs]
report: false
"""


def cli_json(service: Any, *args: str) -> Any:
    result = service.cli(*args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_published_bundles_run_end_to_end(
    orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    bundles = {
        "spleen": zoo_bundles.runnable_copy("spleen_ct_segmentation", tmp_path / "src"),
        "wholebody": zoo_bundles.runnable_copy("wholeBody_ct_segmentation", tmp_path / "src"),
        "swin": zoo_bundles.runnable_copy("swin_unetr_btcv_segmentation", tmp_path / "src"),
        "nodules": zoo_bundles.detection_copy(tmp_path / "src"),
    }
    profiles = write_profiles(
        tmp_path / "profiles", {name: profile(name, params) for name, params in MODELS.items()}
    )
    service = service_factory(profiles_dir=profiles, destinations=orthanc_destination(orthanc))
    for name, path in bundles.items():
        added = cli_json(service, "models", "add", str(path), "--name", name)
        assert added["task"] == ("detection" if name == "nodules" else "segmentation"), added
        verified = service.cli("models", "verify", name, *(SWIN_VERIFY if name == "swin" else []), "--json")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["ok"], verified.stdout

    # The spleen profile keeps a label the model does not have: validation says so, and its job fails
    # before inference; fixed, `retry` runs it with the profile as it is now.
    validation = cli_json_failing(service, "profiles", "validate", str(profiles))
    assert any("keep: 'liver' is not a label of model spleen" in p for p in validation["problems"])
    assert [p for p in validation["problems"] if not p.startswith("zoo-spleen:")] == []

    phantom = zoo_bundles.write_nodule_phantom(tmp_path / "ct")
    sent = storescu("127.0.0.1", service.port, service.ae_title, phantom.paths, calling_aet="CT_ZOO")
    assert sent.returncode == 0, sent.stderr

    def spleen_failed() -> dict[str, Any] | None:
        jobs = [j for j in cli_json(service, "jobs", "list") if j["profile"] == "zoo-spleen"]
        return jobs[0] if jobs and jobs[0]["state"] == "failed" else None

    failed = wait_for(spleen_failed, timeout=240, interval=1.0, description="the spleen job to fail")
    assert "keep: 'liver' is not a label of model spleen" in failed["error"], failed
    (profiles / "spleen.yaml").write_text(profile("spleen", "{model: spleen}"))
    retried = cli_json(service, "retry", str(failed["id"]))
    assert retried["retried"] == [
        {"job": failed["id"], "what": "analysis with profile zoo-spleen as it is now (changed parameters)"}
    ], retried

    results = downloaded_results(orthanc, phantom.study_uid, tmp_path / "results", segs=3, srs=4)
    descriptions: dict[str, str] = {}
    for path in results["SEG"] + results["SR"]:
        assert dciodvfy_errors(path) == [], path
        dataset = pydicom.dcmread(path)
        descriptions[str(dataset.SeriesDescription)] = str(dataset.Modality)
        if dataset.Modality == "SEG":
            for segment in dataset.SegmentSequence:  # every code from the bundle's own label names
                for attribute in (
                    "SegmentedPropertyCategoryCodeSequence",
                    "SegmentedPropertyTypeCodeSequence",
                ):
                    assert str(segment[attribute][0].CodeValue).isdigit(), segment
        else:
            assert dsrdump(path).returncode == 0
    for name, title in TITLES.items():  # SEG and SR titled by the model; a detector makes no SEG
        expected = {f"{title} detections (unverified)"}
        if name != "nodules":
            expected = {f"{title} (unverified)", f"{title} measurements (unverified)"}
        assert expected <= set(descriptions), (name, sorted(descriptions))

    detection_sr = next(p for p in results["SR"] if "nodule" in str(pydicom.dcmread(p).SeriesDescription))
    assert NODULE in codes_in(pydicom.dcmread(detection_sr)), "the nodules are in the SR"
    check_nodule_findings(service, pydicom.dcmread(detection_sr))

    succeeded = cli_json(service, "audit", "--action", "job.succeeded", "--limit", "20")
    jobs = {j["id"]: j["profile"] for j in cli_json(service, "jobs", "list")}
    for event in succeeded:
        timings = event["detail"]["timings"]
        assert timings["peak_rss_mb"] > 0 and timings["peak_rss_is_per_job"] == 1.0
        # The per-bundle memory and time the README quotes (pytest -s shows them).
        print(
            f"{jobs[event['detail']['job']]}: analyze {timings['analyze_seconds']:.1f} s, "
            f"job peak RSS {timings['peak_rss_mb']:.0f} MB",
            file=sys.stderr,
        )


def check_nodule_findings(service: Any, sr: pydicom.Dataset) -> None:
    """The detector's job record holds each box the SR has, and its template draft passes the guardrails."""
    (findings,) = [
        row[0] for row in service.query("SELECT findings FROM jobs WHERE profile = 'zoo-nodules'") if row[0]
    ]
    findings = json.loads(findings) if isinstance(findings, str) else findings
    detections = findings["detections"]
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    regions = [
        group
        for group in measurements.ContentSequence
        if any(item.ConceptNameCodeSequence[0].CodeValue == "111030" for item in group.ContentSequence)
    ]
    assert 1 <= len(detections) == len(regions) <= 3, (detections, len(regions))  # max_detections: 3
    for detection in detections:
        assert detection["diameter_mm"] == pytest.approx(max(detection["size_mm"]), abs=0.01)
        side = {"right lung": -1, "left lung": 1}.get(detection["location"], 0)
        assert side * detection["center_mm"][0] >= 0, detection  # LPS: the patient's right is -x
    evidence = evidence_from_findings(None, findings)
    draft = TemplateDrafter().draft_report(evidence)
    count = len(detections)
    assert draft.findings.startswith(f"{count} pulmonary nodule{'s' if count > 1 else ''} detected by"), draft
    assert check_draft(draft.findings, draft.impression, evidence).passed, draft


def cli_json_failing(service: Any, *args: str) -> Any:
    result = service.cli(*args, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_classification_bundle_verifies_or_names_what_it_needs(tmp_path: Path) -> None:
    """breast_density_classification (inception_v3 through torchvision, 3-channel 2D input)."""
    missing = zoo_bundles.torchvision_missing()
    if missing is None:
        bundle = zoo_bundles.runnable_copy("breast_density_classification", tmp_path / "src")
    else:  # its network cannot be built here; the registry still takes it, and verify says why it fails
        bundle = tmp_path / "src" / "breast_density_classification"
        bundle.parent.mkdir(parents=True)
        shutil.copytree(zoo_bundles.published("breast_density_classification"), bundle)
        (bundle / "models").mkdir()
        torch.save({}, bundle / "models" / "model.pt")
    data = {"PACS_AI_DATA_DIR": str(tmp_path / "data")}  # the CLI alone: no service needed
    added = pacs_ai("models", "add", str(bundle), "--name", "density", "--json", **data)
    assert added.returncode == 0, added.stdout + added.stderr
    row = json.loads(added.stdout)
    assert (row["task"], row["spatial_dims"]) == ("classification", 2), row
    verified = pacs_ai("models", "verify", "density", "--json", **data)
    report = json.loads(verified.stdout)
    if missing is None:
        assert verified.returncode == 0 and report["ok"], verified.stdout
        return
    assert verified.returncode == 1, verified.stdout
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed[0]["name"] == "network and weights", report
    assert "key 'network_def' cannot be instantiated" in failed[0]["detail"]
    assert "torchvision" in failed[0]["detail"] and "not installed" in failed[0]["detail"], failed
    # ... and why pip cannot just add it: the build must match this torch (the only ones here are CUDA's).
    assert f"the build made for the installed torch {torch.__version__}" in failed[0]["detail"], failed
