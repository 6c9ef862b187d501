"""Two "hosts" on one machine: the receiver, and a worker that shares only the index, broker and store.

The receiver (``pacs-ai serve``: listener, scheduler, the dispatch queue's
worker, worklist) and the worker (``pacs-ai worker --queues cpu,gpu``) are
separate process trees with separate data directories and HOMEs; the worker
runs as another Unix user who cannot read the receiver's files.  They share a
real PostgreSQL database, a Redis database and a SeaweedFS S3 bucket; Orthanc
is the PACS.  Two workers run on the worker host; a chest CT sent to the
receiver comes back as SEG and SR: the worker analysing it is SIGKILLed during
the analysis and the other one takes the job over: the PACS ends up with
exactly one result set.  ``pacs-ai status`` on the receiver lists the
workers of both "hosts", marks the dead one, and exits 1 when the object
store refuses its credentials.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.e2e.conftest import NO_DRAFT_REPORTS, orthanc_destination
from tests.e2e.metrics_scrape import samples, value
from tests.e2e.test_redelivery import assert_one_result_set
from tests.object_store import SeaweedS3, storage_environment
from tests.peers import OrthancServer, _stop_process, free_port, storescu, wait_for
from tests.service import REPO_ROOT, PacsAiService, start_worker

pytestmark = pytest.mark.e2e

#: The Unix user of the worker "host" (created when missing; CI runs as root).
WORKER_USER = "pacs-ai-gpu-host"
#: Fast heartbeats, so a dead worker is found in seconds; the broker hands its message on after 30 s.
TIMING = {
    "PACS_AI_WORKER_HEARTBEAT_SECONDS": "1",
    "PACS_AI_WORKER_STALE_AFTER_SECONDS": "5",
    "PACS_AI_BROKER_VISIBILITY_TIMEOUT_SECONDS": "30",
}


def _worker_user() -> pwd.struct_passwd:
    """The worker host's user, created if missing; skip where that is impossible (not root)."""
    try:
        return pwd.getpwnam(WORKER_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip(f"needs root to create the Unix user {WORKER_USER} (CI runs as root)")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", WORKER_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(WORKER_USER)


def _as_user(user: pwd.struct_passwd) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` with no supplementary groups."""
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@dataclass
class WorkerHost:
    """The worker's "machine": its user, HOME and data directory, and the settings it shares."""

    user: pwd.struct_passwd
    root: Path
    environment: dict[str, str]

    def start(self, name: str, metrics_port: int | None = None) -> subprocess.Popen[bytes]:
        data = self.root / name
        data.mkdir()
        os.chown(data, self.user.pw_uid, self.user.pw_gid)
        env = {**self.environment, "PACS_AI_DATA_DIR": str(data)}
        env["PACS_AI_WORKER_METRICS_PORT"] = str(metrics_port or free_port())
        return start_worker(env, f"{name}@gpu-host", data, **_as_user(self.user))

    def logs(self) -> str:
        return "\n".join(
            f"===== {path}\n{path.read_text(errors='replace')[-6000:]}"
            for path in sorted(self.root.rglob("*.log"))
        )


def _closed_ancestors(paths: list[Path]) -> list[Path]:
    """Folders above ``paths`` that other users may not pass through (e.g. /root holding pyenv)."""
    closed: set[Path] = set()
    for path in paths:
        for folder in path.parents:
            if not folder.stat().st_mode & 0o001:
                closed.add(folder)
    return sorted(closed)


@contextmanager
def _traversable_for(user: pwd.struct_passwd, folders: list[Path]) -> Iterator[None]:
    """Let ``user`` pass through ``folders`` (an ACL entry, execute only: no listing), then take it back.

    The worker user must run this checkout's interpreter, which may live under
    /root; it gets no right to read anything there.
    """
    if folders and shutil.which("setfacl") is None:
        pytest.skip(f"setfacl (Debian package acl) is needed to let {WORKER_USER} reach {folders}")
    for folder in folders:
        subprocess.run(["setfacl", "-m", f"u:{user.pw_name}:x", str(folder)], check=True)
    try:
        yield
    finally:
        for folder in folders:
            subprocess.run(["setfacl", "-x", f"u:{user.pw_name}", str(folder)], check=False)


@pytest.fixture
def worker_host_root() -> Iterator[tuple[pwd.struct_passwd, Path]]:
    user = _worker_user()
    root = Path(tempfile.mkdtemp(prefix="pacs-ai-gpu-host-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    (root / "home").mkdir()
    os.chown(root / "home", user.pw_uid, user.pw_gid)
    needed = [Path(sys.executable), Path(sys.executable).resolve(), REPO_ROOT / "pacs_ai"]
    with _traversable_for(user, _closed_ancestors(needed)):
        probe = subprocess.run(
            [sys.executable, "-c", "import pacs_ai.cli.main"],
            cwd=REPO_ROOT,
            capture_output=True,
            **_as_user(user),
        )
        assert probe.returncode == 0, (
            f"{WORKER_USER} cannot run this checkout: {probe.stderr.decode()[-2000:]}"
        )
        yield user, root
    shutil.rmtree(root, ignore_errors=True)


def _status(service: PacsAiService, **env: str) -> tuple[int, dict[str, Any]]:
    completed = subprocess.run(
        [sys.executable, "-m", "pacs_ai.cli.main", "status", "--json"],
        env={**service.env, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return completed.returncode, json.loads(completed.stdout)


def _nodes(service: PacsAiService) -> dict[str, dict[str, Any]]:
    return {node["node"]: node for node in _status(service)[1]["worker_nodes"]}


def test_a_worker_on_another_host_analyses_and_a_killed_one_is_replaced(
    orthanc: OrthancServer,
    object_store: SeaweedS3,
    tmp_path: Path,
    worker_host_root: tuple[pwd.struct_passwd, Path],
) -> None:
    user, root = worker_host_root
    started = time.monotonic()

    def stage(what: str) -> None:  # stage times in the output, to keep an eye on the test's duration
        print(f"{time.monotonic() - started:6.1f} s  {what}")

    # Large enough that the analysis runs for a while, so the kill lands mid-task.
    phantom: PhantomTruth = write_chest_phantom(
        tmp_path / "phantom", slices=160, size=384, pixel_spacing_mm=1.0, slice_spacing_mm=2.0
    )
    stage("phantom written")
    # The session's SeaweedFS, under a prefix of this test's own.
    storage = storage_environment(object_store)
    receiver = PacsAiService(
        tmp_path / "receiver",
        backend="servers",
        destinations=orthanc_destination(orthanc),
        extra_env={
            **storage,
            **TIMING,
            **NO_DRAFT_REPORTS,
            "PACS_AI_WORKER_QUEUES": '["dispatch"]',
            "PACS_AI_WORKLIST_ENABLED": "false",
        },
    )
    host: WorkerHost | None = None
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        receiver.start(timeout=240)  # generous: CI's 2 cores may be busy
        stage("receiver started")
        shared = {
            name: receiver.env[name]
            for name in (
                "PACS_AI_DATABASE_URL",
                "PACS_AI_BROKER_URL",
                *storage,
                *TIMING,
                *NO_DRAFT_REPORTS,
            )
        }
        host = WorkerHost(
            user,
            root,
            {"PATH": os.environ["PATH"], "HOME": str(root / "home"), "LANG": "C.UTF-8", **shared},
        )
        # The worker's user cannot read anything of the receiver's.
        denied = subprocess.run(
            [sys.executable, "-c", f"import os; os.listdir({str(receiver.data_dir)!r})"],
            capture_output=True,
            text=True,
            **_as_user(user),
        )
        assert denied.returncode != 0 and "PermissionError" in denied.stderr

        # Two workers on the worker host, started together (their start-ups overlap): the one that
        # claims the analysis is killed, the other takes it over.
        metrics_ports = {name: free_port() for name in ("first@gpu-host", "second@gpu-host")}
        for node, port in metrics_ports.items():
            workers[node] = host.start(node.split("@")[0], metrics_port=port)
        stage("workers starting")
        for node in workers:
            wait_for(lambda node=node: receiver.worker_is_ready(node), timeout=180, description=node)
        nodes = _nodes(receiver)
        for node in workers:
            assert nodes[node]["hostname"] and nodes[node]["queues"] == ["cpu", "gpu"]
            assert nodes[node]["device"]["type"] == "cpu" and nodes[node]["device"]["cores"]
            assert nodes[node]["state"] == "ready" and not nodes[node]["stale"]
            assert nodes[node]["answering"] is True

        stage("workers ready")
        sent = storescu("127.0.0.1", receiver.port, receiver.ae_title, phantom.paths)
        assert sent.returncode == 0, sent.stderr
        job_id, victim = wait_for(
            lambda: next(
                iter(receiver.query("SELECT id, claimed_by FROM jobs WHERE state = 'RUNNING'")), None
            ),
            timeout=90,
            interval=0.05,
            description="the analysis to start on the worker host",
        )
        assert victim in workers
        (survivor,) = set(workers) - {victim}
        stage("analysis running")
        os.killpg(workers[victim].pid, signal.SIGKILL)  # the worker and its pool process, mid-analysis
        workers[victim].wait()
        stage(f"{victim} killed")
        assert_one_result_set(orthanc, phantom.study_uid, tmp_path)
        stage("one result set in the PACS")
        # The uploads' prefetch hints reached the worker host and its workers ran them.
        worker_logs = "".join(path.read_text(errors="replace") for path in root.rglob("worker.log"))
        assert "hinted instance(s)" in worker_logs and "instance(s) stopped" not in worker_logs

        ((state, attempts, finished_by),) = receiver.query(
            "SELECT state, attempts, claimed_by FROM jobs WHERE id = :id", id=job_id
        )
        assert (state, attempts, finished_by) == ("SUCCEEDED", 2, survivor)
        assert receiver.query("SELECT count(*) FROM results")[0][0] == 2
        assert receiver.query("SELECT state, count(*) FROM deliveries GROUP BY state") == [("SENT", 2)]

        code, report = _status(receiver)
        nodes = {node["node"]: node for node in report["worker_nodes"]}
        assert nodes[victim]["state"] == "lost" and nodes[victim]["stale"]
        assert nodes[survivor]["state"] == "ready" and not nodes[survivor]["stale"]
        assert any(victim in problem for problem in report["problems"]) and code == 1
        assert report["storage"]["error"] is None

        stage("status checked")
        # Prometheus scrapes each host: the job ran on the worker host, the deliveries on the receiver.
        worker_text = httpx.get(f"http://127.0.0.1:{metrics_ports[survivor]}/metrics", timeout=10).text
        on_worker = samples(worker_text)
        assert value(on_worker, "pacs_ai_jobs_total", outcome="succeeded") == 1, worker_text
        # Every instance reached the survivor's cache once: by its prefetch hints or by the job itself.
        assert value(on_worker, "pacs_ai_storage_fetches_total") == len(phantom.paths), worker_text
        ((analyzer,),) = receiver.query("SELECT DISTINCT analyzer FROM jobs")
        for step in ("fetch", "load", "analyze", "encode", "store", "record"):
            assert value(on_worker, "pacs_ai_job_stage_seconds_count", stage=step, analyzer=analyzer) == 1
        on_receiver = samples(receiver.scrape())
        assert value(on_receiver, "pacs_ai_jobs_total") == 0
        assert value(on_receiver, "pacs_ai_deliveries_total", destination="pacs", state="sent") == 2
        assert value(on_receiver, "pacs_ai_ingest_instances_total") == len(phantom.paths)
        # The receiver put every instance into the object store; nothing waits for it any more.
        uploaded = value(on_receiver, "pacs_ai_storage_uploads_total", outcome="uploaded")
        assert uploaded == len(phantom.paths)
        wait_for(
            lambda: (
                (scraped := samples(receiver.scrape()))
                and value(scraped, "pacs_ai_workers", state="lost") == 1
                and value(scraped, "pacs_ai_workers", state="ready") >= 1
                and ("pacs_ai_storage_backlog_instances", frozenset()) in scraped
                and value(scraped, "pacs_ai_storage_backlog_instances") == 0
            ),
            timeout=30,
            description="the lost worker and the empty upload backlog in the receiver's metrics",
        )
        refused, report = _status(receiver, PACS_AI_STORAGE_S3_SECRET_ACCESS_KEY="not-the-secret")
        assert refused == 1 and report["storage"]["error"]
        assert any("storage" in problem for problem in report["problems"])
    except BaseException:
        print(f"---- receiver logs\n{receiver.stderr_tail()}\n{receiver.logs()}")
        if host is not None:
            print(f"---- worker host logs\n{host.logs()}")
        raise
    finally:
        for worker in workers.values():
            _stop_process(worker, group=True)
        receiver.stop()
