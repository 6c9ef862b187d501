"""pacs-ai with its studies and results in an S3 object store (a real SeaweedFS).

* A chest CT acknowledged while the store is down stays in the receiver's spool,
  is not routed, survives a SIGKILL of the whole service, and after the restart
  is uploaded first, then analysed: the SEG and SR reach the PACS (Orthanc)
  from the store, and the receiver keeps no result file of its own.
* A worker whose store is unreachable retries the job with backoff, and
  ``pacs-ai jobs list`` shows why; a worker that reaches the store finishes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.synthetic.phantom import PhantomTruth
from tests.e2e.conftest import NO_DRAFT_REPORTS, NO_WORKLIST, orthanc_destination
from tests.e2e.test_chest_ct_roundtrip import check_results, fetch_results
from tests.object_store import SeaweedS3, storage_environment
from tests.peers import OrthancServer, free_port, storescu, wait_for
from tests.service import REPO_ROOT, PacsAiService

pytestmark = pytest.mark.e2e

#: Seconds a service may take to start: a worker's start-up is slow on a busy two-core machine.
START_TIMEOUT = 240.0


def _kill_everything(service: PacsAiService) -> None:
    """SIGKILL the service and its listener processes (its workers die with it)."""
    state = service.run_state()
    assert state is not None
    for pid in [*state["listener_pids"], state["service_pid"]]:
        os.kill(pid, signal.SIGKILL)
    assert service.process is not None
    service.process.wait(timeout=30)
    service.process = None


def test_instances_acknowledged_while_the_store_is_down_survive_a_kill_and_reach_the_pacs(
    object_store: SeaweedS3, chest_phantom: PhantomTruth, orthanc: OrthancServer, tmp_path: Path
) -> None:
    url = object_store.new_prefix()
    reachable = {**storage_environment(object_store, url), **NO_DRAFT_REPORTS, **NO_WORKLIST}
    down = {
        **reachable,
        "PACS_AI_STORAGE_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "PACS_AI_STORAGE_TIMEOUT_SECONDS": "1",
    }
    destinations = orthanc_destination(orthanc)
    receiver = PacsAiService(tmp_path / "receiver", destinations=destinations, extra_env=down)
    receiver.start(timeout=START_TIMEOUT)
    try:
        sent = storescu("127.0.0.1", receiver.port, receiver.ae_title, chest_phantom.paths)
        assert sent.returncode == 0, sent.stderr  # acknowledged: fsynced in the spool and indexed
        count = len(chest_phantom.paths)
        assert receiver.query("SELECT count(*) FROM instances")[0][0] == count
        time.sleep(3)  # well past the quiet period: the series would be routed were it uploaded
        assert receiver.query("SELECT count(*) FROM instances WHERE uploaded_at IS NOT NULL")[0][0] == 0
        assert receiver.query("SELECT count(*) FROM jobs")[0][0] == 0, (
            "nothing routed before it is in the store"
        )
        assert "uploading to the object store failed" in receiver.logs()
        _kill_everything(receiver)
    finally:
        receiver.stop()

    restarted = PacsAiService(receiver.data_dir, destinations=destinations, extra_env=reachable)
    restarted.port = receiver.port
    restarted.env["PACS_AI_LISTEN_PORT"] = str(receiver.port)
    restarted.start(timeout=START_TIMEOUT)
    try:
        seg_path, sr_path = fetch_results(orthanc, chest_phantom.study_uid, tmp_path)
        check_results(seg_path, sr_path, chest_phantom)
        assert restarted.query("SELECT count(*) FROM instances WHERE uploaded_at IS NULL")[0][0] == 0
        keys = {
            key for (key,) in restarted.query("SELECT path FROM instances UNION SELECT path FROM results")
        }
        assert all(key.startswith(("instances/", "results/")) for key in keys), keys
        client = object_store.client()
        prefix = url.split("/", 3)[3] + "/"
        stored = {
            item["Key"][len(prefix) :]
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=object_store.bucket, Prefix=prefix
            )
            for item in page.get("Contents", [])
        }
        assert keys <= stored, sorted(keys - stored)[:3]
        # The results went to the store, and dispatch read them from there: no result file stays here.
        assert not list((restarted.data_dir / "results").rglob("*.dcm"))

    finally:
        restarted.stop()


def _celery_worker(env: dict[str, str], data_dir: Path, name: str) -> subprocess.Popen[bytes]:
    """A Celery worker as another host runs it: its own data directory, the shared index, broker and store.

    It serves the dispatch queue too (the receiver runs no worker here), so it also sends the
    results, reading them back from the store.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "-Q",
            "cpu,gpu,dispatch",
            "-c",
            "1",
            "-n",
            name,
            "--without-mingle",
            "--without-gossip",
            "-l",
            "INFO",
        ],
        env={**env, "PACS_AI_DATA_DIR": str(data_dir)},
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "worker.log", "wb"),  # noqa: SIM115
        start_new_session=True,
    )


