"""``pacs-ai serve``: run every part of pacs-ai on one machine.

Starts, in order: the index schema migration, the embedded Redis broker
(unless a broker URL is configured), the DICOM listener processes, the Celery
worker processes, the radiologist worklist (one uvicorn process, unless
``worklist_enabled`` is off), and the scheduler loop in this process.  SIGTERM or
SIGINT stops everything in reverse order.  The log says where each part lives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from pacs_ai import metrics
from pacs_ai.broker import EmbeddedRedis
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.workers import forget_silent_workers, take_lost_workers
from pacs_ai.logging_setup import configure_logging
from pacs_ai.process import SignalledStop, die_with_parent
from pacs_ai.receive.balance import AssociationLoads
from pacs_ai.receive.listener import open_listening_socket
from pacs_ai.redact import redact_url
from pacs_ai.route.scheduler import Scheduler
from pacs_ai.worklist.server import bind_worklist_socket, worklist_url
from workers.celery_app import QUEUES, create_client
from workers.task_queue import CeleryTaskQueue  # the scheduler's queue; importable from here as before

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """One Celery worker process to start: its node name prefix, queues, concurrency and GPU."""

    node_prefix: str
    queues: tuple[str, ...]
    concurrency: int
    #: CUDA_VISIBLE_DEVICES for a GPU worker; None leaves the environment as it is.
    cuda_visible_devices: str | None = None


def gpu_worker_devices(
    configured: list[str] | None, cuda_device_count: int, visible: str | None
) -> list[str]:
    """CUDA_VISIBLE_DEVICES value of each GPU worker (pure; unit-tested).

    ``configured`` (``settings.gpu_workers``) wins; otherwise one worker per
    CUDA device this process sees, named as the parent's CUDA_VISIBLE_DEVICES
    (``visible``) lists them, or by index when it is unset.
    """
    if configured is not None:
        return list(configured)
    if cuda_device_count <= 0:
        return []
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if entries:
        return entries[:cuda_device_count]
    return [str(i) for i in range(cuda_device_count)]


def plan_workers(
    worker_processes: int,
    worker_concurrency: int,
    gpu_devices: Sequence[str],
    queues: Sequence[str] | None = None,
) -> list[WorkerSpec]:
    """The Celery workers to start (pure; unit-tested).

    With GPUs, one worker per GPU serves only the ``gpu`` queue, one task at a
    time, and the CPU workers serve ``cpu`` and ``dispatch``; without, the CPU
    workers serve every queue (models then run on the CPU).  ``queues``
    (``settings.worker_queues``) limits what this host serves, e.g. ``dispatch``
    alone on a receiver whose analyses run on other hosts; GPU workers start
    only when it includes ``gpu``.
    """
    wanted = tuple(q for q in QUEUES if queues is None or q in queues)
    if "gpu" not in wanted:
        gpu_devices = ()
    cpu_queues = tuple(q for q in wanted if q != "gpu") if gpu_devices else wanted
    specs = [
        WorkerSpec(f"pacs-ai-{i}", cpu_queues, worker_concurrency)
        for i in range(worker_processes if cpu_queues else 0)
    ]
    specs += [WorkerSpec(f"pacs-ai-gpu{i}", ("gpu",), 1, device) for i, device in enumerate(gpu_devices)]
    return specs


#: Where the NVIDIA kernel driver lists the GPUs it drives; without it CUDA has no device.
NVIDIA_DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")


def _cuda_device_count() -> int:
    """GPUs CUDA can use here: 0 without the NVIDIA driver, else torch's count.

    Importing torch costs the supervisor several seconds of CPU at every start
    (and more at exit), so it is asked only where a driver is present.
    """
    if not NVIDIA_DRIVER_GPUS.is_dir():
        return 0
    import torch  # only here, and only with a driver: the supervisor needs torch for nothing else

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_specs(settings: Settings) -> list[WorkerSpec]:
    """The workers ``pacs-ai serve`` starts with these settings on this machine."""
    serves_gpu = settings.worker_queues is None or "gpu" in settings.worker_queues
    if (settings.gpu_workers is None and settings.worker_processes == 0) or not serves_gpu:
        devices: list[str] = []  # no local GPU workers wanted; do not probe for GPUs
    else:
        count = _cuda_device_count() if settings.gpu_workers is None else 0
        devices = gpu_worker_devices(settings.gpu_workers, count, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return plan_workers(
        settings.worker_processes, settings.worker_concurrency, devices, settings.worker_queues
    )


#: A worklist process that dies is started again no sooner than this after its previous start,
#: so one that cannot run (a broken installation) does not spin.
WORKLIST_RESTART_SECONDS = 5.0


class Supervisor:
    """Starts the listener, worker and worklist processes and restarts any that dies.

    When a worker dies (killed, out of memory), the jobs it had claimed are
    handed back to the queue at once rather than after the broker's visibility
    timeout; a restarted worker, or another one, then takes them over.  Workers
    on other hosts are watched through their heartbeats in the index
    (:meth:`hand_back_jobs_of_lost_workers`).
    """

    def __init__(
        self, settings: Settings, scheduler: Scheduler, embedded_redis: EmbeddedRedis | None = None
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        #: The embedded broker, restarted by :meth:`check` when it dies; None with a configured broker.
        self.embedded_redis = embedded_redis
        self.listeners: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.listening_socket: socket.socket | None = None
        #: Associations each listener process serves, so new ones go to the least busy.
        self.association_loads = AssociationLoads(settings.listener_processes)
        self.hostname = socket.gethostname()
        self.worker_specs = worker_specs(settings)
        self.worklist: subprocess.Popen[bytes] | None = None
        self.worklist_socket: socket.socket | None = None
        self._worklist_started_at = 0.0
        #: Monotonic time of the next look for workers (on any host) that stopped beating.
        self._next_lost_worker_check = 0.0

    def worker_node_name(self, index: int) -> str:
        return f"{self.worker_specs[index].node_prefix}@{self.hostname}"

    def start(self) -> None:
        self.listening_socket = open_listening_socket(self.settings.listen_host, self.settings.listen_port)
        if self.settings.worklist_enabled:
            # Bound here, once: a taken port stops start-up with a clear message, and restarts reuse it.
            self.worklist_socket = bind_worklist_socket(
                self.settings.worklist_host, self.settings.worklist_port
            )
        self.listeners = [self._start_listener(i) for i in range(self.settings.listener_processes)]
        self.workers = [self._start_worker(i) for i in range(len(self.worker_specs))]
        if self.worklist_socket is not None:
            self.worklist = self._start_worklist()
        self.write_run_state()

    @property
    def worklist_url(self) -> str | None:
        if not self.settings.worklist_enabled:
            return None
        return worklist_url(self.settings.worklist_host, self.settings.worklist_port)

    def _start_worklist(self) -> subprocess.Popen[bytes]:
        """The worklist web app (uvicorn) on the socket bound at start; its log is ``worklist.log``."""
        assert self.worklist_socket is not None
        descriptor = self.worklist_socket.fileno()
        command = [
            sys.executable,
            "-m",
            "pacs_ai.worklist.server",
            "--fd",
            str(descriptor),
            "--parent-pid",
            str(os.getpid()),
        ]
        self._worklist_started_at = time.monotonic()
        process = subprocess.Popen(
            command,
            env=self.settings.child_environment(),
            stdin=subprocess.DEVNULL,
            pass_fds=(descriptor,),
            start_new_session=True,
        )
        log.info(
            "worklist at %s (pid %d, log %s)",
            (self.worklist_url or "").rstrip("/"),
            process.pid,
            self.settings.log_dir / "worklist.log",
        )
        return process

    def _start_listener(self, index: int) -> subprocess.Popen[bytes]:
        """Listener process ``index`` on the shared socket (see :func:`pacs_ai.receive.listener.main`)."""
        assert self.listening_socket is not None
        self.association_loads.reset(index)  # a fresh process serves no associations yet
        socket_fd = self.listening_socket.fileno()
        loads_fd = self.association_loads.descriptor
        command = [
            sys.executable,
            "-m",
            "pacs_ai.receive.listener",
            "--socket-fd",
            str(socket_fd),
            "--loads-fd",
            str(loads_fd),
            "--slot",
            str(index),
            "--parent-pid",
            str(os.getpid()),
        ]
        return subprocess.Popen(
            command,
            env=self.settings.child_environment(),
            stdin=subprocess.DEVNULL,
            pass_fds=(socket_fd, loads_fd),
        )

    def _start_worker(self, index: int) -> subprocess.Popen[bytes]:
        """Worker ``index`` as ``pacs-ai worker``, the command a worker on another host runs too."""
        spec = self.worker_specs[index]
        log_file = self.settings.log_dir / f"worker-{index}.log"
        command = [
            sys.executable,
            "-m",
            "pacs_ai.cli.main",
            "worker",
            "--queues",
            ",".join(spec.queues),
            "--concurrency",
            str(spec.concurrency),
            "--name",
            self.worker_node_name(index),
            "--logfile",
            str(log_file),
        ]
        environment = self.settings.child_environment()
        if spec.cuda_visible_devices is not None:
            environment["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        worker = subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info(
            "Celery worker %s pid %d serving queues %s%s (log %s)",
            self.worker_node_name(index),
            worker.pid,
            ",".join(spec.queues),
            f" on GPU {spec.cuda_visible_devices}" if spec.cuda_visible_devices else "",
            log_file,
        )
        return worker

    def check(self) -> None:
        """Restart dead children (the embedded broker first); hand a dead worker's jobs to the others."""
        self._restart_dead_broker()
        changed = False
        for index, process in enumerate(self.listeners):
            if process.poll() is not None:
                metrics.mark_process_dead(process.pid)
                metrics.process_restarted("listener")
                log.error(
                    "listener-%d (pid %s) exited with %s; restarting it",
                    index,
                    process.pid,
                    process.returncode,
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
                metrics.mark_process_dead(worker.pid)
                metrics.process_restarted("worker")
                self.scheduler.requeue_jobs_of(node)
                self.workers[index] = self._start_worker(index)
                changed = True
        worklist = self.worklist
        if (
            worklist is not None
            and worklist.poll() is not None
            and time.monotonic() - self._worklist_started_at >= WORKLIST_RESTART_SECONDS
        ):
            log.error("worklist (pid %d) exited with %s; restarting it", worklist.pid, worklist.returncode)
            metrics.mark_process_dead(worklist.pid)
            metrics.process_restarted("worklist")
            self.worklist = self._start_worklist()
            changed = True
        if changed:
            self.write_run_state()
        metrics.processes_running(self.running_processes())

    def running_processes(self) -> dict[str, int]:
        """Child processes alive now, by role (``listener``, ``worker``, ``worklist``)."""
        worklists = [self.worklist] if self.worklist is not None else []
        groups = {"listener": self.listeners, "worker": self.workers, "worklist": worklists}
        return {role: sum(process.poll() is None for process in group) for role, group in groups.items()}

    def hand_back_jobs_of_lost_workers(self) -> list[str]:
        """Mark workers on any host that stopped beating as lost; queue their running jobs again.

        Runs once per ``worker_heartbeat_seconds``.  The broker would hand a dead
        worker's unacknowledged message to another only after
        ``broker_visibility_timeout_seconds`` (an hour by default); the index
        knows sooner.  Should the message come back later as well, the job is
        finished by then and the message does nothing (results are idempotent).
        """
        now = time.monotonic()
        if now < self._next_lost_worker_check:
            return []
        self._next_lost_worker_check = now + self.settings.worker_heartbeat_seconds
        with session_scope(self.scheduler.sessions) as session:
            lost = take_lost_workers(session, self.settings.worker_stale_after_seconds)
            # Hosts gone for good: lost (or stopped) for worker_forget_after_hours, no longer listed.
            for gone in forget_silent_workers(session, self.settings.worker_forget_after_hours):
                log.warning(
                    "worker %s on %s forgotten: %s since %s",
                    gone.node,
                    gone.hostname,
                    gone.state,
                    gone.last_heartbeat,
                )
        for node in lost:
            log.error(
                "worker %s sent no heartbeat for %g s: marked lost, its running jobs queued again",
                node,
                self.settings.worker_stale_after_seconds,
            )
            self.scheduler.requeue_jobs_of(node)
        return lost

    @staticmethod
    def _kill_group(worker: subprocess.Popen[bytes]) -> None:
        # The worker's pool children share its session; none may outlive it
        # and keep running a job that is being handed to another worker.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)

    def _restart_dead_broker(self) -> None:
        """Start the embedded redis-server again if it died; failures are logged, tried next time."""
        broker = self.embedded_redis
        if broker is None:
            return
        status = broker.exit_status()
        if status is None:
            return
        log.error("embedded redis-server (pid %s) exited with %s; restarting it", broker.process_id, status)
        try:
            broker.restart()
        except RuntimeError as exc:
            log.error("the embedded redis-server could not be restarted (tried again shortly): %s", exc)

    def write_run_state(self) -> None:
        """Record the processes in ``data_dir/run/service.json`` for ``pacs-ai status`` and operators."""
        state = {
            "service_pid": os.getpid(),
            "ae_title": self.settings.ae_title,
            "listen": f"{self.settings.listen_host}:{self.settings.listen_port}",
            "listener_pids": [p.pid for p in self.listeners],
            "workers": [{"node": self.worker_node_name(i), "pid": w.pid} for i, w in enumerate(self.workers)],
            "broker": redact_url(self.settings.effective_broker_url),
            "worklist": (
                {"url": self.worklist_url, "pid": self.worklist.pid if self.worklist else None}
                if self.settings.worklist_enabled
                else None
            ),
        }
        path = self.settings.data_dir / "run" / "service.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(temporary, path)

    def stop(self) -> None:
        for process in self.listeners:
            if process.poll() is None:
                process.terminate()
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()  # warm shutdown: running tasks finish or return to the queue
        if self.worklist is not None and self.worklist.poll() is None:
            self.worklist.terminate()  # uvicorn finishes the requests in flight
        for process in self.listeners:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.listening_socket is not None:
            self.listening_socket.close()
        for worker in self.workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._kill_group(worker)
                worker.wait()
        if self.worklist is not None:
            try:
                self.worklist.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._kill_group(self.worklist)
                self.worklist.wait()
        if self.worklist_socket is not None:
            self.worklist_socket.close()
        (self.settings.data_dir / "run" / "service.json").unlink(missing_ok=True)
        self.settings.child_settings_file.unlink(missing_ok=True)  # it holds the secrets


@contextlib.contextmanager
def _broker(settings: Settings) -> Iterator[tuple[Settings, EmbeddedRedis | None]]:
    """Yield settings whose broker URL points at a running broker, and the embedded one if started."""
    if settings.broker_url:
        log.info("broker: %s", redact_url(settings.effective_broker_url))
        yield settings, None
        return
    with EmbeddedRedis(settings.embedded_redis_dir, settings.embedded_redis_socket) as redis_server:
        yield settings.model_copy(update={"broker_url": SecretStr(redis_server.url)}), redis_server


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT."""
    for directory in (settings.data_dir, settings.spool_dir, settings.results_dir, settings.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    configure_logging(settings.log_level, settings.log_dir / "pacs-ai.log")
    # Before any metric is made here or in a child: every process of this host counts under it.
    metrics.use_directory(settings.metrics_dir, clean=True)
    # For `pacs-ai` commands in other shells (destinations given here by environment, for instance).
    settings.write_effective_settings()
    _discard_partial_transfers(settings)
    log.info(
        "pacs-ai starting: data directory %s, log %s", settings.data_dir, settings.log_dir / "pacs-ai.log"
    )

    stop = SignalledStop()

    url = settings.effective_database_url
    upgrade_schema(url)
    log.info("index database: %s", _describe_database(url))

    with _broker(settings) as (settings, embedded_redis):
        sessions = make_session_factory(make_engine(url))
        app = create_client(settings)
        scheduler = Scheduler(
            settings,
            sessions,
            CeleryTaskQueue(app),
            queue_depths=lambda: metrics.broker_queue_depths(app.connection_for_read(), QUEUES),
        )
        _warn_about_unconfigured_destinations(settings, scheduler)
        supervisor = Supervisor(settings, scheduler, embedded_redis)
        supervisor.start()
        exporter = (
            metrics.start_exporter(settings.metrics_host, settings.metrics_port)
            if settings.metrics_enabled
            else None
        )
        log.info(
            "DICOM listener: AE %s on %s:%d (%d processes); profiles from %s",
            settings.ae_title,
            settings.listen_host,
            settings.listen_port,
            settings.listener_processes,
            settings.profiles_dir,
        )
        try:
            scheduler.load_analyzers()
            scheduler.recover()
            while not stop.is_set():
                try:
                    scheduler.run_once()
                except Exception:  # keep scheduling; the failure is in the log
                    log.exception("scheduler pass failed")
                try:
                    supervisor.check()
                    supervisor.hand_back_jobs_of_lost_workers()
                except Exception:
                    log.exception("supervising the child processes and workers failed")
                stop.wait(scheduler.seconds_until_next_pass())
        finally:
            log.info("pacs-ai stopping")
            supervisor.stop()
            if exporter is not None:
                exporter.stop()
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
