"""``pacs-ai workers list`` and ``workers forget``: a worker host gone for good leaves the index once.

The workers here are rows as a worker on another host writes them (through the
same index functions); a real worker's life (ready, answering over the broker,
refused by ``forget`` while it runs, forgotten once stopped) is in
``test_cli_worker.py``.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from pacs_ai.cli.main import app
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Job, JobState, Series, Study, WorkerNode, WorkerState
from pacs_ai.index.workers import (
    forget_silent_workers,
    hand_back_running_jobs,
    register_worker,
    set_worker_state,
    take_lost_workers,
)

#: No broker listens here: the commands must not hang on it, and the heartbeat alone decides.
NO_BROKER = "redis://127.0.0.1:1/0"


def _index(data_dir: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{data_dir / 'index.sqlite3'}"
    upgrade_schema(url)
    return make_session_factory(make_engine(url))


def _worker(session: Session, node: str, *, silent_for: timedelta, state: WorkerState) -> None:
    register_worker(
        session,
        node=node,
        hostname=node.split("@")[1],
        pid=4242,
        queues=["gpu"],
        concurrency=1,
        device={"type": "cpu", "cores": 2, "memory_mb": 1000},
        version="test",
    )
    set_worker_state(session, node, state)
    worker = session.scalars(select(WorkerNode).where(WorkerNode.node == node)).one()
    worker.heartbeat_at -= silent_for


def _running_job(session: Session, node: str) -> int:
    study = Study(study_instance_uid="1.2.3")
    session.add(study)
    session.flush()
    series = Series(series_instance_uid="1.2.3.4", study_fk=study.id)
    session.add(series)
    session.flush()
    job = Job(
        idempotency_key="k",
        series_fk=series.id,
        profile="p",
        analyzer="a",
        analyzer_version="1",
        version=1,
        instance_count=1,
        state=JobState.RUNNING,
        claimed_by=node,
        queue="gpu",
    )
    session.add(job)
    session.flush()
    return job.id


@pytest.fixture(autouse=True)
def _no_other_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PACS_AI_")]:
        monkeypatch.delenv(name)


def _cli(data_dir: Path, *args: str) -> tuple[int, str]:
    """``pacs-ai ARGS`` in this process (the commands, not their start-up, are under test: seconds saved)."""
    result = CliRunner().invoke(
        app, list(args), env={"PACS_AI_DATA_DIR": str(data_dir), "PACS_AI_BROKER_URL": NO_BROKER}
    )
    return result.exit_code, result.output


def test_a_gone_worker_is_forgotten_once_its_job_queued_again_once_and_audited(tmp_path: Path) -> None:
    sessions = _index(tmp_path)
    gone, alive = "pacs-ai-gpu@gpu-server-7", "pacs-ai-gpu@gpu-server-8"
    with session_scope(sessions) as session:
        _worker(session, gone, silent_for=timedelta(minutes=5), state=WorkerState.READY)
        _worker(session, alive, silent_for=timedelta(seconds=1), state=WorkerState.READY)
        job_id = _running_job(session, gone)

    code, out = _cli(tmp_path, "status", "--json")
    assert code == 1 and any(gone in p for p in json.loads(out)["problems"])

    code, out = _cli(tmp_path, "workers", "forget", alive)
    assert code == 1 and "still running" in out and "--force" in out
    code, out = _cli(tmp_path, "workers", "forget", gone, "--json")
    assert code == 0, out
    forgotten = json.loads(out)
    assert forgotten["jobs_queued_again"] == [job_id] and forgotten["hostname"] == "gpu-server-7"
    assert forgotten["enqueued"] is False  # no broker: the job waits in the index for `pacs-ai serve`

    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.state, job.claimed_by) == (JobState.QUEUED, None)
        assert [w.node for w in session.scalars(select(WorkerNode))] == [alive]
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "worker.forgotten"))
        assert event.object_uid == gone and event.actor.startswith("cli")
        assert event.detail is not None and event.detail["jobs_queued_again"] == [job_id]
        assert event.detail["hostname"] == "gpu-server-7" and event.detail["state"] == "ready"

    code, out = _cli(tmp_path, "workers", "forget", gone)
    assert code == 1 and "no worker" in out, "forgotten once"
    code, out = _cli(tmp_path, "status", "--json")
    report = json.loads(out)
    assert [n["node"] for n in report["worker_nodes"]] == [alive]
    assert not any(gone in p for p in report["problems"])

    # --force forgets a worker that still beats (it would register again at its next heartbeat).
    code, out = _cli(tmp_path, "workers", "forget", alive, "--force")
    assert code == 0 and "forgot worker" in out
    assert _cli(tmp_path, "workers", "list", "--json") == (0, "[]\n")


def test_lost_and_stopped_workers_leave_status_after_worker_forget_after_hours(tmp_path: Path) -> None:
    sessions = _index(tmp_path)
    with session_scope(sessions) as session:
        _worker(session, "old@lost-host", silent_for=timedelta(hours=30), state=WorkerState.READY)
        _worker(session, "old@stopped-host", silent_for=timedelta(hours=30), state=WorkerState.STOPPED)
        _worker(session, "new@lost-host", silent_for=timedelta(hours=2), state=WorkerState.READY)
        job_id = _running_job(session, "old@lost-host")
    with session_scope(sessions) as session:
        assert sorted(take_lost_workers(session, 60)) == ["new@lost-host", "old@lost-host"]
        assert hand_back_running_jobs(session, "old@lost-host") == [job_id]  # as the scheduler does
        assert hand_back_running_jobs(session, "old@lost-host") == []  # nothing twice

    code, out = _cli(tmp_path, "status", "--json")
    report = json.loads(out)
    assert [n["node"] for n in report["worker_nodes"]] == ["new@lost-host"], "older ones dropped"
    assert [p for p in report["problems"] if "@" in p] == [
        p for p in report["problems"] if "new@lost-host" in p
    ]
    code, out = _cli(tmp_path, "workers", "list", "--json")
    assert code == 0 and len(json.loads(out)) == 3, "list shows all the index holds"
    code, out = _cli(
        tmp_path,
        "--config",
        str(_settings_file(tmp_path, "worker_forget_after_hours: 48")),
        "status",
        "--json",
    )
    assert len(json.loads(out)["worker_nodes"]) == 3

    # The receiver's housekeeping removes them from the index, audited, queueing nothing again.
    with session_scope(sessions) as session:
        forgotten = forget_silent_workers(session, 24)
    assert sorted(f.node for f in forgotten) == ["old@lost-host", "old@stopped-host"]
    assert all(f.jobs_queued_again == [] for f in forgotten)
    with session_scope(sessions) as session:
        assert [w.node for w in session.scalars(select(WorkerNode))] == ["new@lost-host"]
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "worker.forgotten"))
        assert list(actors) == ["service", "service"]
        assert forget_silent_workers(session, None) == []


def _settings_file(directory: Path, line: str) -> Path:
    path = directory / "settings.yaml"
    path.write_text(f"data_dir: {directory}\nbroker_url: {NO_BROKER}\n{line}\n", encoding="utf-8")
    return path


def test_a_lost_workers_job_reaches_the_broker_once_whoever_hands_it_back(tmp_path: Path) -> None:
    """The scheduler finding the worker lost and an administrator forgetting it: one message in Redis."""
    import random

    import redis

    from pacs_ai.config import Settings
    from pacs_ai.route.scheduler import Scheduler
    from tests.service import REDIS_TEST_URL
    from workers.factory import create_app
    from workers.task_queue import CeleryTaskQueue

    broker = f"{REDIS_TEST_URL}/{random.randint(1, 15)}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    sessions = _index(tmp_path)
    gone = "pacs-ai-gpu@gpu-server-9"
    with session_scope(sessions) as session:
        _worker(session, gone, silent_for=timedelta(minutes=5), state=WorkerState.READY)
        job_id = _running_job(session, gone)
    # The administrator first: the job goes to the broker from the CLI ...
    result = CliRunner().invoke(
        app,
        ["workers", "forget", gone, "--json"],
        env={"PACS_AI_DATA_DIR": str(tmp_path), "PACS_AI_BROKER_URL": broker},
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.output)["jobs_queued_again"] == [job_id] and json.loads(result.output)["enqueued"]
    )
    # ... then the scheduler, which found the worker lost meanwhile, has nothing left to hand back.
    settings = Settings(data_dir=tmp_path, broker_url=broker)
    scheduler = Scheduler(settings, sessions, CeleryTaskQueue(create_app(settings)))
    assert scheduler.requeue_jobs_of(gone) == []
    messages = sum(client.llen(key) for key in client.scan_iter("gpu*") if client.type(key) == b"list")
    assert messages == 1
    client.flushdb()
