"""``pacs-ai worker``: run a Celery worker node on this host, e.g. a GPU server; ``pacs-ai workers``.

The host needs only what every pacs-ai process shares: the index (``database_url``),
the broker (``broker_url``) and the store of studies and results.  Before it
takes any work the command checks that the index exists with the schema this
version expects and that the broker answers, and says what to fix otherwise
(exit 1).  ``pacs-ai serve`` starts its local workers with this same command.

``pacs-ai workers list`` lists the workers of every host the index knows (lost
and stopped ones too, however long ago); ``pacs-ai workers forget NAME@HOST``
removes one whose host is gone for good (see :func:`forget`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from celery.signals import worker_process_shutdown
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.cli.common import JsonOption, cli_actor, console, index_sessions, print_json, settings_of
from pacs_ai.cli.status import print_worker_nodes, worker_nodes
from pacs_ai.config import Settings
from pacs_ai.index.db import alembic_config, make_engine, session_scope
from pacs_ai.index.models import Job, WorkerNode, utcnow
from pacs_ai.index.workers import forget_worker, is_beating
from pacs_ai.route.assembly import JobTicket
from workers.celery_app import QUEUES, create_client
from workers.task_queue import CeleryTaskQueue

#: The queues a worker can serve.
QUEUE_NAMES = QUEUES

#: Seconds to wait for the broker before refusing to start.
BROKER_CHECK_SECONDS = 10.0
#: Seconds ``workers forget`` waits for the worker to answer a ping over the broker.
PING_SECONDS = 2.0

workers_app = typer.Typer(
    help="Worker nodes of every host: list, forget one gone for good.", no_args_is_help=True
)


def parse_queues(value: str) -> list[str]:
    """``gpu,cpu`` -> ``["gpu", "cpu"]``; a :class:`typer.BadParameter` names unknown queues (pure)."""
    queues = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in queues if name not in QUEUE_NAMES]
    if not queues or unknown:
        raise typer.BadParameter(
            f"unknown queue(s) {unknown or [value]}; choose from {', '.join(QUEUE_NAMES)}"
        )
    return list(dict.fromkeys(queues))


def default_node_name(queues: list[str], hostname: str) -> str:
    """``pacs-ai-gpu@host`` for ``--queues gpu``; name nodes yourself to run two alike on one host (pure)."""
    return f"pacs-ai-{'-'.join(queues)}@{hostname}"


def worker(
    ctx: typer.Context,
    queues: Annotated[
        str,
        typer.Option("--queues", "-Q", help=f"Comma-separated queues to serve ({', '.join(QUEUE_NAMES)})."),
    ] = ",".join(QUEUE_NAMES),
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            help="Pool processes (tasks at once). Default: 1 for a gpu-only worker, else worker_concurrency.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Node name, NAME@HOST (default pacs-ai-QUEUES@hostname)."),
    ] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="CUDA_VISIBLE_DEVICES for this worker, e.g. 0 or 1,2.")
    ] = None,
    logfile: Annotated[Path | None, typer.Option(help="Log to this file instead of standard error.")] = None,
) -> None:
    """Run a worker serving QUEUES here; it shares only the index, broker and store with the receiver."""
    settings = settings_of(ctx)
    chosen = parse_queues(queues)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # read by CUDA when it initialises, in the pool processes
    if concurrency is None:
        concurrency = 1 if chosen == ["gpu"] else settings.worker_concurrency
    problems = startup_problems(settings)
    if problems:
        for problem in problems:
            console.print(f"[red]cannot start the worker[/red]: {problem}")
        raise typer.Exit(1)
    node = name or default_node_name(chosen, socket.gethostname())
    argv = [
        "worker",
        "--queues",
        ",".join(chosen),
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "-O",
        "fair",
        "--hostname",
        node,
        "--loglevel",
        settings.log_level,
    ]
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--logfile", str(logfile)]
    exporter = start_metrics(settings, node)
    from workers.factory import create_app  # loads the analyzers and torch: only when running a worker

    try:
        exit_code = create_app(settings).worker_main(argv)
    finally:
        if exporter is not None:
            exporter.stop()
    raise typer.Exit(exit_code or 0)


def start_metrics(settings: Settings, node: str) -> metrics.Exporter | None:
    """This worker's Prometheus exporter, on a host of its own; None under ``pacs-ai serve``.

    A worker that ``pacs-ai serve`` started inherits PROMETHEUS_MULTIPROC_DIR:
    the service's exporter shows it.  Otherwise the worker and its pool
    processes count under ``data_dir/run/metrics-NODE`` (emptied now; a
    directory of its own, so a ``serve`` sharing the data directory keeps its
    counts) and /metrics answers on ``worker_metrics_port``.
    """
    if metrics.is_multiprocess():
        return None
    metrics.use_directory(settings.metrics_dir.with_name(f"metrics-{metrics.label(node, 255)}"), clean=True)
    if not settings.metrics_enabled:
        return None
    return metrics.start_exporter(settings.metrics_host, settings.worker_metrics_port)


@worker_process_shutdown.connect
def _forget_pool_process(pid: int | None = None, **_: object) -> None:
    """A pool process exiting: its live gauges (GPU memory) stop counting."""
    metrics.mark_process_dead(pid or os.getpid())


def startup_problems(settings: Settings) -> list[str]:
    """What keeps a worker from running with these settings, in sentences (empty: it can start)."""
    problems = []
    index_problem = _index_problem(settings.effective_database_url)
    if index_problem:
        problems.append(index_problem)
    broker_problem = _broker_problem(settings)
    if broker_problem:
        problems.append(broker_problem)
    return problems


def _index_problem(url: str) -> str | None:
    """None when the index is reachable and at the newest schema; else what to do about it."""
    where = url.split("@")[-1]
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        return (
            f"no index database at {url.split('///', 1)[-1]}: a worker on another host needs the "
            "receiver's database_url (PACS_AI_DATABASE_URL, PostgreSQL)"
        )
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        return f"the index {where} cannot be reached: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()
    if current != head:
        return (
            f"the index {where} is at schema {current or 'none'}, this pacs-ai needs {head}: "
            "run `pacs-ai db upgrade` (the receiver's `pacs-ai serve` does it at start-up)"
        )
    return None


def _broker_problem(settings: Settings) -> str | None:
    url = settings.effective_broker_url
    if settings.broker_url is None and not settings.embedded_redis_socket.exists():
        return (
            "no broker: the embedded one runs only inside `pacs-ai serve` on the receiver; set broker_url "
            "(PACS_AI_BROKER_URL) to the receiver's Redis"
        )
    app = create_client(settings)
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_CHECK_SECONDS)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means the broker cannot be used
        return f"the broker {maybe_sanitize_url(url)} cannot be reached: {exc}"
    return None


@workers_app.command("list")
def list_command(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every worker of every host the index knows, lost and stopped ones included; whether each answers."""
    settings = settings_of(ctx)
    sessions = index_sessions(settings)
    nodes = worker_nodes(settings, sessions, ask_broker=True, everything=True)
    if as_json:
        print_json(nodes)
    else:
        print_worker_nodes(nodes)


