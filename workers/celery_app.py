"""The Celery application without its tasks: what sending work and asking the broker need.

:class:`PacsAiCelery` carries the settings and Celery's configuration; the
task names and the analysis time limits are here too.  ``app.send_task(name,
...)`` needs only the name, so the processes that hand work to the workers
(the scheduler of ``pacs-ai serve``, ``pacs-ai retry``, the admin console) and
those that read queue lengths or ping workers (``pacs-ai status``, ``pacs-ai
workers``) use :func:`create_client` and import no task body: the task bodies
(:mod:`workers.tasks`) load the analyzers, the model engine and torch, which
only a worker process runs (:func:`workers.factory.create_app`).

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

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import Job
from workers.heartbeat import NodePresence

log = logging.getLogger(__name__)

#: How long a new pool process may take to warm up before Celery counts it as failed to start.
WARM_UP_TIMEOUT_SECONDS = 60.0

#: In the order a worker serves them (see the module docstring).
QUEUES = ("dispatch", "cpu", "gpu")

ANALYZE_TASK = "pacs_ai.analyze_series"
DELIVER_TASK = "pacs_ai.deliver_result"
DELIVER_MANY_TASK = "pacs_ai.deliver_results"
NOTIFY_TASK = "pacs_ai.notify"
DRAFT_TASK = "pacs_ai.draft_report"
DRAFT_IF_DUE_TASK = "pacs_ai.draft_report_if_due"
PREFETCH_TASK = "pacs_ai.prefetch_instances"

#: Message priority of a prefetch hint: the lowest step, so a worker takes one only when it has no
#: analysis, delivery or draft waiting (0 is served first; see ``priority_steps``).
PREFETCH_PRIORITY = 9
#: A hint not taken within this many seconds is dropped by the worker that gets it: its series was
#: analysed by then, or its worker was busy and will fetch for the job.
PREFETCH_EXPIRES_SECONDS = 120.0

#: Time limit of an analysis message that carries none (sent by an older scheduler).
DEFAULT_SOFT_TIME_LIMIT = 1800.0
#: The hard limit (the pool kills the process) follows the soft one by this much, so the task
#: has time to record why it stopped.
HARD_TIME_LIMIT_GRACE_SECONDS = 60.0


def analysis_time_limits(soft_seconds: float) -> dict[str, float]:
    """Celery options limiting one analysis to ``soft_seconds``: ``soft_time_limit`` and ``time_limit``.

    At the soft limit the task gets :class:`SoftTimeLimitExceeded` and fails
    the job with the limit in the reason; the hard limit is the backstop for
    code that does not return to Python in time (a long native call).
    """
    return {"soft_time_limit": soft_seconds, "time_limit": soft_seconds + HARD_TIME_LIMIT_GRACE_SECONDS}


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


def create_client(settings: Settings) -> PacsAiCelery:
    """The application that sends tasks by name, reads queue lengths and asks workers; it has no tasks."""
    return PacsAiCelery(settings)
