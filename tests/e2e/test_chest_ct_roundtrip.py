"""A chest CT sent to pacs-ai comes back to the PACS (Orthanc) as DICOM SEG + TID 1500 SR."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacs_ai.synthetic.phantom import PhantomTruth
from tests.e2e.conftest import BACKENDS, orthanc_destination
from tests.e2e.metrics_scrape import check_study_metrics
from tests.peers import OrthancServer, dciodvfy_errors, dsrdump, forward_lua, storescu, wait_for
from tests.sr_reading import volume_ml

pytestmark = pytest.mark.e2e

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: Enhanced SR: the AI report draft (TID 2000) that profiles with a ``report`` section add.
DRAFT_REPORT_SR = "1.2.840.10008.5.1.4.1.1.88.22"
RIGHT_LUNG, LEFT_LUNG = "3341006", "44029006"


def results_in(orthanc: OrthancServer, study_uid: str) -> dict[str, list[dict[str, Any]]] | None:
    """The SEG and SR series of the study in Orthanc, once both are there."""
    series = orthanc.series_of_study(study_uid)
    segs = [s for s in series if SEG_STORAGE in s["SOPClassUIDs"]]
    srs = [s for s in series if COMPREHENSIVE_3D_SR in s["SOPClassUIDs"]]
    return {"SEG": segs, "SR": srs} if segs and srs else None


def fetch_results(orthanc: OrthancServer, study_uid: str, into: Path) -> tuple[Path, Path]:
    found = wait_for(
        lambda: results_in(orthanc, study_uid), timeout=180, interval=0.5, description="SEG and SR in Orthanc"
    )
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1, found
    assert len(found["SEG"][0]["Instances"]) == 1 and len(found["SR"][0]["Instances"]) == 1
    seg_path = orthanc.download_instance(found["SEG"][0]["Instances"][0], into / "seg.dcm")
    sr_path = orthanc.download_instance(found["SR"][0]["Instances"][0], into / "sr.dcm")
    return seg_path, sr_path


def check_results(seg_path: Path, sr_path: Path, phantom: PhantomTruth) -> None:
    """The results are valid DICOM, attributed to pacs-ai, and measure the phantom's lungs."""
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    assert dsrdump(sr_path).returncode == 0

    seg = pydicom.dcmread(seg_path)
    sr = pydicom.dcmread(sr_path)
    source = pydicom.dcmread(phantom.paths[0], stop_before_pixels=True)
    for result in (seg, sr):
        assert result.StudyInstanceUID == source.StudyInstanceUID
        assert result.PatientID == source.PatientID
        assert (
            "pacs-ai" in str(result.ContributingEquipmentSequence[0].ManufacturerModelName).lower()
            or "pacs-ai" in str(result.ContributingEquipmentSequence[0].Manufacturer).lower()
        )
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == [
        RIGHT_LUNG,
        LEFT_LUNG,
    ]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert sr.CompletionFlag == "PARTIAL" and sr.VerificationFlag == "UNVERIFIED"

    right, left = volume_ml(sr, RIGHT_LUNG), volume_ml(sr, LEFT_LUNG)
    assert right == pytest.approx(phantom.right_lung_ml, rel=0.03)
    assert left == pytest.approx(phantom.left_lung_ml, rel=0.03)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chest_ct_from_modality_comes_back_as_seg_and_sr(
    backend: str, chest_phantom: PhantomTruth, orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    service = service_factory(backend=backend, destinations=orthanc_destination(orthanc))

    sent = storescu(
        "127.0.0.1", service.port, service.ae_title, chest_phantom.paths, calling_aet="CT_SCANNER"
    )
    assert sent.returncode == 0, sent.stderr

    seg_path, sr_path = fetch_results(orthanc, chest_phantom.study_uid, tmp_path)
    check_results(seg_path, sr_path, chest_phantom)

    # The index recorded everything: every instance, one succeeded job, both results sent.
    assert service.query("SELECT count(*) FROM instances")[0][0] == len(chest_phantom.paths)
    jobs = service.query("SELECT state, error, timings FROM jobs")
    assert [(state, error) for state, error, _ in jobs] == [("SUCCEEDED", None)]
    # The SEG, the SR and the AI draft report (TID 2000) were each delivered once.
    sent = "SELECT r.kind, d.state FROM deliveries d JOIN results r ON r.id = d.result_fk ORDER BY r.kind"
    wait_for(
        lambda: (
            [tuple(row) for row in service.query(sent)]
            == [("SEG", "SENT"), ("SR", "SENT"), ("SR-DRAFT", "SENT")]
        ),
        timeout=60,
        description="deliveries recorded as sent",
    )
    # Prometheus sees the study: instances, the job's stages by analyzer and model, the deliveries; no PHI.
    check_study_metrics(
        service, chest_phantom.paths, calling_ae="CT_SCANNER", destination="pacs", deliveries=3
    )
    audit = {action for (action,) in service.query("SELECT action FROM audit_events")}
    assert {"job.created", "job.succeeded", "result.sent"} <= audit
    # The pool process that ran the job had warmed up itself before, not only the worker's parent.
    assert re.search(r"ForkPoolWorker-\d+\] worker warmed up", service.logs()), service.logs()[-3000:]

    status = service.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["index"]["instances"] == len(chest_phantom.paths)


def test_pacs_auto_routes_study_to_pacs_ai(
    chest_phantom: PhantomTruth, service_factory: Any, tmp_path: Path
) -> None:
    """Orthanc forwards what a modality sends it to pacs-ai (a PACS auto-routing rule)."""
    with OrthancServer(aet="ORTHANC", lua=forward_lua("pacsai", only_modality="CT")) as pacs:
        service = service_factory(destinations=orthanc_destination(pacs))
        pacs.add_modality("pacsai", service.ae_title, "127.0.0.1", service.port)

        sent = storescu("127.0.0.1", pacs.dicom_port, pacs.aet, chest_phantom.paths, calling_aet="CT_SCANNER")
        assert sent.returncode == 0, sent.stderr

        seg_path, sr_path = fetch_results(pacs, chest_phantom.study_uid, tmp_path)
        check_results(seg_path, sr_path, chest_phantom)
        calling = {ae for (ae,) in service.query("SELECT DISTINCT calling_ae_title FROM instances")}
        assert calling == {pacs.aet}