def _retry_number(error: str) -> int:
    """n of a job error ending "(retry n of 10 in s s)"; 0 for any other."""
    found = re.search(r"\(retry (\d+) of \d+ in [\d.]+ s\)", error)
    return int(found.group(1)) if found else 0


def _jobs(service: PacsAiService) -> list[dict[str, Any]]:
    listed = service.cli("jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def test_a_worker_that_cannot_reach_the_store_retries_with_backoff_and_says_why(
    object_store: SeaweedS3, chest_phantom: PhantomTruth, orthanc: OrthancServer, tmp_path: Path
) -> None:
    reachable = {
        **storage_environment(object_store),
        **NO_DRAFT_REPORTS,
        **NO_WORKLIST,
        "PACS_AI_WORKER_PROCESSES": "0",
    }
    with PacsAiService(
        tmp_path / "receiver",
        backend="servers",
        destinations=orthanc_destination(orthanc),
        extra_env=reachable,
    ) as receiver:
        sent = storescu("127.0.0.1", receiver.port, receiver.ae_title, chest_phantom.paths)
        assert sent.returncode == 0, sent.stderr
        worker_env = {k: v for k, v in receiver.env.items() if k != "PACS_AI_DATA_DIR"}
        unreachable = {
            **worker_env,
            "PACS_AI_STORAGE_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "PACS_AI_STORAGE_TIMEOUT_SECONDS": "1",
        }
        bad = _celery_worker(unreachable, tmp_path / "worker-without-store", "nostore@%h")
        try:
            waiting = wait_for(
                lambda: [j for j in _jobs(receiver) if "storage:" in (j.get("error") or "")],
                timeout=180,
                interval=1,
                description="the job to wait for the storage",
            )
            assert waiting[0]["state"] == "queued" and "cannot" in waiting[0]["error"], waiting
            first = _retry_number(waiting[0]["error"])
            wait_for(
                lambda: any(_retry_number(j.get("error") or "") > first for j in _jobs(receiver)),
                timeout=90,
                interval=1,
                description="another attempt after the backoff",
            )
        finally:
            bad.send_signal(signal.SIGTERM)  # warm shutdown: the retry it holds goes back to the queue
            bad.wait(timeout=60)
        good = _celery_worker(worker_env, tmp_path / "worker-with-store", "store@%h")
        try:
            seg_path, sr_path = fetch_results(orthanc, chest_phantom.study_uid, tmp_path)
            check_results(seg_path, sr_path, chest_phantom)
            [job] = _jobs(receiver)
            assert job["state"] == "succeeded" and job["error"] is None
            # The worker read the series from the store into its own cache (it shares no disk), and
            # read the SEG and SR back from the store to send them.
            cache = tmp_path / "worker-with-store" / "cache"
            assert len(list((cache / "instances").rglob("*.dcm"))) == len(chest_phantom.paths)
            assert len(list((cache / "results").rglob("*.dcm"))) == 2
        finally:
            good.send_signal(signal.SIGTERM)
            good.wait(timeout=60)
