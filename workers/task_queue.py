"""Handing work to the Celery workers: the :class:`~pacs_ai.route.scheduler.TaskQueue` backed by Celery.

The scheduler of ``pacs-ai serve`` uses it, and so do the administrator
operations (:mod:`pacs_ai.ops.jobs`: ``pacs-ai retry`` and the admin console's
retry button) to send work at once instead of waiting for the next start.  It sends tasks
by name (:mod:`workers.celery_app`) and imports no task body.
"""

from __future__ import annotations

from pacs_ai.route.assembly import JobTicket, Notification
from pacs_ai.route.plan import CELERY_PRIORITY
from pacs_ai.route.prefetch import PrefetchHint
from workers.celery_app import (
    ANALYZE_TASK,
    DELIVER_TASK,
    DRAFT_TASK,
    NOTIFY_TASK,
    PREFETCH_EXPIRES_SECONDS,
    PREFETCH_PRIORITY,
    PREFETCH_TASK,
    PacsAiCelery,
    analysis_time_limits,
)

__all__ = ["CeleryTaskQueue"]


class CeleryTaskQueue:
    """The scheduler's :class:`~pacs_ai.route.scheduler.TaskQueue` backed by Celery."""

    def __init__(self, app: PacsAiCelery) -> None:
        self.app = app

    def enqueue_analysis(self, ticket: JobTicket) -> None:
        """Send the job to its queue with its time limit (the step's, else the setting's) and priority."""
        limit = ticket.timeout_seconds
        if limit is None:
            limit = self.app.settings.analysis_timeout_seconds
        self.app.send_task(
            ANALYZE_TASK,
            args=[ticket.job_id],
            queue=ticket.queue,
            priority=CELERY_PRIORITY.get(ticket.routing_priority, CELERY_PRIORITY["routine"]),
            **analysis_time_limits(limit),
        )

    def enqueue_delivery(self, delivery_id: int) -> None:
        self.app.send_task(DELIVER_TASK, args=[delivery_id], queue="dispatch")

    def enqueue_notification(self, notification: Notification) -> None:
        self.app.send_task(NOTIFY_TASK, args=[notification.url, notification.payload], queue="dispatch")

    def enqueue_draft(self, study_id: int) -> None:
        """Draft the study's AI report (the task checks again that it is due; duplicates are harmless)."""
        self.app.send_task(DRAFT_TASK, args=[study_id], queue="cpu")

    def enqueue_prefetch(self, hint: PrefetchHint) -> None:
        """A hint to fetch instances into a worker's cache: ids only, lowest priority, expiring."""
        self.app.send_task(
            PREFETCH_TASK,
            args=[hint.instance_ids],
            queue=hint.queue,
            priority=PREFETCH_PRIORITY,
            expires=PREFETCH_EXPIRES_SECONDS,
        )
