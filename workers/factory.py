"""The Celery application.

Queues, one per kind of work:

* ``cpu``: analyses with built-in analyzers (prefetch 1: each is heavy);
* ``gpu``: model inference; served by GPU workers, or by CPU workers where no GPU exists;
* ``dispatch``: sending results to destinations (light, network-bound).

A worker takes the next message from its queues in the order of
:data:`QUEUES` (``queue_order_strategy`` "priority"; within that, message
priority first): ``dispatch`` comes first, so results already computed go out
before the worker starts the next analysis or report draft; otherwise a
study's SEG and SR would wait behind every analysis queued after it.

Tasks are acknowledged late (after they finish) and rejected back to the queue
when their worker process dies, so a killed worker's task is run by another.
The broker is only a delivery mechanism: the index holds the state, and the
scheduler re-enqueues from it what the broker lost.
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any

from celery import Celery, current_app, signals
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from pacs_ai.analyze.volume import VoxelLimit
from pacs_ai.analyze.volume_memory import process_volume_memory
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import Job
from pacs_ai.jobs.warmup import warm_up
from pacs_ai.logging_setup import quiet_noisy_libraries
from pacs_ai.models.engine import loaded_model_names
from pacs_ai.storage.registry import connect_early
from workers.heartbeat import NodePresence, ProcessModels

log = logging.getLogger(__name__)

#: How long a new pool process may take to warm up before Celery counts it as failed to start.
WARM_UP_TIMEOUT_SECONDS = 60.0

#: This pool process's record of the models it keeps loaded (see :func:`_record_models_loaded`).
_PROCESS_MODELS = ProcessModels()

#: In the order a worker serves them (see the module docstring).
QUEUES = ("dispatch", "cpu", "gpu")


class PacsAiCelery(Celery):
    """Celery carrying the pacs-ai settings and a lazily built index session factory."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("pacs_ai", broker=settings.effective_broker_url)
        self.settings = settings
        #: This node's row in the index (set in the worker's main process when it initialises).
        self.presence: NodePresence | None = None
        self.conf.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            task_ignore_result=True,
            task_serializer="json",
            accept_content=["json"],
            worker_prefetch_multiplier=1,
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
            broker_transport_options={
                "visibility_timeout": settings.broker_visibility_timeout_seconds,
                # STAT analyses overtake routine ones (message priority 0 is served first on Redis).
                "queue_order_strategy": "priority",
                "priority_steps": [0, 3, 6, 9],
            },
            task_default_queue="cpu",
            task_create_missing_queues=True,
            worker_send_task_events=False,
            # A pool process reports for work only after its warm-up (_warm_up_pool_process);
            # Celery's default of 4 s would kill a process still warming up on a busy machine.
            worker_proc_alive_timeout=WARM_UP_TIMEOUT_SECONDS,
        )

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        # Built on first use, inside the worker child process (never across a fork).
        return make_session_factory(make_engine(self.settings.effective_database_url))

    def open_index(self) -> None:
        """Connect to the index and set up the ORM now, not in this process's first task.

        The first query of a process configures SQLAlchemy's mappers and opens
        the connection: about 45 ms that a study's turnaround would otherwise
        carry.  Best effort: an index that cannot be reached now is reported by
        the first task that needs it.
        """
        try:
            configure_mappers()
            with session_scope(self.sessions) as session:
                session.scalar(select(Job.id).limit(1))
        except SQLAlchemyError as exc:
            log.warning("the index could not be opened before the first task: %s", exc)


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


def create_app(settings: Settings) -> PacsAiCelery:
    app = PacsAiCelery(settings)
    app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
    return app
