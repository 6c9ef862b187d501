"""A worker node's presence in the index: registration, heartbeats, models loaded, clean stop.

Connected to Celery's signals in :mod:`workers.factory`.  The worker's main
process registers its node (``starting``) when it initialises, marks it
``ready`` once it consumes, beats every ``worker_heartbeat_seconds`` from a
thread, and marks it ``stopped`` on a clean shutdown; each pool process records
the models it keeps loaded after a task.  Nothing here touches a local file, so
``pacs-ai status`` on any host sees the workers of every host.

The heartbeat thread has its own engine: the pool processes are forked from
this process, and a child must never use (or close) a connection it inherited,
so the engine's pool is dropped without closing in each child
(``os.register_at_fork``; SQLAlchemy's recipe for forking).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import threading
from typing import Any

import psutil
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import __version__
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import WorkerState
from pacs_ai.index.workers import beat, record_process_models, register_worker, set_worker_state
from pacs_ai.models.device import device_name

log = logging.getLogger(__name__)

MIB = 2**20
#: Seconds nvidia-smi may take to describe the GPUs before the device is described without them.
NVIDIA_SMI_TIMEOUT_SECONDS = 10.0


def describe_device(settings: Settings, cuda_visible_devices: str | None) -> dict[str, Any]:
    """Where this worker's models run: the CUDA device(s) it sees with name and memory, or the CPU.

    Never initialises CUDA in this process (its pool is forked from it, and CUDA
    does not survive a fork): the device count comes from torch's fork-safe
    check and names and memory from ``nvidia-smi``.
    """
    import torch  # the worker imports torch anyway (analyzers); not needed by anything else here

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        chosen = device_name(settings.inference_device, count)
    except ValueError as exc:
        return {"type": "error", "error": str(exc)}
    if chosen == "cpu":
        return {
            "type": "cpu",
            "name": _cpu_model() or platform.machine(),
            "cores": os.cpu_count(),
            "memory_mb": psutil.virtual_memory().total // MIB,
        }
    gpus = _nvidia_gpus(cuda_visible_devices)
    return {"type": "cuda", "device": chosen, "count": count, "gpus": gpus}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _nvidia_gpus(cuda_visible_devices: str | None) -> list[dict[str, Any]]:
    """Name and total memory of the GPUs this process sees, from ``nvidia-smi`` ([] without it)."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        output = subprocess.run(
            [executable, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_SECONDS,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi could not describe the GPUs: %s", exc)
        return []
    gpus = []
    for line in output.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 4:
            index, uuid, name, memory = fields
            gpus.append(
                {
                    "index": index,
                    "uuid": uuid,
                    "name": name,
                    "memory_mb": int(memory) if memory.isdigit() else None,
                }
            )
    return visible_gpus(gpus, cuda_visible_devices)


def visible_gpus(gpus: list[dict[str, Any]], cuda_visible_devices: str | None) -> list[dict[str, Any]]:
    """The GPUs of ``nvidia-smi``'s list that CUDA_VISIBLE_DEVICES leaves visible, in its order (pure)."""
    if cuda_visible_devices is None:
        return gpus
    chosen = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",") if e.strip()):
        match = next((g for g in gpus if entry == g["index"] or g["uuid"].startswith(entry)), None)
        if match is None:
            break  # CUDA stops at the first entry that names no device
        chosen.append(match)
    return chosen


class NodePresence:
    """The main process's side: the node's row, its heartbeat thread and its clean stop."""

    def __init__(self, settings: Settings, node: str) -> None:
        self.settings = settings
        self.node = node
        self.engine: Engine = make_engine(settings.effective_database_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registration: dict[str, Any] = {}
        self._registered = False
        self._consuming = False
        os.register_at_fork(after_in_child=self._forget_connections_in_child)

    def _forget_connections_in_child(self) -> None:
        self.engine.dispose(close=False)

    def register(self, queues: list[str], concurrency: int) -> None:
        """Insert or reset the row (``starting``) and start beating.

        An index that cannot be reached now is not fatal: the heartbeat thread
        registers the node as soon as it can.
        """
        self._registration = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "queues": queues,
            "concurrency": concurrency,
            "device": describe_device(self.settings, os.environ.get("CUDA_VISIBLE_DEVICES")),
            "version": __version__,
        }
        self._try_to_register()
        self._thread = threading.Thread(
            target=self._beat_until_stopped, name="pacs-ai-heartbeat", daemon=True
        )
        self._thread.start()

    def _try_to_register(self) -> None:
        try:
            with session_scope(self.sessions) as session:
                register_worker(session, node=self.node, **self._registration)
        except SQLAlchemyError as exc:
            log.warning("worker %s could not register in the index yet: %s", self.node, exc)
            return
        self._registered = True
        if self._consuming:
            self._set_state(WorkerState.READY)
        log.info(
            "worker %s registered in the index (queues %s, device %s)",
            self.node,
            ",".join(self._registration["queues"]),
            self._registration["device"],
        )

    def ready(self) -> None:
        self._consuming = True
        self._set_state(WorkerState.READY)

    def stopped(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._set_state(WorkerState.STOPPED)
        self.engine.dispose()

    def _set_state(self, state: WorkerState) -> None:
        try:
            with session_scope(self.sessions) as session:
                set_worker_state(session, self.node, state)
        except SQLAlchemyError as exc:
            log.warning("worker %s could not record that it is %s: %s", self.node, state.value, exc)

    def _beat_until_stopped(self) -> None:
        interval = self.settings.worker_heartbeat_seconds
        while not self._stop.wait(interval):
            if not self._registered:
                self._try_to_register()
                continue
            try:
                children = [child.pid for child in psutil.Process().children()]
                with session_scope(self.sessions) as session:
                    self._registered = beat(session, self.node, children)
            except Exception as exc:  # noqa: BLE001 - an index down for a while must not end the beating
                log.warning("heartbeat of worker %s not recorded: %s", self.node, exc)


class ProcessModels:
    """A pool process's side: records the models it keeps loaded when they changed since last time."""

    def __init__(self) -> None:
        self._last: list[str] | None = None

    def record(self, sessions: sessionmaker[Session], node: str, models: list[str]) -> None:
        if models == self._last:
            return
        try:
            with session_scope(sessions) as session:
                record_process_models(session, node, os.getpid(), models)
            self._last = models
        except SQLAlchemyError as exc:
            log.warning("models loaded by worker %s not recorded: %s", node, exc)
