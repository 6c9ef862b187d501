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
* ``jobs`` and ``deliveries``: state -> count;
* ``series_attention``: series an aborted association cut short: ``held_for_resend`` (waiting
  ``resend_window_seconds`` for a resend), ``incomplete`` (no complete resend came; not analysed),
  ``incomplete_recent`` (of those, aborted in the last ``recent_hours``, 24);
* ``warnings``: sentences that need a person but not a failed health check (incomplete series of the
  last 24 h); they do not change ``healthy`` or the exit code.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_json, print_table, settings_of
from pacs_ai.config import Settings
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import WorkerState
from pacs_ai.ops.status import (  # describe_device: also imported from here by the worker tests
    collect_status,
    counts_in_words,
    describe_device,
    index_counts,
    worker_nodes,
)


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
        report.update(index_counts(session))
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
    attention = report["series_attention"]
    console.print(
        f"series cut short by an aborted association: {attention['held_for_resend']} held for a resend, "
        f"{attention['incomplete']} incomplete ({attention['incomplete_recent']} in the last "
        f"{attention['recent_hours']} h)"
    )
    console.print(f"jobs: {counts_in_words(report['jobs'])}")
    console.print(f"deliveries: {counts_in_words(report['deliveries'])}")
    if report["healthy"]:
        console.print("[green]healthy[/green]")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning[/yellow] {warning}")
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
