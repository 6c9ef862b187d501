"""``pacs-ai serve``: run every part of pacs-ai on one machine.

Starts, in order: the index schema migration, the embedded Redis broker
(unless a broker URL is configured), the DICOM listener processes, the Celery
worker processes, and the scheduler loop in this process.  SIGTERM or
SIGINT stops everything in reverse order.  The log says where each part lives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

from pacs_ai.broker import EmbeddedRedis
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, upgrade_schema
from pacs_ai.logging_setup import configure_logging
from pacs_ai.process import die_with_parent
from pacs_ai.receive.listener import open_listening_socket
from pacs_ai.receive.listener import serve as serve_dicom
from pacs_ai.route.scheduler import Scheduler
from workers.factory import QUEUES, PacsAiCelery, create_app
from workers.tasks import ANALYZE_TASK, DELIVER_TASK

log = logging.getLogger(__name__)


class CeleryTaskQueue:
    """The scheduler's :class:`~pacs_ai.route.scheduler.TaskQueue` backed by Celery."""

    def __init__(self, app: PacsAiCelery) -> None:
        self.app = app

    def enqueue_analysis(self, job_id: int, queue: str) -> None:
        self.app.send_task(ANALYZE_TASK, args=[job_id], queue=queue)

    def enqueue_delivery(self, delivery_id: int) -> None:
        self.app.send_task(DELIVER_TASK, args=[delivery_id], queue="dispatch")


def _listener_main(settings: Settings, parent_pid: int, listening_socket: socket.socket) -> None:
    die_with_parent(parent_pid)
    configure_logging(settings.log_level, settings.log_dir / "pacs-ai.log")
    serve_dicom(settings, listening_socket=listening_socket)


