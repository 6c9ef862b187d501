"""``pacs-ai status``: is the service running and healthy, and what is it holding?

Exit code 0 when the service runs and is healthy, 1 when it is not running or
unhealthy (``problems`` says why), so monitoring can call it as it is.

``--json`` keys (stable; new keys may be added, none removed or renamed):

* ``healthy`` (bool) and ``problems`` (list of sentences; empty when healthy);
* ``service``: ``data_dir/run/service.json`` as ``pacs-ai serve`` wrote it, or null when not running;
* ``listener``: ``running`` (every listener process alive), ``pids``, ``ae_title``, ``listen``
  (host:port), ``accepting`` (bool) and ``refusing_reason`` (why new associations are rejected, or null);
* ``workers``: ``expected`` (the node names of the workers ``pacs-ai serve`` started on this host),
  ``ready`` (those of them the index shows ready and beating, whose process is alive);
  ``workers_ready``: every node on any host that is ready and beating;
* ``worker_nodes``: every worker the index knows, on every host: ``node``, ``hostname``, ``pid``,
  ``queues``, ``concurrency``, ``device`` (``type`` cuda with ``gpus``' ``name`` and ``memory_mb``, or cpu),
  ``models_loaded``, ``jobs_running`` (jobs the index shows it running), ``state`` (starting, ready,
  stopped, lost), ``stale`` (no heartbeat for ``worker_stale_after_seconds``; a problem), ``last_heartbeat``,
  ``seconds_since_heartbeat``, ``answering`` and ``tasks_active`` (from a broadcast over the broker; null
  when the broker is unreachable); a worker lost or stopped more than ``worker_forget_after_hours`` ago
  is no longer listed (``pacs-ai workers forget`` removes one at once);
* ``storage``: ``url`` (where studies and results live) and ``error`` (null when a test object could be
  written and deleted; else why not: unreachable, credentials refused, no bucket; a problem);
  ``objects_not_deleted``: ``count``, ``oldest_failure``, ``last_error`` of the objects of purged
  studies retention could not delete from the storage yet (a problem while ``count`` is not 0);
* ``broker``: ``url`` (password masked), ``reachable``, ``error``;
* ``queues``: queue name -> messages waiting, or null each when the broker is unreachable;
* ``disk``: ``path``, ``total_mb``, ``free_mb``, ``used_percent``, ``refuse_instances_below_mb``,
  ``refuse_associations_below_mb``, ``retention`` (the configured limits);
  ``free_disk_mb`` and ``data_dir``: as before;
* ``index``: counts of ``studies``, ``series``, ``instances``; ``purged_instances``: instance rows
  whose file retention deleted;
* ``jobs`` and ``deliveries``: state -> count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_json, print_table, settings_of
from pacs_ai.config import Settings
from pacs_ai.index import storage_deletions
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, Instance, Job, Series, Study, WorkerState
from pacs_ai.index.purge import spool_disk_usage
from pacs_ai.index.retention import DiskUsage
from pacs_ai.index.storage_deletions import PendingDeletions
from pacs_ai.index.workers import list_workers
from pacs_ai.receive.health import listener_capacity_problems
from pacs_ai.receive.security import open_listener_warning
from pacs_ai.receive.server import low_disk_reason
from pacs_ai.storage import StorageError, open_storage

MIB = 1024 * 1024
#: Seconds to wait for the broker: status must answer quickly when it is down.
BROKER_TIMEOUT_SECONDS = 2.0
#: Seconds to wait for workers to answer the broadcast asking what they run.
WORKER_REPLY_SECONDS = 1.0


def status(
    ctx: typer.Context,
    as_json: JsonOption = False,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="Only this worker node (NAME@HOST): exit 0 while it is ready, beating and answering.",
        ),
    ] = None,
) -> None:
    """Listener, workers, queues, disk, broker, index, jobs, deliveries; exit 1 if down or unhealthy."""
    settings = settings_of(ctx)
    sessions = index_sessions(settings)  # exits 1 with advice where there is no index yet
    if node is not None:
        _node_status(settings, sessions, node, as_json)
    report = collect_status(settings, sessions)
    with session_scope(sessions) as session:
        report["index"] = {
            "studies": session.scalar(select(func.count(Study.id))),
            "series": session.scalar(select(func.count(Series.id))),
            "instances": session.scalar(select(func.count(Instance.id))),
        }
        report["purged_instances"] = session.scalar(
            select(func.count(Instance.id)).where(Instance.purged_at.is_not(None))
        )
        jobs = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
        deliveries = session.execute(
            select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)
        ).all()
    report["jobs"] = {state.value: n for state, n in jobs}
    report["deliveries"] = {state.value: n for state, n in deliveries}
    if as_json:
        print_json(report)
    else:
        _print_text(report)
    raise typer.Exit(0 if report["healthy"] else 1)


def _node_status(settings: Settings, sessions: sessionmaker[Session], node: str, as_json: bool) -> None:
    """``status --node``: one worker's row and whether it is healthy (a worker host's health check).

    Healthy: the index shows it ready with a fresh heartbeat and it answers a
    broadcast over the broker.
    """
    found = [n for n in worker_nodes(settings, sessions, ask_broker=True) if n["node"] == node]
    problems = []
    if not found:
        problems.append(f"no worker {node} in the index (not started, or not registered yet)")
    else:
        worker = found[0]
        if worker["state"] != WorkerState.READY.value:
            problems.append(f"worker {node} is {worker['state']}")
        if worker["stale"]:
            problems.append(f"worker {node}: no heartbeat for {worker['seconds_since_heartbeat']:g} s")
        if worker["answering"] is not True:
            problems.append(f"worker {node} does not answer over the broker")
    report = {"healthy": not problems, "problems": problems, "worker": found[0] if found else None}
    if as_json:
        print_json(report)
    else:
        if found:
            print_worker_nodes(found)
        for problem in problems:
            console.print(f"[red]problem[/red] {problem}")
    raise typer.Exit(0 if not problems else 1)


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
    from kombu.utils.url import maybe_sanitize_url

    from workers.factory import QUEUES

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
    from amqp.exceptions import ChannelError

    from workers.factory import QUEUES, create_app

    app = create_app(settings)
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
    from workers.factory import create_app

    try:
        replies = create_app(settings).control.inspect(timeout=WORKER_REPLY_SECONDS).active()
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


def _print_text(report: dict[str, Any]) -> None:
    service = report["service"]
    console.print(
        f"service: {'running, pid ' + str(service['service_pid']) if service else '[red]not running[/red]'}"
    )
    listener = report["listener"]
    if listener["running"]:
        accepting = (
            "accepting associations"
            if listener["accepting"]
            else f"[red]refusing associations[/red]: {listener['refusing_reason']}"
        )
        console.print(f"listener: AE {listener['ae_title']} on {listener['listen']}, {accepting}")
    else:
        console.print(f"listener: not running (AE {listener['ae_title']} on {listener['listen']})")
    if listener.get("open_to_anyone"):
        console.print(f"[bold red]WARNING[/bold red]: {listener['open_to_anyone']}")
    workers = report["workers"]
    ready = ", ".join(workers["ready"])
    console.print(
        f"local workers: {len(workers['ready'])} of {len(workers['expected'])} ready"
        + (f" ({ready})" if ready else "")
    )
    print_worker_nodes(report["worker_nodes"])
    storage = report["storage"]
    console.print(
        f"storage: {storage['url']} "
        + ("ok" if storage["error"] is None else f"[red]failing[/red] ({storage['error']})")
    )
    broker = report["broker"]
    console.print(
        f"broker: {broker['url']} "
        + ("reachable" if broker["reachable"] else f"[yellow]unreachable[/yellow] ({broker['error']})")
    )
    queues = report["queues"]
    console.print("queues: " + ", ".join(f"{name} {'?' if n is None else n}" for name, n in queues.items()))
    disk = report["disk"]
    if disk is not None:
        console.print(
            f"disk: {disk['free_mb']} MB free of {disk['total_mb']} MB ({disk['used_percent']}% used) at "
            f"{disk['path']}; refuses associations below {disk['refuse_associations_below_mb']} MB, "
            f"instances below {disk['refuse_instances_below_mb']} MB"
        )
    index = report["index"]
    console.print(
        f"index: {index['studies']} studies, {index['series']} series, {index['instances']} instances "
        f"({report['purged_instances']} purged)"
    )
    console.print(f"jobs: {counts_in_words(report['jobs'])}")
    console.print(f"deliveries: {counts_in_words(report['deliveries'])}")
    if report["healthy"]:
        console.print("[green]healthy[/green]")
    for problem in report["problems"]:
        console.print(f"[red]problem[/red] {problem}")


def print_worker_nodes(nodes: list[dict[str, Any]]) -> None:
    """The workers of every host as one table (``status``, ``status --node``, ``workers list``)."""
    if not nodes:
        console.print("workers (all hosts): none registered")
        return
    table = Table(title="Workers (all hosts)")
    for column in ("node", "host", "queues", "device", "models", "jobs", "state", "last heartbeat"):
        table.add_column(column)
    for node in nodes:
        state = node["state"] + (" [red](stale)[/red]" if node["stale"] else "")
        if node["answering"] is False and not node["stale"]:
            state += " [yellow](not answering)[/yellow]"
        table.add_row(
            node["node"],
            node["hostname"],
            ",".join(node["queues"]),
            describe_device(node["device"]),
            ", ".join(node["models_loaded"]) or "-",
            str(node["jobs_running"]),
            state,
            f"{node['last_heartbeat']} ({node['seconds_since_heartbeat']:g} s ago)",
        )
    print_table(table)


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
