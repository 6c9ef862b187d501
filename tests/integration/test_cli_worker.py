"""``pacs-ai worker`` and the workers in ``pacs-ai status``: refusals, a real worker's life in the index.

``pacs-ai worker`` runs as its own process (a refusal that failed would start a worker), but for
an unknown queue name; the verbs that read the index (``status``, ``workers forget``, ``db
upgrade``) run in this process.

The worker runs against a real Redis (127.0.0.1:6379, a database number of its
own) and a SQLite index; what it writes into the index (starting, ready, its
device, heartbeats, stopped) is what ``pacs-ai status`` on any host reads.
"""

from __future__ import annotations

import json
import os
import random
import signal
from datetime import timedelta
from pathlib import Path

import redis

from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import WorkerNode
from pacs_ai.index.workers import register_worker
from tests.integration.test_cli import pacs_ai, pacs_ai_in_process
from tests.peers import wait_for
from tests.service import REDIS_TEST_URL, start_worker


def _index(data_dir: Path) -> str:
    assert pacs_ai_in_process("db", "upgrade", PACS_AI_DATA_DIR=str(data_dir)).returncode == 0
    return f"sqlite:///{data_dir / 'index.sqlite3'}"


def test_the_worker_refuses_to_start_and_says_what_to_fix(tmp_path: Path) -> None:
    no_index = pacs_ai("worker", "--queues", "cpu", PACS_AI_DATA_DIR=str(tmp_path / "nothing"))
    assert no_index.returncode == 1 and "database_url" in no_index.stdout

    _index(tmp_path)
    no_broker = pacs_ai("worker", "--queues", "gpu", PACS_AI_DATA_DIR=str(tmp_path))
    assert no_broker.returncode == 1 and "broker_url" in no_broker.stdout

    unreachable = pacs_ai(
        "worker", PACS_AI_DATA_DIR=str(tmp_path), PACS_AI_BROKER_URL="redis://127.0.0.1:1/0"
    )
    assert unreachable.returncode == 1 and "cannot be reached" in unreachable.stdout

    # In this process: the queue names are checked first, and were they not, the missing broker refuses.
    unknown = pacs_ai_in_process("worker", "--queues", "gpu,video", PACS_AI_DATA_DIR=str(tmp_path))
    assert unknown.returncode == 2 and "video" in unknown.stderr


def test_status_lists_a_silent_worker_of_another_host_as_stale(tmp_path: Path) -> None:
    url = _index(tmp_path)
    sessions = make_session_factory(make_engine(url))
    with session_scope(sessions) as session:
        register_worker(
            session,
            node="pacs-ai-gpu@gpu-server-7",
            hostname="gpu-server-7",
            pid=4242,
            queues=["gpu"],
            concurrency=1,
            device={"type": "cuda", "device": "cuda:0", "count": 1, "gpus": []},
            version="test",
        )
        for worker in session.query(WorkerNode):
            worker.heartbeat_at -= timedelta(minutes=5)

    result = pacs_ai_in_process("status", "--json", PACS_AI_DATA_DIR=str(tmp_path))
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 1
    (node,) = report["worker_nodes"]
    assert (node["node"], node["hostname"], node["queues"], node["stale"]) == (
        "pacs-ai-gpu@gpu-server-7",
        "gpu-server-7",
        ["gpu"],
        True,
    )
    assert node["seconds_since_heartbeat"] >= 300 and node["jobs_running"] == 0
    assert any("gpu-server-7" in p and "no heartbeat" in p for p in report["problems"])
    assert report["storage"]["error"] is None and report["workers_ready"] == []

    text = pacs_ai_in_process("status", PACS_AI_DATA_DIR=str(tmp_path))
    assert "pacs-ai-gpu@gpu-server-7" in text.stdout and "stale" in text.stdout

    one = pacs_ai_in_process(
        "status", "--node", "pacs-ai-gpu@gpu-server-7", "--json", PACS_AI_DATA_DIR=str(tmp_path)
    )
    assert one.returncode == 1 and "no heartbeat" in " ".join(json.loads(one.stdout)["problems"])
    missing = pacs_ai_in_process("status", "--node", "nobody@nowhere", PACS_AI_DATA_DIR=str(tmp_path))
    assert missing.returncode == 1 and "no worker nobody@nowhere" in missing.stdout


def test_a_worker_registers_beats_answers_and_stops_cleanly(tmp_path: Path) -> None:
    _index(tmp_path)
    broker = f"{REDIS_TEST_URL}/{random.randint(1, 15)}"
    redis.Redis.from_url(broker).flushdb()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")},
        "PACS_AI_DATA_DIR": str(tmp_path),
        "PACS_AI_BROKER_URL": broker,
        "PACS_AI_WORKER_HEARTBEAT_SECONDS": "1",
        "PACS_AI_WORKER_STALE_AFTER_SECONDS": "5",
    }
    node = "pacs-ai-cpu@test-host"
    worker = start_worker(env, node, tmp_path, queues="cpu")
    try:

        def checked() -> dict[str, object] | None:
            result = pacs_ai_in_process(
                "status", "--node", node, "--json", **{k: v for k, v in env.items() if "PACS_AI" in k}
            )
            return json.loads(result.stdout)["worker"] if result.returncode == 0 else None

        row = wait_for(checked, timeout=120, interval=1.0, description="the worker ready in the index")
        assert row is not None
        assert row["state"] == "ready" and row["queues"] == ["cpu"] and row["answering"] is True
        assert row["device"]["type"] == "cpu" and row["device"]["memory_mb"] > 0  # type: ignore[index]
        assert row["pid"] == worker.pid and row["concurrency"] == 1
        refused = pacs_ai_in_process(
            "workers", "forget", node, **{k: v for k, v in env.items() if "PACS_AI" in k}
        )
        assert refused.returncode == 1 and "answers over the broker" in refused.stdout
    finally:
        os.killpg(worker.pid, signal.SIGTERM)  # a warm shutdown
        worker.wait(timeout=60)
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}"))
    with session_scope(sessions) as session:
        (stopped,) = session.query(WorkerNode).all()
        assert stopped.state.value == "stopped" and stopped.stopped_at is not None
        assert stopped.heartbeat_at > stopped.started_at
    # Stopped for good (its host retired): forgotten, without --force.
    forgotten = pacs_ai_in_process(
        "workers", "forget", node, "--json", **{k: v for k, v in env.items() if "PACS_AI" in k}
    )
    assert forgotten.returncode == 0, forgotten.stdout
    assert json.loads(forgotten.stdout)["state"] == "stopped"
    with session_scope(sessions) as session:
        assert session.query(WorkerNode).count() == 0
