"""The Celery application of a worker process: its tasks and the signals that warm it up.

Importing this module loads the task bodies (:mod:`workers.tasks`), the
analyzers and the model engine (torch).  Only a worker imports it; whatever
only sends tasks or asks the broker uses :mod:`workers.celery_app`, which
also describes the queues.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import current_app, signals

from pacs_ai.analyze.volume import VoxelLimit
from pacs_ai.analyze.volume_memory import process_volume_memory
from pacs_ai.config import Settings
from pacs_ai.jobs.warmup import warm_up
from pacs_ai.logging_setup import quiet_noisy_libraries
from pacs_ai.models.engine import loaded_model_names
from pacs_ai.storage.registry import connect_early
from workers.celery_app import QUEUES, WARM_UP_TIMEOUT_SECONDS, PacsAiCelery
from workers.heartbeat import NodePresence, ProcessModels

#: This pool process's record of the models it keeps loaded (see :func:`_record_models_loaded`).
_PROCESS_MODELS = ProcessModels()

__all__ = ["QUEUES", "WARM_UP_TIMEOUT_SECONDS", "PacsAiCelery", "create_app"]


@signals.after_setup_logger.connect
def _quiet_libraries(*_args: Any, **_kwargs: Any) -> None:
    quiet_noisy_libraries()


@signals.worker_ready.connect
def _announce_ready(sender: Any = None, **_kwargs: Any) -> None:
    """Mark the node ``ready`` in the index: ``pacs-ai status``, the supervisor and tests read it there."""
    presence = getattr(getattr(sender, "app", None), "presence", None)
    if isinstance(presence, NodePresence):
        presence.ready()


@signals.worker_shutdown.connect
def _announce_stopped(sender: Any = None, **_kwargs: Any) -> None:
    """Mark the node ``stopped`` (a clean stop: its tasks finished or went back to the queue)."""
    presence = getattr(getattr(sender, "app", None), "presence", None)
    if isinstance(presence, NodePresence):
        presence.stopped()


@signals.worker_init.connect
def _warm_up(sender: Any = None, **_kwargs: Any) -> None:
    """Register the node in the index, then run a small synthetic job before the pool forks.

    The warm-up spares the first study the first-use costs; the node shows as
    ``starting`` in ``pacs-ai status`` meanwhile.
    """
    app = getattr(sender, "app", None)
    if isinstance(app, PacsAiCelery):
        presence = NodePresence(app.settings, str(sender.hostname))
        presence.register(sorted(app.amqp.queues.consume_from), int(sender.concurrency or 1))
        app.presence = presence
        warm_up()
        _freeze_what_is_loaded()


@signals.task_postrun.connect
def _record_models_loaded(sender: Any = None, **_kwargs: Any) -> None:
    """After each task, record in the index which models this pool process keeps loaded (when changed)."""
    app = getattr(sender, "app", None)
    hostname = getattr(getattr(sender, "request", None), "hostname", None)
    if isinstance(app, PacsAiCelery) and hostname:
        _PROCESS_MODELS.record(app.sessions, str(hostname), loaded_model_names())


@signals.worker_process_init.connect
def _warm_up_pool_process(**_kwargs: Any) -> None:
    """Run the synthetic job once more in each pool process, before it takes its first task.

    The parent's warm-up leaves imports and tables for its forked children to
    share, but a child copies each inherited page the first time it writes to
    it (reference counts, caches, the allocator's arenas).  Without this, the
    first study in each child paid for those copies: its load stage took
    0.57-0.67 s instead of 0.37-0.48 s (300-slice CT).  A second warm-up costs
    about 0.35 s per child at start.  The child also opens its index connection
    (:meth:`PacsAiCelery.open_index`) and maps the memory its studies' volumes
    will use (``volume_memory_reserve_mb``, :mod:`pacs_ai.analyze.volume_memory`).
    """
    app = current_app._get_current_object()
    if isinstance(app, PacsAiCelery):
        warm_up()
        app.open_index()
        connect_early(app.settings)  # the storage's client (remote stores), not built by the first job
        process_volume_memory().reserve(app.settings.volume_memory_reserve_mb * 2**20)
        VoxelLimit.set(app.settings.maximum_volume_voxels)
        _freeze_what_is_loaded()


def _freeze_what_is_loaded() -> None:
    """Keep the garbage collector's full passes off the objects the warm-up left (modules, tables).

    A worker holds millions of long-lived objects (torch, MONAI, numpy,
    pydicom), and every full collection walked them all; in a forked pool
    process each walk also copied the parent's pages it touched (what that
    cost a job's fetch of a series, measured:
    :func:`pacs_ai.storage.cache._collection_paused`).  :func:`gc.freeze`
    moves what exists now into a generation the collector never scans
    (CPython's advice for pre-fork servers); garbage is collected first, and
    what jobs allocate later is collected as before.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings) -> PacsAiCelery:
    """The worker's application: :class:`PacsAiCelery` with the tasks of :mod:`workers.tasks` registered."""
    app = PacsAiCelery(settings)
    app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
    return app