class Supervisor:
    """Starts the listener and worker processes and restarts any that dies.

    When a worker dies (killed, out of memory), the jobs it had claimed are
    handed back to the queue at once rather than after the broker's visibility
    timeout; a restarted worker, or another one, then takes them over.
    """

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.listeners: list[BaseProcess] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.listening_socket: socket.socket | None = None
        self.hostname = socket.gethostname()

    def worker_node_name(self, index: int) -> str:
        return f"pacs-ai-{index}@{self.hostname}"

    def start(self) -> None:
        self.listening_socket = open_listening_socket(self.settings.listen_host, self.settings.listen_port)
        self.listeners = [self._start_listener(i) for i in range(self.settings.listener_processes)]
        self.workers = [self._start_worker(i) for i in range(self.settings.worker_processes)]
        self.write_run_state()

    def _start_listener(self, index: int) -> BaseProcess:
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=_listener_main,
            args=(self.settings, os.getpid(), self.listening_socket),
            name=f"listener-{index}",
            daemon=True,
        )
        process.start()
        return process

    def _start_worker(self, index: int) -> subprocess.Popen[bytes]:
        (self.settings.data_dir / "run" / "worker-ready" / self.worker_node_name(index)).unlink(
            missing_ok=True
        )
        log_file = self.settings.log_dir / f"worker-{index}.log"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "--queues",
            ",".join(QUEUES),
            "--concurrency",
            str(self.settings.worker_concurrency),
            "--prefetch-multiplier",
            "1",
            "-O",
            "fair",
            "--hostname",
            self.worker_node_name(index),
            "--loglevel",
            self.settings.log_level,
            "--logfile",
            str(log_file),
        ]
        worker = subprocess.Popen(
            command,
            env=self.settings.child_environment(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info(
            "Celery worker %s pid %d serving queues %s (log %s)",
            self.worker_node_name(index),
            worker.pid,
            ",".join(QUEUES),
            log_file,
        )
        return worker

    def check(self) -> None:
        """Restart dead children; hand a dead worker's jobs to the others."""
        changed = False
        for index, process in enumerate(self.listeners):
            if not process.is_alive():
                log.error(
                    "listener-%d (pid %s) exited with %s; restarting it", index, process.pid, process.exitcode
                )
                self.listeners[index] = self._start_listener(index)
                changed = True
        for index, worker in enumerate(self.workers):
            if worker.poll() is not None:
                node = self.worker_node_name(index)
                log.error(
                    "worker %s (pid %d) exited with %s; restarting it", node, worker.pid, worker.returncode
                )
                self._kill_group(worker)
                self.scheduler.requeue_jobs_of(node)
                self.workers[index] = self._start_worker(index)
                changed = True
        if changed:
            self.write_run_state()

    @staticmethod
    def _kill_group(worker: subprocess.Popen[bytes]) -> None:
        # The worker's pool children share its session; none may outlive it
        # and keep running a job that is being handed to another worker.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)

    def write_run_state(self) -> None:
        """Record the processes in ``data_dir/run/service.json`` for ``pacs-ai status`` and operators."""
        state = {
            "service_pid": os.getpid(),
            "ae_title": self.settings.ae_title,
            "listen": f"{self.settings.listen_host}:{self.settings.listen_port}",
            "listener_pids": [p.pid for p in self.listeners],
            "workers": [{"node": self.worker_node_name(i), "pid": w.pid} for i, w in enumerate(self.workers)],
            "broker": self.settings.effective_broker_url.split("@")[-1],
        }
        path = self.settings.data_dir / "run" / "service.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(temporary, path)

    def stop(self) -> None:
        for process in self.listeners:
            if process.is_alive():
                process.terminate()
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()  # warm shutdown: running tasks finish or return to the queue
        for process in self.listeners:
            process.join(timeout=10)
        if self.listening_socket is not None:
            self.listening_socket.close()
        for worker in self.workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._kill_group(worker)
                worker.wait()
        (self.settings.data_dir / "run" / "service.json").unlink(missing_ok=True)


@contextlib.contextmanager
def _broker(settings: Settings) -> Iterator[Settings]:
    """Yield settings whose broker URL points at a running broker."""
    if settings.broker_url:
        log.info("broker: %s", settings.broker_url.split("@")[-1])
        yield settings
        return
    with EmbeddedRedis(settings.embedded_redis_dir, settings.embedded_redis_socket) as redis_server:
        yield settings.model_copy(update={"broker_url": redis_server.url})


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT."""
    for directory in (settings.data_dir, settings.spool_dir, settings.results_dir, settings.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    configure_logging(settings.log_level, settings.log_dir / "pacs-ai.log")
    _discard_partial_transfers(settings)
    log.info(
        "pacs-ai starting: data directory %s, log %s", settings.data_dir, settings.log_dir / "pacs-ai.log"
    )

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    url = settings.effective_database_url
    upgrade_schema(url)
    log.info("index database: %s", _describe_database(url))

    with _broker(settings) as settings:
        sessions = make_session_factory(make_engine(url))
        scheduler = Scheduler(settings, sessions, CeleryTaskQueue(create_app(settings)))
        _warn_about_unconfigured_destinations(settings, scheduler)
        supervisor = Supervisor(settings, scheduler)
        supervisor.start()
        log.info(
            "DICOM listener: AE %s on %s:%d (%d processes); profiles from %s",
            settings.ae_title,
            settings.listen_host,
            settings.listen_port,
            settings.listener_processes,
            settings.profiles_dir,
        )
        try:
            scheduler.recover()
            while not stop.is_set():
                try:
                    scheduler.run_once()
                except Exception:  # keep scheduling; the failure is in the log
                    log.exception("scheduler pass failed")
                try:
                    supervisor.check()
                except Exception:
                    log.exception("supervising the child processes failed")
                stop.wait(settings.scheduler_interval_seconds)
        finally:
            log.info("pacs-ai stopping")
            supervisor.stop()
            log.info("pacs-ai stopped")


def _warn_about_unconfigured_destinations(settings: Settings, scheduler: Scheduler) -> None:
    for profile in scheduler.profiles.profiles:
        missing = [name for name in profile.destinations if name not in settings.destinations]
        if missing:
            log.warning(
                "profile %s sends results to %s, which is not configured (PACS_AI_DESTINATIONS); "
                "its results will be kept in %s and recorded as undelivered",
                profile.name,
                ", ".join(missing),
                settings.results_dir,
            )


def _discard_partial_transfers(settings: Settings) -> None:
    """Remove data sets whose transfer was cut off by a previous stop; none was acknowledged."""
    tmp_dir = settings.spool_dir / "tmp"
    leftovers = list(tmp_dir.glob("*")) if tmp_dir.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log.info("removed %d partial transfer(s) left in %s", len(leftovers), tmp_dir)


def _describe_database(url: str) -> str:
    if url.startswith("sqlite"):
        return f"SQLite {Path(url.split('///', 1)[-1])}"
    return url.split("@")[-1]
