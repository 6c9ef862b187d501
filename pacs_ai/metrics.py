"""Prometheus metrics of every pacs-ai process, served on each host for Prometheus to scrape.

One host runs several processes that count: ``pacs-ai serve`` (the scheduler),
its listener processes, the Celery workers and their pool processes, and the
worklist (uvicorn).  They share prometheus-client's multiprocess mode: each
writes its values into files under ``PROMETHEUS_MULTIPROC_DIR`` (the data
directory's ``run/metrics``), and the exporter of the host adds them up when
Prometheus scrapes ``/metrics``.  The directory is emptied when the service
starts, and the files of a child that exits are marked dead
(:func:`mark_process_dead`), so its gauges stop counting.

prometheus-client chooses multiprocess mode when it is first imported, from
the environment.  So this module imports it only once the process knows its
directory (:func:`use_directory`, or inherited from the parent): the metrics
are built at the first instrumentation call, never at import.

Labels carry AE titles, analyzer, model, queue and destination names, DIMSE
status codes and reason classes only: never a name, an ID, a UID, a date or
free text, so the metrics can leave the hospital network without PHI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kombu import Connection
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: prometheus-client's variable: where the processes of one host keep their values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds buckets of a C-STORE's filing (last byte of the data set to the response).
STORE_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds buckets of a job's stages (fetch, load, analyze, encode, store, record).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Seconds buckets of one delivery attempt.
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: The stages of a job, as ``jobs.timings`` names them (``<stage>_seconds``), plus ``record``.
JOB_STAGES = ("fetch", "load", "analyze", "encode", "store", "record")

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.:+\- ]")


def label(value: object, limit: int = 64) -> str:
    """A label value: printable ASCII without quotes or separators, at most ``limit`` characters (pure)."""
    text = _LABEL_UNSAFE.sub("_", str(value).strip())[:limit]
    return text or "unknown"


def status_label(status: int | None) -> str:
    """A DIMSE status as DICOM writes it, ``0xA700``; ``none`` when there was no response (pure)."""
    return "none" if status is None else f"0x{status:04X}"


def is_multiprocess() -> bool:
    """True when this process writes its values to the host's multiprocess directory."""
    return bool(os.environ.get(MULTIPROC_ENV))


def use_directory(directory: Path, *, clean: bool) -> bool:
    """Make this process and its children write metrics under ``directory`` (multiprocess mode).

    ``clean`` empties it first: values of processes from a previous start
    would otherwise be added to this one's (Prometheus sees a restart as a
    counter reset either way).  False, with a warning, when prometheus-client
    was imported before (its mode cannot change any more in this process).
    """
    if "prometheus_client" in sys.modules and not is_multiprocess():
        log.warning(
            "prometheus_client was imported before the metrics directory was set: this process's "
            "metrics are not shared with the other processes of the host"
        )
        return False
    if clean and directory.is_dir():
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return True


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of a child process that exited (its counters keep counting)."""
    if not is_multiprocess():
        return
    from prometheus_client import multiprocess  # after the directory is set (module docstring)

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)


def registry() -> CollectorRegistry:
    """What /metrics shows: every process of the host in multiprocess mode, else this process."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if not is_multiprocess():
        _metrics()
        return REGISTRY
    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)
    return collected


def exposition() -> tuple[bytes, str]:
    """The text /metrics answers and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry()), CONTENT_TYPE_LATEST


@dataclass
class Exporter:
    """An HTTP server answering /metrics on a thread of its own."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_exporter(host: str, port: int) -> Exporter | None:
    """Serve /metrics on ``host:port``; None (logged) when the port cannot be bound.

    A port taken by another program must not stop DICOM ingest: the error
    says which setting to change, and the service runs on without metrics.
    """
    from prometheus_client import start_http_server

    _metrics()  # this process's series exist (at zero) from the first scrape
    try:
        server, thread = start_http_server(port, addr=host, registry=registry())
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d (%s); set metrics_host/metrics_port (or "
            "worker_metrics_port) to a free address, or metrics_enabled=false",
            host,
            port,
            exc,
        )
        return None
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_port}/metrics"
    log.info("Prometheus metrics at %s", url)
    return Exporter(server, thread, url)


