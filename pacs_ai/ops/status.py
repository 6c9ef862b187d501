"""The service's health, as ``pacs-ai status`` prints it and the admin console's status page shows it.

:func:`collect_status` gathers everything ``status`` reports except the
index counts (:func:`index_counts`): whether ``pacs-ai serve`` runs for this
data directory, its listener, the workers of every host (from the index, and
whether they answer over the broker), the queues, the storage check, the
broker and the disk, with the problems found as sentences.  The keys are
listed in :mod:`pacs_ai.cli.status`.  The broker is asked through the
Celery application without its tasks (:mod:`workers.celery_app`): no analyzer,
model or torch is imported for a status.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from amqp.exceptions import ChannelError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index import storage_deletions
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, Instance, Job, RoutingState, Series, Study, WorkerState, utcnow
from pacs_ai.index.purge import spool_disk_usage
from pacs_ai.index.retention import DiskUsage
from pacs_ai.index.storage_deletions import PendingDeletions
from pacs_ai.index.workers import list_workers
from pacs_ai.receive.health import listener_capacity_problems
from pacs_ai.receive.security import open_listener_warning
from pacs_ai.receive.server import low_disk_reason
from pacs_ai.storage import StorageError, open_storage
from workers.celery_app import QUEUES, create_client

__all__ = [
    "collect_status",
    "counts_in_words",
    "describe_device",
    "index_counts",
    "series_attention",
    "worker_nodes",
]

MIB = 1024 * 1024
#: Seconds to wait for the broker: status must answer quickly when it is down.
BROKER_TIMEOUT_SECONDS = 2.0
#: Seconds to wait for workers to answer the broadcast asking what they run.
WORKER_REPLY_SECONDS = 1.0
#: Series marked incomplete in this many hours are a warning of ``status`` (older ones are only counted).
INCOMPLETE_ATTENTION_HOURS = 24


def collect_status(settings: Settings, sessions: sessionmaker[Session] | None = None) -> dict[str, Any]:
    """Everything ``status`` reports except the index counts (the workers only with ``sessions``)."""
    problems: list[str] = []
    service = _service_state(settings)
    if service is None:
        problems.append("the service is not running (no live `pacs-ai serve` for this data directory)")

    usage = spool_disk_usage(settings)
    disk = _disk(settings, usage)
    free_mb = disk["free_mb"] if disk else None
    refusing = (
        low_disk_reason(usage.free_bytes, settings.refuse_associations_below_free_mb) if usage else None
    )
    if refusing is not None:
        problems.append(f"the listener refuses new associations: {refusing}")

    listener_pids = list(service.get("listener_pids", [])) if service else []
    dead = [pid for pid in listener_pids if not psutil.pid_exists(pid)]
    listener_running = bool(service) and bool(listener_pids) and not dead
    if service and not listener_running:
        problems.append(f"listener process(es) not running: {dead or 'none started'}")
    problems.extend(listener_capacity_problems(settings, listener_pids if listener_running else []))
    listener = {
        "running": listener_running,
        "pids": listener_pids,
        "ae_title": service.get("ae_title", settings.ae_title) if service else settings.ae_title,
        "listen": service.get("listen") if service else f"{settings.listen_host}:{settings.listen_port}",
        "accepting": listener_running and refusing is None,
        "refusing_reason": refusing,
        "open_to_anyone": open_listener_warning(settings.listen_host, settings.known_peers),
    }

    broker, queues = _broker(settings)
    if service is not None and not broker["reachable"]:
        problems.append(f"the broker is unreachable: {broker['error']}")

    nodes = worker_nodes(settings, sessions, broker["reachable"]) if sessions is not None else []
    live = [n for n in nodes if n["state"] == WorkerState.READY.value and not n["stale"]]
    markers = sorted(n["node"] for n in live)
    expected = [w for w in (service.get("workers", []) if service else [])]
    ready = [w["node"] for w in expected if w["node"] in markers and psutil.pid_exists(w["pid"])]
    not_ready = [w["node"] for w in expected if w["node"] not in ready]
    if not_ready:
        problems.append(f"worker(s) not ready: {', '.join(not_ready)}")
    problems += [
        f"worker {n['node']} on {n['hostname']}: no heartbeat for {n['seconds_since_heartbeat']:g} s "
        f"(state {n['state']}); its running jobs are handed to other workers"
        for n in nodes
        if n["stale"] and n["node"] not in not_ready
    ]
    for queue, waiting in queues.items():
        if waiting and not any(queue in n["queues"] for n in live):
            problems.append(f"no live worker on any host serves queue {queue} ({waiting} message(s) waiting)")

    storage = _storage(settings)
    if storage["error"] is not None:
        problems.append(f"the storage {storage['url']} fails its check: {storage['error']}")
    pending = _objects_not_deleted(sessions) if sessions is not None else None
    storage["objects_not_deleted"] = pending.as_dict() if pending is not None else None
    if pending is not None and pending.count:
        problems.append(
            f"retention could not delete {pending.count} object(s) of purged studies from the storage "
            f"(since {pending.oldest_failure}; last reason: {pending.last_error}); tried again at every "
            "retention pass"
        )

    return {
        "healthy": not problems,
        "problems": problems,
        "service": service,
        "listener": listener,
        "workers": {"expected": [w["node"] for w in expected], "ready": ready},
        "workers_ready": markers,
        "worker_nodes": nodes,
        "storage": storage,
        "broker": broker,
        "queues": queues,
        "disk": disk,
        "data_dir": str(settings.data_dir),
        "free_disk_mb": free_mb,
    }


def _service_state(settings: Settings) -> dict[str, Any] | None:
    """``run/service.json`` when the service that wrote it is alive (a killed one leaves it behind)."""
    path = settings.data_dir / "run" / "service.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = state.get("service_pid")
    return state if isinstance(pid, int) and psutil.pid_exists(pid) else None


def _disk(settings: Settings, usage: DiskUsage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "path": str(next(p for p in (settings.spool_dir, settings.data_dir) if p.exists())),
        "total_mb": usage.total_bytes // MIB,
        "free_mb": usage.free_bytes // MIB,
        "used_percent": round(usage.used_percent, 1) if usage.total_bytes else None,
        "refuse_instances_below_mb": settings.min_free_disk_mb,
        "refuse_associations_below_mb": settings.refuse_associations_below_free_mb,
        "retention": {
            "days": settings.retention_days,
            "high_watermark_percent": settings.retention_high_watermark_percent,
            "low_watermark_percent": settings.retention_low_watermark_percent,
            "interval_minutes": settings.retention_interval_minutes,
            "purge_results": settings.retention_purge_results,
        },
    }


def _broker(settings: Settings) -> tuple[dict[str, Any], dict[str, int | None]]:
    """The broker's URL (no password), whether it answers, and each queue's waiting messages."""
    url = settings.effective_broker_url
    broker: dict[str, Any] = {"url": maybe_sanitize_url(url), "reachable": False, "error": None}
    queues: dict[str, int | None] = dict.fromkeys(QUEUES)
    if url.startswith("redis+socket://") and not Path(url.removeprefix("redis+socket://")).exists():
        broker["error"] = "the embedded broker is not running (no socket)"
        return broker, queues
    try:
        broker_queues = _queue_lengths(settings)
    except Exception as exc:  # noqa: BLE001 - any failure to talk to the broker means "unreachable"
        broker["error"] = str(exc) or type(exc).__name__
        return broker, queues
    broker["reachable"] = True
    return broker, broker_queues


def _queue_lengths(settings: Settings) -> dict[str, int | None]:
    app = create_client(settings)
    lengths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
        channel = connection.default_channel
        for queue in QUEUES:
            try:
                lengths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:  # never declared (nothing sent to it yet): empty
                lengths[queue] = 0
    return lengths


def worker_nodes(
    settings: Settings, sessions: sessionmaker[Session], ask_broker: bool, *, everything: bool = False
) -> list[dict[str, Any]]:
    """Every worker on every host from the index; ``answering`` and ``tasks_active`` from the broker.

    The index has what each worker last reported (and keeps a dead one, marked
    stale, for ``worker_forget_after_hours``; ``everything`` lists those lost or
    stopped longer ago too); the broker says which of them answer right now (a
    broadcast with a short timeout; null when the broker is unreachable).
    """
    with session_scope(sessions) as session:
        nodes = [
            view.as_dict()
            for view in list_workers(
                session,
                settings.worker_stale_after_seconds,
                None if everything else settings.worker_forget_after_hours,
            )
        ]
    active = _active_tasks(settings) if ask_broker and nodes else None
    for node in nodes:
        node["answering"] = None if active is None else node["node"] in active
        node["tasks_active"] = None if active is None else len(active.get(node["node"]) or [])
    return nodes


def _active_tasks(settings: Settings) -> dict[str, list[Any]] | None:
    """Node name -> tasks it runs, from the workers that answer a broadcast within the timeout."""
    try:
        replies = create_client(settings).control.inspect(timeout=WORKER_REPLY_SECONDS).active()
    except Exception:  # noqa: BLE001 - no answer from the broker is reported as "not asked"
        return None
    return dict(replies or {})


def _storage(settings: Settings) -> dict[str, Any]:
    """Where studies and results live, and whether a test object can be written and deleted there."""
    report: dict[str, Any] = {"url": settings.storage_url or "local folder", "error": None}
    try:
        storage = open_storage(settings)
        report["url"] = storage.description
        storage.check()
    except (StorageError, ValueError) as exc:
        report["error"] = str(exc)
    return report


def _objects_not_deleted(sessions: sessionmaker[Session]) -> PendingDeletions | None:
    """Objects retention has yet to delete from the storage; None where the index predates the table."""
    try:
        with session_scope(sessions) as session:
            return storage_deletions.summary(session)
    except SQLAlchemyError:
        return None


def counts_in_words(counts: dict[str, int]) -> str:
    """``{"done": 3, "failed": 1}`` as ``3 done, 1 failed`` (``none`` when empty): text, not a dict."""
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"


def describe_device(device: dict[str, Any] | None) -> str:
    """A worker's device in a few words: ``cuda:0 NVIDIA A100 (40960 MB)`` or ``cpu 8 cores`` (pure)."""
    if not device:
        return "?"
    if device.get("type") == "cuda":
        gpus = device.get("gpus") or []
        named = "; ".join(f"{g.get('name')} ({g.get('memory_mb')} MB)" for g in gpus)
        return f"{device.get('device', 'cuda')} {named or str(device.get('count', '?')) + ' device(s)'}"
    if device.get("type") == "cpu":
        return f"cpu {device.get('cores')} cores, {device.get('memory_mb')} MB"
    if device.get("error"):
        return str(device["error"])
    return ", ".join(f"{key} {value}" for key, value in device.items())


