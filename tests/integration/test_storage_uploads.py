"""Durability with an object store: spool first, upload after, routing only once uploaded (and at once
then); the backlog limit; and migration 0006 turning recorded host paths into storage keys."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

from alembic import command
from celery import Celery
from pydicom import dcmread
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.config import Settings
from pacs_ai.index.db import alembic_config, make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Instance, Job, RoutingState, Series, utcnow
from pacs_ai.index.workers import register_worker
from pacs_ai.jobs.prefetch import prefetch_instances
from pacs_ai.receive.headers import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from pacs_ai.receive.store import StoreHandler
from pacs_ai.receive.uploader import Uploader
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.route.scheduler import Scheduler
from pacs_ai.storage import open_storage
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import spool_path
from tests.integration.synthetic_ct import make_ct_series, write_series
from tests.integration.test_reprocess_index import SENDER
from tests.object_store import SeaweedS3, storage_settings
from tests.peers import free_port, wait_for
from workers.celery_app import ANALYZE_TASK, PREFETCH_TASK
from workers.factory import create_app
from workers.task_queue import CeleryTaskQueue


def _store(handler: StoreHandler, sources: list[Path], incoming: Path) -> list[tuple[int, str | None]]:
    """C-STORE each file as the listener does; the (status, comment) answers."""
    incoming.mkdir(exist_ok=True)
    answers = []
    for source in sources:
        temp = incoming / source.name
        shutil.copyfile(source, temp)
        meta = dcmread(source, stop_before_pixels=True).file_meta
        answers.append(
            handler.store(
                temp,
                sender=SENDER,
                sop_class=str(meta.MediaStorageSOPClassUID),
                sop_instance=str(meta.MediaStorageSOPInstanceUID),
            )
        )
        temp.unlink(missing_ok=True)
    return answers


def test_unreachable_store_fills_the_backlog_then_instances_are_refused_and_nothing_is_lost(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    reachable = storage_settings(object_store)
    unreachable = {
        **reachable,
        "storage_s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
        "storage_timeout_seconds": 1,
    }
    common = {
        "data_dir": tmp_path / "data",
        "fsync": False,
        "min_free_disk_mb": 0,
        "storage_upload_backlog_max": 3,
    }
    settings = Settings(**common, **unreachable)
    settings.data_dir.mkdir()
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    sources = write_series(make_ct_series(5, 16, 16), tmp_path / "sources")

    answers = _store(StoreHandler(settings), sources, tmp_path / "incoming")
    assert [status for status, _ in answers] == [STATUS_SUCCESS] * 3 + [STATUS_OUT_OF_RESOURCES] * 2
    reason = answers[3][1] or ""
    assert "3 acknowledged instances are not yet in the object store" in reason
    assert "storage_upload_backlog_max" in reason
    with session_scope(sessions) as session:
        rejected = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.rejected")).all()
        assert len(rejected) == 2 and rejected[0].detail and rejected[0].detail["status"] == "0xA700"

    # The store is down: the uploader records nothing as uploaded, and the router waits.
    failing = Uploader(settings, sessions).run_once()
    assert failing.uploaded == 0 and failing.failed == 3 and failing.error
    later = utcnow() + timedelta(seconds=60)
    with session_scope(sessions) as session:
        routing = route_ready_series(session, [], now=later, default_quiet_seconds=1, require_uploaded=True)
        assert routing.new_jobs == []
        assert session.scalar(select(Series.routing_state)) == RoutingState.RECEIVING

    # Back up (a restart with the same index and spool): what was acknowledged goes up first.
    restarted = Settings(**common, **reachable)
    done = Uploader(restarted, sessions).run_once()
    assert (done.uploaded, done.failed, done.error) == (3, 0, None)
    storage = open_storage(restarted)
    with session_scope(sessions) as session:
        rows = session.execute(select(Instance.path, Instance.uploaded_at)).all()
        assert len(rows) == 3 and all(at is not None for _, at in rows)
        assert all(storage.exists(key) for key, _ in rows)
        route_ready_series(session, [], now=later, default_quiet_seconds=1, require_uploaded=True)
        assert session.scalar(select(Series.routing_state)) == RoutingState.UNMATCHED  # decided now

    # With the backlog empty, the refused instances are accepted when sent again.
    again = _store(StoreHandler(restarted), sources[3:], tmp_path / "again")
    assert [status for status, _ in again] == [STATUS_SUCCESS] * 2


#: A profile taking any CT series (the synthetic one has no body part) to the built-in lung analyzer.
_ANY_CT = """
name: any-ct
match:
  modality: [CT]
