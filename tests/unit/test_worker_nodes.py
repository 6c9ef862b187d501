"""Worker nodes on many hosts: the worker verb's options, the queues a host serves, heartbeats."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.cli.status import describe_device
from pacs_ai.cli.worker import QUEUE_NAMES, default_node_name, parse_queues
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Job, JobState, Series, Study, WorkerNode, WorkerState
from pacs_ai.index.workers import (
    beat,
    list_workers,
    record_process_models,
    register_worker,
    set_worker_state,
    take_lost_workers,
)
from pacs_ai.service import WorkerSpec, plan_workers
from workers.factory import QUEUES
from workers.heartbeat import visible_gpus


def test_the_verb_knows_the_queues_the_workers_have() -> None:
    assert tuple(QUEUE_NAMES) == tuple(QUEUES)


def test_queues_are_parsed_deduplicated_and_checked() -> None:
    assert parse_queues("gpu") == ["gpu"]
    assert parse_queues(" gpu, cpu ,gpu") == ["gpu", "cpu"]
    with pytest.raises(typer.BadParameter, match="unknown queue"):
        parse_queues("gpu,video")
    with pytest.raises(typer.BadParameter):
        parse_queues(" , ")


def test_default_node_names_say_what_a_worker_serves_and_where() -> None:
    assert default_node_name(["gpu"], "gpu-server-1") == "pacs-ai-gpu@gpu-server-1"
    assert default_node_name(["gpu", "cpu"], "h") == "pacs-ai-gpu-cpu@h"


def test_a_receiver_can_serve_the_dispatch_queue_alone() -> None:
    assert plan_workers(1, 2, [], ["dispatch"]) == [WorkerSpec("pacs-ai-0", ("dispatch",), 2)]
    # GPUs on a host that does not serve the gpu queue get no worker.
    assert plan_workers(1, 2, ["0"], ["dispatch", "cpu"]) == [WorkerSpec("pacs-ai-0", ("dispatch", "cpu"), 2)]
    # A GPU-only host: no CPU worker with nothing to serve.
    assert plan_workers(1, 2, ["0"], ["gpu"]) == [WorkerSpec("pacs-ai-gpu0", ("gpu",), 1, "0")]


def test_staleness_must_leave_room_for_missed_heartbeats(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="worker_stale_after_seconds"):
        Settings(data_dir=tmp_path, worker_heartbeat_seconds=10, worker_stale_after_seconds=15)
    Settings(data_dir=tmp_path, worker_heartbeat_seconds=1, worker_stale_after_seconds=5)


GPUS = [
    {"index": "0", "uuid": "GPU-aaaa-1111", "name": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960},
    {"index": "1", "uuid": "GPU-bbbb-2222", "name": "NVIDIA L4", "memory_mb": 23034},
]


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus(GPUS, None) == GPUS
    assert visible_gpus(GPUS, "1") == [GPUS[1]]
    assert visible_gpus(GPUS, "GPU-bbbb,0") == [GPUS[1], GPUS[0]]
    assert visible_gpus(GPUS, "7,0") == []  # CUDA stops at the first entry naming no device
    assert visible_gpus(GPUS, "") == []


def test_devices_are_described_in_a_few_words() -> None:
    cuda = {"type": "cuda", "device": "cuda:0", "count": 1, "gpus": [GPUS[1]]}
    assert describe_device(cuda) == "cuda:0 NVIDIA L4 (23034 MB)"
    assert (
        describe_device({"type": "cuda", "device": "cuda:0", "count": 2, "gpus": []}) == "cuda:0 2 device(s)"
    )
    assert describe_device({"type": "cpu", "cores": 8, "memory_mb": 32000}) == "cpu 8 cores, 32000 MB"
    assert describe_device(None) == "?"


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    upgrade_schema(url)
    return make_session_factory(make_engine(url))


def _register(session: Session, node: str, queues: list[str]) -> None:
    register_worker(
        session,
        node=node,
        hostname=node.split("@")[1],
        pid=100,
        queues=queues,
        concurrency=1,
        device={"type": "cpu", "cores": 2, "memory_mb": 1000},
        version="test",
    )


def test_heartbeats_models_and_running_jobs_in_the_index(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        _register(session, "pacs-ai-gpu@gpu-1", ["gpu"])
        _register(session, "pacs-ai-cpu@cpu-1", ["cpu", "dispatch"])
        set_worker_state(session, "pacs-ai-gpu@gpu-1", WorkerState.READY)
        record_process_models(session, "pacs-ai-gpu@gpu-1", 201, ["spleen"])
        record_process_models(session, "pacs-ai-gpu@gpu-1", 202, ["lungs", "spleen"])
        study = Study(study_instance_uid="1.2.3")
        session.add(study)
        session.flush()
        series = Series(series_instance_uid="1.2.3.4", study_fk=study.id)
        session.add(series)
        session.flush()
        for key, state in (("a", JobState.RUNNING), ("b", JobState.RUNNING), ("c", JobState.SUCCEEDED)):
            session.add(
                Job(
                    idempotency_key=key,
                    series_fk=series.id,
                    profile="p",
                    analyzer="a",
                    analyzer_version="1",
                    version=1,
                    instance_count=1,
                    state=state,
                    claimed_by="pacs-ai-gpu@gpu-1",
                )
            )
    with session_scope(sessions) as session:
        views = {view.node: view for view in list_workers(session, stale_after_seconds=60)}
    gpu = views["pacs-ai-gpu@gpu-1"]
    assert (gpu.hostname, gpu.queues, gpu.state, gpu.stale) == ("gpu-1", ["gpu"], "ready", False)
    assert gpu.models_loaded == ["lungs", "spleen"] and gpu.jobs_running == 2
    assert views["pacs-ai-cpu@cpu-1"].state == "starting" and views["pacs-ai-cpu@cpu-1"].jobs_running == 0

    # Pool process 202 was replaced: its models are no longer reported.
    with session_scope(sessions) as session:
        assert beat(session, "pacs-ai-gpu@gpu-1", [201, 203])
        assert not beat(session, "pacs-ai-unknown@nowhere", [])
    with session_scope(sessions) as session:
        assert list_workers(session, 60)[1].models_loaded == ["spleen"]


def test_silent_workers_are_stale_then_lost_once_and_stopped_ones_never(
    sessions: sessionmaker[Session],
) -> None:
    with session_scope(sessions) as session:
        for node in ("a@h1", "b@h2", "c@h3"):
            _register(session, node, ["cpu"])
        set_worker_state(session, "c@h3", WorkerState.STOPPED)
        for worker in session.query(WorkerNode):
            worker.heartbeat_at -= timedelta(seconds=120)
        # b beats again: alive.
        beat(session, "b@h2", [])
    with session_scope(sessions) as session:
        stale = {v.node: v.stale for v in list_workers(session, stale_after_seconds=60)}
    assert stale == {"a@h1": True, "b@h2": False, "c@h3": False}

    with session_scope(sessions) as session:
        assert take_lost_workers(session, 60) == ["a@h1"]
    with session_scope(sessions) as session:
        assert take_lost_workers(session, 60) == []  # handed back once
        views = {v.node: v for v in list_workers(session, 60)}
    assert views["a@h1"].state == "lost" and views["a@h1"].stale
    assert views["c@h3"].state == "stopped"

    # A lost worker that beats again (a healed network) is ready again.
    with session_scope(sessions) as session:
        beat(session, "a@h1", [])
    with session_scope(sessions) as session:
        views = {v.node: v for v in list_workers(session, 60)}
    assert views["a@h1"].state == "ready" and not views["a@h1"].stale
