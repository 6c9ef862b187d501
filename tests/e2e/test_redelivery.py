"""A worker killed (SIGKILL) mid-task: another worker takes over, the PACS gets one set of results."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.e2e.conftest import NO_DRAFT_REPORTS, NO_WORKLIST, orthanc_destination
from tests.e2e.test_chest_ct_roundtrip import COMPREHENSIVE_3D_SR, SEG_STORAGE, fetch_results
from tests.peers import OrthancServer, storescu, wait_for
from tests.service import PacsAiService

pytestmark = pytest.mark.e2e


def assert_one_result_set(orthanc: OrthancServer, study_uid: str, into: Path) -> None:
    """SEG and SR reach the PACS, and after a wait for any duplicate it holds one instance of each."""
    fetch_results(orthanc, study_uid, into)
    time.sleep(5)  # any duplicate delivery would arrive within this time
    series = orthanc.series_of_study(study_uid)
    result_instances = [
        i
        for s in series
        if {SEG_STORAGE, COMPREHENSIVE_3D_SR} & set(s["SOPClassUIDs"])
        for i in s["Instances"]
    ]
    assert len(result_instances) == 2


def test_killed_worker_leads_to_exactly_one_set_of_results(
    orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    # Large enough that the analysis runs for a while, so the kill lands mid-task.
    phantom = write_chest_phantom(
        tmp_path / "phantom", slices=160, size=384, pixel_spacing_mm=1.0, slice_spacing_mm=2.0
    )
    service = service_factory(
        destinations=orthanc_destination(orthanc),
        extra_env={"PACS_AI_WORKER_PROCESSES": "2", **NO_DRAFT_REPORTS, **NO_WORKLIST},
    )
    sent = storescu("127.0.0.1", service.port, service.ae_title, phantom.paths)
    assert sent.returncode == 0, sent.stderr

    job_id, claimed_by = wait_for(
        lambda: next(iter(service.query("SELECT id, claimed_by FROM jobs WHERE state = 'RUNNING'")), None),
        timeout=60,
        interval=0.05,
        description="the analysis to start",
    )
    workers = {w["node"]: w["pid"] for w in service.run_state()["workers"]}
    victim = workers[claimed_by]
    os.killpg(victim, signal.SIGKILL)  # the Celery worker and its pool process

    assert_one_result_set(orthanc, phantom.study_uid, tmp_path)

    ((state, attempts, claimed_after),) = service.query(
        "SELECT state, attempts, claimed_by FROM jobs WHERE id = :id", id=job_id
    )
    assert state == "SUCCEEDED"
    assert attempts == 2
    assert claimed_after != claimed_by
    assert service.query("SELECT count(*) FROM results")[0][0] == 2
    assert service.query("SELECT count(*) FROM deliveries")[0][0] == 2


def test_unfinished_jobs_are_recovered_from_the_index_after_a_restart(
    chest_phantom: PhantomTruth, orthanc: OrthancServer, service_factory: Any, tmp_path: Path
) -> None:
    """The index, not the broker, is the source of truth: a job whose message is gone still runs."""
    destinations = orthanc_destination(orthanc)
    service = service_factory(
        destinations=destinations, extra_env={"PACS_AI_WORKER_PROCESSES": "0", **NO_WORKLIST}
    )
    sent = storescu("127.0.0.1", service.port, service.ae_title, chest_phantom.paths)
    assert sent.returncode == 0, sent.stderr
    wait_for(
        lambda: service.query("SELECT id FROM jobs WHERE state = 'QUEUED'"),
        timeout=60,
        description="the job to be queued",
    )
    service.stop()
    shutil.rmtree(service.data_dir / "redis")  # the broker forgets everything

    with PacsAiService(service.data_dir, destinations=destinations, extra_env=NO_WORKLIST) as restarted:
        fetch_results(orthanc, chest_phantom.study_uid, tmp_path)
        ((state, attempts),) = restarted.query("SELECT state, attempts FROM jobs")
        assert (state, attempts) == ("SUCCEEDED", 1)
