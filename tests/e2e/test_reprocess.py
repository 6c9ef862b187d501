"""Reprocess by accession: a study lost from pacs-ai's spool is pulled back from the PACS (Orthanc) with
C-FIND + C-MOVE, analysed again, and its new results arrive in the PACS as version 2, next to version 1,
with the new SR naming the old one as its predecessor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from rich.text import Text

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.e2e.conftest import orthanc_destination
from tests.e2e.test_chest_ct_roundtrip import (
    COMPREHENSIVE_3D_SR,
    SEG_STORAGE,
    check_results,
    fetch_results,
)
from tests.peers import OrthancServer, dciodvfy_errors, dsrdump, storescu, wait_for
from tests.service import REPO_ROOT, PacsAiService

pytestmark = pytest.mark.e2e


def reprocess(
    service: PacsAiService, *args: str, terminal: bool = False, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    """``pacs-ai reprocess`` as an administrator runs it: in a terminal (rich progress bars) or not."""
    return subprocess.run(
        [sys.executable, "-m", "pacs_ai.cli.main", "reprocess", *args],
        env={**service.env, "FORCE_COLOR": "1", "COLUMNS": "160"} if terminal else service.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def all_sent(service: PacsAiService) -> bool:
    """Every delivery (SEG, SR and whatever else the profile sends, e.g. a report draft) is sent."""
    states = [state for (state,) in service.query("SELECT state FROM deliveries")]
    return len(states) >= 2 and set(states) == {"SENT"}


def parsed(result: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        ) from None


def result_series(orthanc: OrthancServer, study_uid: str, sop_class: str) -> list[dict[str, Any]]:
    return [s for s in orthanc.series_of_study(study_uid) if sop_class in s["SOPClassUIDs"]]


def test_reprocess_by_accession_retrieves_the_lost_study_and_adds_version_2(
    chest_phantom: PhantomTruth, orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    query_retrieve = {
        "pacs": {
            "ae_title": orthanc.aet,
            "host": orthanc.host,
            "port": orthanc.dicom_port,
            "timeout_seconds": 30,
        }
    }
    service = service_factory(
        destinations=orthanc_destination(orthanc),
        extra_env={"PACS_AI_QUERY_RETRIEVE": json.dumps(query_retrieve)},
    )
    # The PACS knows pacs-ai as a DICOM node: allowed to query and retrieve, and a C-MOVE destination.
    orthanc.add_modality("pacsai", service.ae_title, "127.0.0.1", service.port)

    # The scanner sends the study to the PACS, which routes it to pacs-ai; version 1 comes back.
    sent = storescu(
        orthanc.host, orthanc.dicom_port, orthanc.aet, chest_phantom.paths, calling_aet="CT_SCANNER"
    )
    assert sent.returncode == 0, sent.stderr
    study_id = orthanc.find_study(chest_phantom.study_uid)
    assert study_id is not None
    orthanc.store_to_modality("pacsai", [study_id])
    v1_seg_path, v1_sr_path = fetch_results(orthanc, chest_phantom.study_uid, tmp_path)
    v1_seg, v1_sr = pydicom.dcmread(v1_seg_path), pydicom.dcmread(v1_sr_path)
    wait_for(lambda: all_sent(service), timeout=60, description="version 1 delivered")

    # The study's files leave pacs-ai's spool (an administrator, or retention); the index still knows it.
    shutil.rmtree(service.data_dir / "spool" / chest_phantom.study_uid)

    dry = reprocess(service, "--accession", chest_phantom.accession_number, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    [planned] = parsed(dry)["studies"]
    assert planned["source"] == "index" and planned["retrieved_from"] == "pacs"
    assert [(s["missing_files"], s["retrieved"]) for s in planned["series"]] == [
        (len(chest_phantom.paths), 0)
    ]

    done = reprocess(
        service, "--accession", chest_phantom.accession_number, "--wait", "--timeout", "300", "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr + service.logs()
    report = parsed(done)
    assert report["problems"] == []
    assert report["retrieved_instances"] == len(chest_phantom.paths)
    [series] = report["studies"][0]["series"]
    assert series["reopened"] is True and series["retrieved"] == len(chest_phantom.paths)
    [job] = report["jobs"]
    assert job["version"] == 2 and job["state"] == "succeeded"
    # (The profile may also draft a report; that has its own versioning, see pacs_ai.report.)
    replaced = {r["kind"]: r["replaces"] for r in job["results"] if r["kind"] in ("SEG", "SR")}
    assert replaced == {"SEG": [v1_seg.SOPInstanceUID], "SR": [v1_sr.SOPInstanceUID]}

    # The PACS holds both versions: v1 untouched, v2 with new series, marked as such.
    def both_versions() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        segs = result_series(orthanc, chest_phantom.study_uid, SEG_STORAGE)
        srs = result_series(orthanc, chest_phantom.study_uid, COMPREHENSIVE_3D_SR)
        return (segs, srs) if len(segs) == 2 and len(srs) == 2 else None

    segs, srs = wait_for(both_versions, timeout=60, description="two SEG and two SR series in Orthanc")
    [v2_seg_series] = [s for s in segs if s["SeriesInstanceUID"] != v1_seg.SeriesInstanceUID]
    [v2_sr_series] = [s for s in srs if s["SeriesInstanceUID"] != v1_sr.SeriesInstanceUID]
    assert v2_seg_series["SeriesDescription"].endswith("(v2)")
    assert v2_sr_series["SeriesDescription"].endswith("(v2)")
    v2_seg_path = orthanc.download_instance(v2_seg_series["Instances"][0], tmp_path / "v2-seg.dcm")
    v2_sr_path = orthanc.download_instance(v2_sr_series["Instances"][0], tmp_path / "v2-sr.dcm")
    check_results(v2_seg_path, v2_sr_path, chest_phantom)  # dciodvfy, dsrdump, same lung volumes
    assert dciodvfy_errors(v2_sr_path) == [] and dsrdump(v2_sr_path).returncode == 0

    # The v2 SR names the v1 SR as its predecessor, and references the v2 SEG.
    v2_sr = pydicom.dcmread(v2_sr_path)
    [predecessor] = v2_sr.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == chest_phantom.study_uid
    [predecessor_series] = predecessor.ReferencedSeriesSequence
    assert predecessor_series.SeriesInstanceUID == v1_sr.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in predecessor_series.ReferencedSOPSequence] == [
        v1_sr.SOPInstanceUID
    ]
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in v2_sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for sop in series_item.ReferencedSOPSequence
    }
    assert pydicom.dcmread(v2_seg_path).SOPInstanceUID in evidence

    # The index: no duplicate instance rows, files restored, the reprocess and replacements audited.
    assert service.query("SELECT count(*) FROM instances")[0][0] == len(chest_phantom.paths)
    assert all(service.spool_file(key).is_file() for (key,) in service.query("SELECT path FROM instances"))
    actions = [action for (action,) in service.query("SELECT action FROM audit_events")]
    assert actions.count("instance.restored") == len(chest_phantom.paths)
    assert actions.count("result.replaces") == 2
    [(actor,)] = service.query("SELECT actor FROM audit_events WHERE action = 'study.reprocess'")
    assert actor.startswith("cli:")

    # Nothing to reprocess: exit 1 with a message.
    unknown = reprocess(service, "1.2.826.0.1.3680043.8.498.1", "--json")
    assert unknown.returncode == 1
    assert "no matching study" in " ".join(parsed(unknown)["problems"])

    # Again, from a terminal, with the files in place: nothing to retrieve, version 3 replaces version 2.
    again = reprocess(service, chest_phantom.study_uid, "--wait", "--timeout", "300", terminal=True)
    shown = Text.from_ansi(again.stdout).plain
    assert again.returncode == 0, shown + again.stderr
    assert "waiting for the router" in shown and "retrieving" not in shown, shown
    assert "v3): succeeded, replaces 2 earlier result(s)" in shown, shown
    v3_sr = wait_for(
        lambda: [
            s
            for s in result_series(orthanc, chest_phantom.study_uid, COMPREHENSIVE_3D_SR)
            if "(v3)" in s["SeriesDescription"]
        ],
        timeout=60,
        description="the v3 SR in Orthanc",
    )
    v3_sr_path = orthanc.download_instance(v3_sr[0]["Instances"][0], tmp_path / "v3-sr.dcm")
    [v3_predecessor] = pydicom.dcmread(v3_sr_path).PredecessorDocumentsSequence
    assert v3_predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == v2_sr.SeriesInstanceUID


def test_reprocess_by_date_range_fetches_a_study_pacs_ai_never_received(
    orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    phantom = write_chest_phantom(
        tmp_path / "ct",
        slices=30,
        size=160,
        pixel_spacing_mm=2.4,
        slice_spacing_mm=8.0,
        accession_number="ACC0002",
    )
    query_retrieve = {"pacs": {"ae_title": orthanc.aet, "host": orthanc.host, "port": orthanc.dicom_port}}
    service = service_factory(
        destinations=orthanc_destination(orthanc),
        extra_env={"PACS_AI_QUERY_RETRIEVE": json.dumps(query_retrieve)},
    )
    orthanc.add_modality("pacsai", service.ae_title, "127.0.0.1", service.port)
    sent = storescu(orthanc.host, orthanc.dicom_port, orthanc.aet, phantom.paths, calling_aet="CT_SCANNER")
    assert sent.returncode == 0, sent.stderr
    day = pydicom.dcmread(phantom.paths[0], stop_before_pixels=True).StudyDate
    day = f"{day[:4]}-{day[4:6]}-{day[6:]}"

    assert reprocess(service, "--from", day, "--to", "2000-01-01").returncode == 2  # a range that ends first
    done = reprocess(
        service, "--from", day, "--to", day, "--modality", "CT", "--wait", "--timeout", "300", "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr + service.logs()
    report = parsed(done)
    [study] = report["studies"]
    assert (study["study_instance_uid"], study["source"]) == (phantom.study_uid, "pacs")
    [series] = study["series"]
    assert series["in_index"] is False and series["retrieved"] == len(phantom.paths)
    # New to the index, so routed like any arrival: version 1.
    assert [(job["version"], job["state"]) for job in report["jobs"]] == [(1, "succeeded")]
    wait_for(
        lambda: (
            result_series(orthanc, phantom.study_uid, SEG_STORAGE)
            and result_series(orthanc, phantom.study_uid, COMPREHENSIVE_3D_SR)
        ),
        timeout=60,
        description="SEG and SR of the fetched study in Orthanc",
    )
    [(actor, detail)] = service.query(
        "SELECT actor, detail FROM audit_events WHERE action = 'study.reprocess'"
    )
    assert actor.startswith("cli:") and json.loads(detail)["new_series"] == [phantom.series_uid]