class _Metrics:
    """Every metric pacs-ai exports (built once per process, after the mode is chosen)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # Ingest (listener processes)
        self.associations = Counter(
            "pacs_ai_associations", "Associations accepted, by calling AE title.", ["calling_ae"]
        )
        self.associations_rejected = Counter(
            "pacs_ai_associations_rejected", "Associations rejected or aborted at negotiation.", ["reason"]
        )
        self.instances = Counter(
            "pacs_ai_ingest_instances", "Instances stored (acknowledged with 0x0000).", ["calling_ae"]
        )
        self.ingest_bytes = Counter(
            "pacs_ai_ingest_bytes", "Bytes of data sets stored, as received.", ["calling_ae"]
        )
        self.dimse = Counter(
            "pacs_ai_dimse_responses", "DIMSE responses sent, by command and status.", ["command", "status"]
        )
        self.store_seconds = Histogram(
            "pacs_ai_store_seconds",
            "Seconds from a data set's last byte to its C-STORE response (spool, fsync, index).",
            buckets=STORE_BUCKETS,
        )
        # Jobs (worker pool processes)
        self.stage_seconds = Histogram(
            "pacs_ai_job_stage_seconds",
            "Seconds each stage of a job took, by analyzer and model.",
            ["stage", "analyzer", "model"],
            buckets=STAGE_BUCKETS,
        )
        self.jobs = Counter("pacs_ai_jobs", "Job attempts finished, by outcome.", ["analyzer", "outcome"])
        self.job_failures = Counter(
            "pacs_ai_job_failures", "Job attempts that failed, by reason class.", ["analyzer", "reason"]
        )
        # Deliveries and report drafts
        self.deliveries = Counter(
            "pacs_ai_deliveries",
            "Delivery attempts, by destination and the state they left (sent, retrying, failed).",
            ["destination", "state"],
        )
        self.delivery_seconds = Histogram(
            "pacs_ai_delivery_seconds",
            "Seconds one delivery attempt took, by destination.",
            ["destination"],
            buckets=DELIVERY_BUCKETS,
        )
        self.drafts = Counter(
            "pacs_ai_report_drafts",
            "Report drafting runs, by outcome (drafted, fallback, skipped, error) and backend.",
            ["outcome", "backend"],
        )
        self.uploads = Counter(
            "pacs_ai_storage_uploads", "Instances put into the object store, by outcome.", ["outcome"]
        )
        self.fetches = Counter(
            "pacs_ai_storage_fetches",
            "Objects workers fetched from the object store into their cache: by a prefetch hint or a job.",
            ["fetcher"],
        )
        # Sampled by the scheduler (``pacs-ai serve``): the most recent value of the live process.
        self.queue_depth = Gauge(
            "pacs_ai_queue_depth",
            "Messages waiting in each broker queue.",
            ["queue"],
            multiprocess_mode="livemostrecent",
        )
        self.storage_backlog = Gauge(
            "pacs_ai_storage_backlog_instances",
            "Instances acknowledged and not yet in the object store (0 with the embedded storage).",
            multiprocess_mode="livemostrecent",
        )
        self.deliveries_pending = Gauge(
            "pacs_ai_deliveries_pending",
            "Deliveries waiting for an attempt or a retry, by destination.",
            ["destination"],
            multiprocess_mode="livemostrecent",
        )
        self.workers = Gauge(
            "pacs_ai_workers",
            "Worker nodes on any host, by the state the index has for them.",
            ["state"],
            multiprocess_mode="livemostrecent",
        )
        self.disk_free = Gauge(
            "pacs_ai_disk_free_bytes",
            "Free bytes on the disk of a directory of this host (data, spool).",
            ["directory"],
            multiprocess_mode="livemostrecent",
        )
        self.disk_size = Gauge(
            "pacs_ai_disk_size_bytes",
            "Size in bytes of the disk of a directory of this host (data, spool).",
            ["directory"],
            multiprocess_mode="livemostrecent",
        )
        self.processes = Gauge(
            "pacs_ai_processes",
            "Child processes of pacs-ai serve running, by role (listener, worker, worklist).",
            ["role"],
            multiprocess_mode="livemostrecent",
        )
        self.restarts = Counter(
            "pacs_ai_process_restarts", "Child processes restarted after they died, by role.", ["role"]
        )
        self.scheduler_passes = Counter("pacs_ai_scheduler_passes", "Scheduler passes run.")
        # Where CUDA runs the models: each pool process's own memory, added up per device.
        self.gpu_memory = Gauge(
            "pacs_ai_gpu_memory_bytes",
            "CUDA memory the worker processes hold, by device and kind (allocated, reserved).",
            ["device", "kind"],
            multiprocess_mode="livesum",
        )


_built: _Metrics | None = None
_build_lock = threading.Lock()


def _metrics() -> _Metrics:
    global _built
    if _built is None:
        with _build_lock:
            if _built is None:
                _built = _Metrics()
    return _built


def metric_names() -> list[str]:
    """Every metric pacs-ai exports, as queries name it (counters with ``_total``; histograms without
    ``_bucket``, ``_sum`` and ``_count``): for the README, the alert rules and the tests."""
    families = [metric.describe()[0] for metric in vars(_metrics()).values()]
    return sorted(f"{f.name}_total" if f.type == "counter" else f.name for f in families)


# --- instrumentation: one call per event at the places that know it ---------------------------------


def association_accepted(calling_ae: str) -> None:
    _metrics().associations.labels(label(calling_ae, 16)).inc()


def association_rejected(reason: str) -> None:
    """``reason``: a class (``called-ae``, ``unknown-peer``, ``association-limit``, ``low-disk``...)."""
    _metrics().associations_rejected.labels(label(reason, 32)).inc()


def dimse_response(command: str, status: int | None) -> None:
    _metrics().dimse.labels(label(command, 16), status_label(status)).inc()


def instance_stored(calling_ae: str, size_bytes: int, seconds: float) -> None:
    metrics = _metrics()
    ae = label(calling_ae, 16)
    metrics.instances.labels(ae).inc()
    metrics.ingest_bytes.labels(ae).inc(max(0, size_bytes))
    metrics.store_seconds.observe(seconds)


def store_refused(seconds: float) -> None:
    """A data set answered with a failure status (counted by :func:`dimse_response`), timed too."""
    _metrics().store_seconds.observe(seconds)


def job_stages(analyzer: str, model: str, timings: Mapping[str, float]) -> None:
    """Observe the ``<stage>_seconds`` entries of a job's ``timings``."""
    histogram = _metrics().stage_seconds
    analyzer_label, model_label = label(analyzer), label(model)
    for stage in JOB_STAGES:
        seconds = timings.get(f"{stage}_seconds")
        if seconds is not None:
            histogram.labels(stage, analyzer_label, model_label).observe(seconds)