analyzers:
  - name: ct-chest-lung
    queue: cpu
destinations: []
"""


def any_ct_index(tmp_path: Path, **extra: object) -> tuple[Settings, sessionmaker[Session]]:
    """Settings, a spool and an index (SQLite) under ``tmp_path`` with one profile that sends any CT
    to the lung analyzer; ``extra`` adds settings."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "any-ct.yaml").write_text(_ANY_CT)
    settings = Settings(
        data_dir=tmp_path / "data",
        fsync=False,
        min_free_disk_mb=0,
        profiles_dir=profiles,
        broker_url="memory://",
        **extra,
    )
    settings.data_dir.mkdir()
    upgrade_schema(settings.effective_database_url)
    return settings, make_session_factory(make_engine(settings.effective_database_url))


def _received_series(
    object_store: SeaweedS3, tmp_path: Path, instances: int, **extra: object
) -> tuple[Settings, sessionmaker[Session]]:
    """An index and spool on ``object_store`` that have received one CT series of ``instances``, not
    yet uploaded; any CT is routed at once (no quiet period, unless ``extra`` sets one) and only an
    upload triggers routing (the scheduler's own interval is ten minutes)."""
    settings, sessions = any_ct_index(
        tmp_path,
        **{
            "quiet_period_seconds": 0,
            "scheduler_interval_seconds": 600,
            **storage_settings(object_store),
            **extra,
        },
    )
    sources = write_series(make_ct_series(instances, 16, 16), tmp_path / "sources")
    assert [status for status, _ in _store(StoreHandler(settings), sources, tmp_path / "incoming")] == [
        STATUS_SUCCESS
    ] * instances
    return settings, sessions


