"""``pacs-ai status``: is the service running and healthy, and what is it holding?

Exit code 0 when the service runs and is healthy, 1 when it is not running or
unhealthy (``problems`` says why), so monitoring can call it as it is.

``--json`` keys (stable; new keys may be added, none removed or renamed):

* ``healthy`` (bool) and ``problems`` (list of sentences; empty when healthy);
* ``service``: ``data_dir/run/service.json`` as ``pacs-ai serve`` wrote it, or null when not running;
* ``listener``: ``running`` (every listener process alive), ``pids``, ``ae_title``, ``listen``
  (host:port), ``accepting`` (bool) and ``refusing_reason`` (why new associations are rejected, or null);
* ``workers``: ``expected`` (node names), ``ready`` (nodes whose ``run/worker-ready`` marker exists and
  whose process is alive);  ``workers_ready``: the ready marker names (as before);
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
from typing import Any

import psutil
import typer
from sqlalchemy import func, select

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_json, settings_of
from pacs_ai.config import Settings
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, Instance, Job, Series, Study
from pacs_ai.index.purge import spool_disk_usage
from pacs_ai.index.retention import DiskUsage
from pacs_ai.receive.health import listener_capacity_problems
from pacs_ai.receive.security import open_listener_warning
from pacs_ai.receive.server import low_disk_reason

MIB = 1024 * 1024
#: Seconds to wait for the broker: status must answer quickly when it is down.
BROKER_TIMEOUT_SECONDS = 2.0


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Listener, workers, queues, disk, broker, index, jobs, deliveries; exit 1 if down or unhealthy."""
    settings = settings_of(ctx)
    sessions = index_sessions(settings)  # exits 1 with advice where there is no index yet
    report = collect_status(settings)
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


def collect_status(settings: Settings) -> dict[str, Any]:
    """Everything ``status`` reports except the index counts."""
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

    ready_dir = settings.data_dir / "run" / "worker-ready"
    markers = sorted(p.name for p in ready_dir.iterdir()) if service and ready_dir.is_dir() else []
    expected = [w for w in (service.get("workers", []) if service else [])]
    ready = [w["node"] for w in expected if w["node"] in markers and psutil.pid_exists(w["pid"])]
    not_ready = [w["node"] for w in expected if w["node"] not in ready]
    if not_ready:
        problems.append(f"worker(s) not ready: {', '.join(not_ready)}")

    broker, queues = _broker(settings)
    if service is not None and not broker["reachable"]:
        problems.append(f"the broker is unreachable: {broker['error']}")

    return {
        "healthy": not problems,
        "problems": problems,
        "service": service,
        "listener": listener,
        "workers": {"expected": [w["node"] for w in expected], "ready": ready},
        "workers_ready": markers,
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
    console.print(f"workers: {len(workers['ready'])}/{len(workers['expected'])} ready {workers['ready']}")
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
    console.print(f"index: {report['index']}, purged instances: {report['purged_instances']}")
    console.print(f"jobs: {report['jobs']}")
    console.print(f"deliveries: {report['deliveries']}")
    if report["healthy"]:
        console.print("[green]healthy[/green]")
    for problem in report["problems"]:
        console.print(f"[red]problem[/red] {problem}")