def job_finished(analyzer: str, outcome: str, reason: str | None = None) -> None:
    """A job attempt ended: ``succeeded``, ``failed`` (for good) or ``error`` (retried); ``reason`` class."""
    metrics = _metrics()
    metrics.jobs.labels(label(analyzer), outcome).inc()
    if reason is not None:
        metrics.job_failures.labels(label(analyzer), label(reason, 32)).inc()


#: Exception class names -> failure reason class of a job attempt that raised.
_ERROR_CLASSES = {
    "StorageError": "storage",
    "SoftTimeLimitExceeded": "timeout",
    "TimeLimitExceeded": "timeout",
    "MemoryError": "memory",
    "OutOfMemoryError": "memory",
    "OperationalError": "index",
    "DatabaseError": "index",
}


def error_class(exc: BaseException) -> str:
    """An exception's reason class: ``storage``, ``timeout``, ``memory``, ``index`` or ``error`` (pure)."""
    for kind in type(exc).__mro__:
        if kind.__name__ in _ERROR_CLASSES:
            return _ERROR_CLASSES[kind.__name__]
    return "error"


def delivery_attempted(destination: str, state: str, seconds: float) -> None:
    """One attempt to ``destination`` left the delivery ``sent``, ``retrying`` or ``failed``."""
    metrics = _metrics()
    name = label(destination)
    metrics.deliveries.labels(name, state).inc()
    metrics.delivery_seconds.labels(name).observe(seconds)


def draft_finished(outcome: str, backend: str = "none") -> None:
    _metrics().drafts.labels(outcome, label(backend, 32)).inc()


def uploads(uploaded: int, failed: int) -> None:
    metrics = _metrics()
    if uploaded:
        metrics.uploads.labels("uploaded").inc(uploaded)
    if failed:
        metrics.uploads.labels("failed").inc(failed)


def objects_fetched(fetcher: str, count: int) -> None:
    """A worker fetched ``count`` objects into its cache; ``fetcher``: "prefetch" (a hint) or "job"."""
    if count:
        _metrics().fetches.labels(fetcher).inc(count)


def processes_running(counts: Mapping[str, int]) -> None:
    gauge = _metrics().processes
    for role, count in counts.items():
        gauge.labels(role).set(count)


def process_restarted(role: str) -> None:
    _metrics().restarts.labels(role).inc()


def scheduler_pass() -> None:
    _metrics().scheduler_passes.inc()


#: Destinations the pending-deliveries gauge has named in this process.
_pending_destinations: set[str] = set()


@dataclass(frozen=True)
class HostSample:
    """What the scheduler read from the broker, the index and the disks (one sample)."""

    queue_depths: Mapping[str, int]
    storage_backlog: int
    deliveries_pending: Mapping[str, int]
    workers: Mapping[str, int]
    disks: Mapping[str, Path]


def record_sample(sample: HostSample, worker_states: Sequence[str]) -> None:
    """Set the sampled gauges; every state in ``worker_states`` is set (0 when none is in it)."""
    metrics = _metrics()
    for queue, depth in sample.queue_depths.items():
        metrics.queue_depth.labels(label(queue)).set(depth)
    metrics.storage_backlog.set(sample.storage_backlog)
    pending = {label(destination): count for destination, count in sample.deliveries_pending.items()}
    _pending_destinations.update(pending)
    for destination in _pending_destinations:  # a destination whose backlog cleared goes back to 0
        metrics.deliveries_pending.labels(destination).set(pending.get(destination, 0))
    for state in worker_states:
        metrics.workers.labels(state).set(sample.workers.get(state, 0))
    for name, path in sample.disks.items():
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(path)
            metrics.disk_free.labels(name).set(usage.free)
            metrics.disk_size.labels(name).set(usage.total)


def broker_queue_depths(connection: Connection, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them (all priorities of a Redis queue)."""
    with connection:
        channel = connection.default_channel
        return {queue: int(channel.queue_declare(queue=queue).message_count) for queue in queues}


def gpu_memory() -> None:
    """Record this process's CUDA memory where CUDA is in use; nothing where torch or CUDA is not."""
    torch = sys.modules.get("torch")  # never imports torch: a process without it holds no CUDA memory
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gauge = _metrics().gpu_memory
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        gauge.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
        gauge.labels(device, "reserved").set(torch.cuda.memory_reserved(index))