@workers_app.command("forget")
def forget(
    ctx: typer.Context,
    node: Annotated[
        str, typer.Argument(metavar="NAME@HOST", help="The node, as `pacs-ai workers list` shows it.")
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="Forget it even if it still beats or answers (it registers again)."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Forget a worker whose host is gone for good: its row goes, jobs it still held are queued again.

    Refused (exit 1) while the worker still beats (a heartbeat within
    ``worker_stale_after_seconds``) or answers a ping over the broker: stop it
    first, or give ``--force``.  Audited as ``worker.forgotten``.
    """
    settings = settings_of(ctx)
    sessions = index_sessions(settings)
    with session_scope(sessions) as session:
        row = session.scalar(select(WorkerNode).where(WorkerNode.node == node))
        beating = row is not None and is_beating(row, utcnow(), settings.worker_stale_after_seconds)
        host = row.hostname if row is not None else None
    if row is None:
        console.print(f"[red]no worker {node} in the index[/red]; `pacs-ai workers list` shows the names")
        raise typer.Exit(1)
    if not force:
        alive = []
        if beating:
            alive.append(
                f"it beat within worker_stale_after_seconds ({settings.worker_stale_after_seconds:g} s)"
            )
        if _answers_ping(settings, node):
            alive.append("it answers over the broker")
        if alive:
            console.print(
                f"[red]worker {node} on {host} is still running[/red] ({'; '.join(alive)}): stop it "
                f"on {host} first (it is then `stopped`), or give --force to forget it anyway (it "
                "registers again at its next heartbeat, and the jobs it runs are queued again)"
            )
            raise typer.Exit(1)
    with session_scope(sessions) as session:
        forgotten = forget_worker(
            session, node, actor=cli_actor(), reason="forced" if force else "host gone (not beating)"
        )
    if forgotten is None:  # forgotten by someone else meanwhile
        console.print(f"[red]no worker {node} in the index[/red] (forgotten meanwhile)")
        raise typer.Exit(1)
    enqueued = _enqueue_jobs(settings, sessions, forgotten.jobs_queued_again)
    if as_json:
        print_json({**forgotten.as_dict(), "enqueued": enqueued})
        return
    console.print(
        f"forgot worker {node} on {forgotten.hostname} ({forgotten.state}, last heartbeat "
        f"{forgotten.seconds_since_heartbeat:g} s ago)"
    )
    if forgotten.jobs_queued_again:
        console.print(f"queued again: job(s) {', '.join(map(str, forgotten.jobs_queued_again))}")
        if not enqueued:
            console.print(
                "[yellow]the broker could not be reached[/yellow]: the jobs are queued in the index and "
                "`pacs-ai serve` sends them when it (re)starts"
            )


def _answers_ping(settings: Settings, node: str) -> bool:
    """Whether ``node`` answers a ping over the broker (False when the broker cannot be reached)."""
    app = create_client(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=PING_SECONDS)
            replies = app.control.ping(destination=[node], timeout=PING_SECONDS, connection=connection)
    except Exception:  # noqa: BLE001 - no broker: the heartbeat alone decides
        return False
    return any(node in reply for reply in replies or [])


def _enqueue_jobs(settings: Settings, sessions: sessionmaker[Session], job_ids: list[int]) -> bool:
    """Send the jobs handed back to the broker; False (they stay queued in the index) if it is down."""
    if not job_ids:
        return True
    with session_scope(sessions) as session:
        tickets = [JobTicket.of(job) for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))]
    app = create_client(settings)
    app.conf.broker_connection_timeout = 3
    app.conf.broker_connection_max_retries = 0
    queue = CeleryTaskQueue(app)
    try:
        for ticket in tickets:
            queue.enqueue_analysis(ticket)
    except (OperationalError, OSError):
        return False
    return True
