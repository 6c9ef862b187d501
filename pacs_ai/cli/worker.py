"""``pacs-ai worker``: run a Celery worker node on this host, e.g. a GPU server.

The host needs only what every pacs-ai process shares: the index (``database_url``),
the broker (``broker_url``) and the store of studies and results.  Before it
takes any work the command checks that the index exists with the schema this
version expects and that the broker answers, and says what to fix otherwise
(exit 1).  ``pacs-ai serve`` starts its local workers with this same command.
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
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai import metrics
from pacs_ai.cli.common import console, settings_of
from pacs_ai.config import Settings
from pacs_ai.index.db import alembic_config, make_engine

#: The queues a worker can serve (``workers.factory.QUEUES``; that module is imported only to run a
#: worker, since it loads the analyzers and torch, which other ``pacs-ai`` verbs do not need).
QUEUE_NAMES = ("dispatch", "cpu", "gpu")

#: Seconds to wait for the broker before refusing to start.
BROKER_CHECK_SECONDS = 10.0


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
    exporter = start_metrics(settings)
    from workers.factory import create_app  # loads the analyzers and torch: only when running a worker

    try:
        exit_code = create_app(settings).worker_main(argv)
    finally:
        if exporter is not None:
            exporter.stop()
    raise typer.Exit(exit_code or 0)


def start_metrics(settings: Settings) -> metrics.Exporter | None:
    """This worker's Prometheus exporter, on a host of its own; None under ``pacs-ai serve``.

    A worker that ``pacs-ai serve`` started inherits PROMETHEUS_MULTIPROC_DIR:
    the service's exporter shows it.  Otherwise the worker and its pool
    processes count under ``data_dir/run/metrics`` (emptied now: one worker
    per data directory) and /metrics answers on ``worker_metrics_port``.
    """
    if metrics.is_multiprocess():
        return None
    metrics.use_directory(settings.metrics_dir, clean=True)
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
    from workers.factory import create_app

    app = create_app(settings)
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_CHECK_SECONDS)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means the broker cannot be used
        return f"the broker {maybe_sanitize_url(url)} cannot be reached: {exc}"
    return None