def index_counts(session: Session) -> dict[str, Any]:
    """``index`` (studies, series, instances), ``purged_instances``, ``jobs`` and ``deliveries`` by state,
    and ``series_attention`` with its ``warnings`` (:func:`series_attention`)."""
    jobs = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
    deliveries = session.execute(
        select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)
    ).all()
    return {
        "index": {
            "studies": session.scalar(select(func.count(Study.id))),
            "series": session.scalar(select(func.count(Series.id))),
            "instances": session.scalar(select(func.count(Instance.id))),
        },
        "purged_instances": session.scalar(
            select(func.count(Instance.id)).where(Instance.purged_at.is_not(None))
        ),
        "jobs": {state.value: n for state, n in jobs},
        "deliveries": {state.value: n for state, n in deliveries},
        **series_attention(session),
    }


def series_attention(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """Series an aborted association cut short: held for a resend, and those marked incomplete.

    ``series_attention``: ``held_for_resend`` (the router waits ``resend_window_seconds`` for a
    resend; nothing to do yet), ``incomplete`` (no complete resend came: not analysed until someone
    resends or runs ``pacs-ai reprocess``; all the index still holds), ``incomplete_recent`` (those
    whose association was aborted in the last ``recent_hours``).  ``warnings``: a sentence while
    ``incomplete_recent`` is not 0.  A warning, not a problem: the service is healthy, a sender's
    association was not, so ``status`` still exits 0 (a monitor must not page for a sender's abort).
    """
    since = (now or utcnow()) - timedelta(hours=INCOMPLETE_ATTENTION_HOURS)
    interrupted = Series.interrupted_at.is_not(None)
    held = session.scalar(
        select(func.count(Series.id)).where(interrupted, Series.routing_state == RoutingState.RECEIVING)
    )
    incomplete = session.scalar(
        select(func.count(Series.id)).where(Series.routing_state == RoutingState.INCOMPLETE)
    )
    recent = session.scalar(
        select(func.count(Series.id)).where(
            Series.routing_state == RoutingState.INCOMPLETE,
            func.coalesce(Series.interrupted_at, Series.last_received_at) >= since,
        )
    )
    warnings = []
    if recent:
        warnings.append(
            f"needs attention: {recent} series incomplete (association aborted) in the last "
            f"{INCOMPLETE_ATTENTION_HOURS} h, see pacs-ai studies list (ask the sender to resend, "
            "or `pacs-ai reprocess` analyses a series as it is)"
        )
    return {
        "series_attention": {
            "held_for_resend": held or 0,
            "incomplete": incomplete or 0,
            "incomplete_recent": recent or 0,
            "recent_hours": INCOMPLETE_ATTENTION_HOURS,
        },
        "warnings": warnings,
    }