def test_a_quiet_series_is_routed_the_moment_its_last_upload_lands(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    """The uploader's thread routes as soon as it has put the last waiting instance into the store.

    The scheduler's own pass never runs here (its interval is ten minutes), so only the upload
    can have routed the series; the job is opened after every instance is in the store.
    """
    settings, sessions = _received_series(object_store, tmp_path, 4)

    def routing_state() -> RoutingState:
        with session_scope(sessions) as session:
            return session.scalars(select(Series.routing_state)).one()

    assert routing_state() == RoutingState.RECEIVING
    app = create_app(settings)
    _queued(app, "cpu")  # the in-memory broker is the process's: what earlier tests left there goes
    _worker_serving(sessions, "cpu")
    scheduler = Scheduler(app.settings, sessions, CeleryTaskQueue(app))
    scheduler.start_uploads()
    try:
        wait_for(lambda: routing_state() == RoutingState.ROUTED, timeout=60, description="the series routed")
    finally:
        scheduler.stop_uploads(timeout=60)
    with session_scope(sessions) as session:
        uploaded = session.scalars(select(Instance.uploaded_at)).all()
        job = session.scalars(select(Job)).one()
        assert len(uploaded) == 4 and None not in uploaded
        assert max(uploaded) <= job.created_at, "a job opened before its series was in the store"
        job_id = job.id
    # The job, and the upload's prefetch hint for the queue the profile names (see the next test).
    assert sorted(_queued(app, "cpu")) == [(ANALYZE_TASK, job_id), (PREFETCH_TASK, [1, 2, 3, 4])]


def _worker_serving(sessions: sessionmaker[Session], queue: str, node: str = "w1@gpu-host") -> None:
    """A worker on another host, registered and beating, that serves ``queue``."""
    with session_scope(sessions) as session:
        register_worker(
            session,
            node=node,
            hostname="gpu-host",
            pid=4242,
            queues=[queue],
            concurrency=1,
            device={"type": "cpu"},
            version=None,
        )


def _fetched_by(fetcher: str) -> float:
    """This process's ``pacs_ai_storage_fetches_total`` of ``fetcher``."""
    found = metrics.registry().get_sample_value("pacs_ai_storage_fetches_total", {"fetcher": fetcher})
    return found or 0.0


def _queued(app: Celery, queue_name: str) -> list[tuple[str, object]]:
    """The (task name, first argument) of every message waiting in ``queue_name``, taken off it."""
    taken = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(queue_name)
        try:
            while True:
                try:
                    message = queue.get(timeout=1)
                except queue.Empty:
                    break
                taken.append((message.headers["task"], message.payload[0][0]))
                message.ack()
        finally:
            queue.close()
    return taken


def test_uploads_send_prefetch_hints_that_fetch_the_series_into_a_worker_cache(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    """Each upload batch is hinted to the queue of the profile that will analyse the series; a worker
    on another host (its own data directory: no spool) fetches the instances into its cache, so its
    job fetches nothing.  Off with ``worker_prefetch = false``; a series no profile takes is not hinted."""
    settings, sessions = _received_series(object_store, tmp_path, 4, quiet_period_seconds=3600)
    app = create_app(settings)
    _queued(app, "cpu")  # what earlier tests left in the process's in-memory broker
    scheduler = Scheduler(app.settings, sessions, CeleryTaskQueue(app))
    with session_scope(sessions) as session:
        ids = sorted(session.scalars(select(Instance.id)))
        keys = list(session.scalars(select(Instance.path).order_by(Instance.id)))
    # No worker serves the queue yet: a hint would only wait there.
    assert scheduler.hint_prefetch(ids) == []
    _worker_serving(sessions, "gpu", node="w0@other-host")
    assert scheduler.hint_prefetch(ids) == []
    _worker_serving(sessions, "cpu")
    assert scheduler.uploader.run_once(after_batch=scheduler.hint_prefetch).uploaded == 4
    assert _queued(app, "cpu") == [(PREFETCH_TASK, ids)]

    worker = settings.model_copy(update={"data_dir": tmp_path / "worker-host"})
    files = HostFiles(worker)
    assert not any(files.cache.path_of(key).exists() for key in keys)
    fetched_before = _fetched_by("prefetch")
    assert prefetch_instances(worker, sessions, ids, files) == 4
    assert _fetched_by("prefetch") == fetched_before + 4
    assert all(files.cache.path_of(key).is_file() for key in keys)
    assert prefetch_instances(worker, sessions, ids) == 0  # a second hint: nothing left to fetch
    job_files = HostFiles(worker)
    assert [path.read_bytes() for path in job_files.local_paths(keys)] == [
        spool_path(settings.spool_dir, key).read_bytes() for key in keys
    ]
    assert job_files.fetched_objects == 0

    # Once the series is routed a hint leaves the fetch to the job (a later hint, another host).
    with session_scope(sessions) as session:
        session.execute(update(Instance).values(routed=True))
    late = settings.model_copy(update={"data_dir": tmp_path / "another-worker-host"})
    assert prefetch_instances(late, sessions, ids) == 0
    assert not any(HostFiles(late).cache.path_of(key).exists() for key in keys)
    with session_scope(sessions) as session:
        session.execute(update(Instance).values(routed=False))
    assert len(scheduler.hint_prefetch(ids)) == 1  # the checks below turn a hint down for their reason
    _queued(app, "cpu")

    off = Scheduler(settings.model_copy(update={"worker_prefetch": False}), sessions, CeleryTaskQueue(app))
    assert off.hint_prefetch(ids) == []
    (settings.profiles_dir / "any-ct.yaml").write_text(_ANY_CT.replace("[CT]", "[MR]"))
    assert scheduler.hint_prefetch(ids) == []
    assert _queued(app, "cpu") == []


def test_uploads_wait_while_a_burst_arrives_and_never_longer_than_the_longest_hold(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    """``storage_upload_hold_ms``: nothing is uploaded until no instance has arrived for that long,
    unless the oldest waiting one has waited ``storage_upload_max_hold_seconds``; then the uploader's
    thread uploads (and routes) as usual."""
    settings, sessions = _received_series(
        object_store, tmp_path, 3, storage_upload_hold_ms=2000, storage_upload_max_hold_seconds=30
    )
    uploader = Uploader(settings, sessions)

    def received(newest_ago: float, oldest_ago: float) -> None:
        with session_scope(sessions) as session:
            ids = sorted(session.scalars(select(Instance.id)))
            now = utcnow()
            for instance_id, ago in zip(ids, [oldest_ago, newest_ago, newest_ago], strict=True):
                session.get_one(Instance, instance_id).received_at = now - timedelta(seconds=ago)

    received(newest_ago=0.5, oldest_ago=1.0)
    assert 1.0 <= uploader.hold_seconds() <= 1.5  # until two seconds after the newest
    received(newest_ago=0.5, oldest_ago=29.8)
    assert 0 < uploader.hold_seconds() <= 0.2  # until the oldest has waited thirty seconds
    received(newest_ago=0.5, oldest_ago=31.0)
    assert uploader.hold_seconds() == 0  # the oldest waited long enough: a stream never holds forever
    received(newest_ago=2.5, oldest_ago=3.0)
    assert uploader.hold_seconds() == 0  # the burst is over
    received(newest_ago=-3600, oldest_ago=-3600)
    assert uploader.hold_seconds() == 0  # the clock was set back an hour: no hour-long hold
    assert Uploader(settings.model_copy(update={"storage_upload_hold_ms": 0}), sessions).hold_seconds() == 0

    received(newest_ago=0.0, oldest_ago=0.0)
    app = create_app(settings)
    scheduler = Scheduler(app.settings, sessions, CeleryTaskQueue(app))
    scheduler.start_uploads()
    try:
        wait_for(
            lambda: uploader.backlog() == 0, timeout=60, interval=0.05, description="the instances uploaded"
        )
    finally:
        scheduler.stop_uploads(timeout=60)
    with session_scope(sessions) as session:
        rows = session.execute(select(Instance.received_at, Instance.uploaded_at)).all()
        held = min(uploaded for _, uploaded in rows) - max(arrived for arrived, _ in rows)
        assert held >= timedelta(seconds=1.9), held
        assert session.scalars(select(Series.routing_state)).one() == RoutingState.ROUTED


def test_migration_0006_turns_spool_and_results_paths_into_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    command.upgrade(alembic_config(url), "0005")
    engine = make_engine(url)
    spool = "/srv/pacs-ai/spool/1.2.3/1.2.3.4"
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, first_received_at) "
                "VALUES (1, '1.2.3', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO series (id, series_instance_uid, study_fk, instance_count, routing_state) "
                "VALUES (1, '1.2.3.4', 1, 2, 'routed')"
            )
        )
        for n, path in enumerate([f"{spool}/1.2.3.4.5.dcm", "/elsewhere/odd.dcm"], start=1):
            connection.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, series_fk, sop_class_uid, "
                    "transfer_syntax_uid, path, size_bytes, received_at, duplicates_received, routed) "
                    "VALUES (:id, :uid, 1, '1.2', '1.2.840.10008.1.2.1', :path, 1, '2026-01-01', 0, 1)"
                ),
                {"id": n, "uid": f"1.2.3.4.{n + 4}", "path": path},
            )
        connection.execute(
            text(
                "INSERT INTO jobs (id, idempotency_key, series_fk, profile, analyzer, analyzer_version, "
                "version, queue, state, attempts, instance_count, created_at, routing_priority, params, "
                "destinations) VALUES (1, 'k', 1, 'p', 'a', '1', 1, 'cpu', 'succeeded', 1, 2, '2026-01-01', "
                "'routine', '{}', '[]')"
            )
        )
        for n, (kind, path) in enumerate(
            [("SEG", "/srv/pacs-ai/results/1.2.3/9.9.1.dcm"), ("ORIGINAL", f"{spool}/1.2.3.4.5.dcm")], start=1
        ):
            connection.execute(
                text(
                    "INSERT INTO results (id, job_fk, kind, sop_class_uid, sop_instance_uid, "
                    "series_instance_uid, path, created_at) "
                    "VALUES (:id, 1, :kind, '1.2', :uid, '9.9', :path, '2026-01-01')"
                ),
                {"id": n, "kind": kind, "uid": f"9.9.{n}", "path": path},
            )
    command.upgrade(alembic_config(url), "0006")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT path FROM instances ORDER BY id")).scalars().all() == [
            "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm",
            "/elsewhere/odd.dcm",  # not in a spool folder: left as it was
        ]
        assert connection.execute(text("SELECT path FROM results ORDER BY id")).scalars().all() == [
            "results/1.2.3/9.9.1.dcm",
            "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm",
        ]
        assert connection.execute(text("SELECT uploaded_at FROM instances")).scalars().all() == [None, None]
    engine.dispose()
