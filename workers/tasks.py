"""Celery tasks: thin wrappers that call pacs-ai functions and decide on retries."""

from __future__ import annotations

import logging
from typing import Any

import requests
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from pacs_ai.analyze.run import JobNotRunnable, run_job
from pacs_ai.dispatch.delivery import attempt_delivery
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Job, JobState, utcnow

log = logging.getLogger(__name__)

ANALYZE_TASK = "pacs_ai.analyze_series"
DELIVER_TASK = "pacs_ai.deliver_result"
NOTIFY_TASK = "pacs_ai.notify"

#: Retries of an analysis that failed with an internal error (not bad input).
ANALYZE_MAX_RETRIES = 3

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


@shared_task(
    name=ANALYZE_TASK,
    bind=True,
    acks_late=True,
    max_retries=ANALYZE_MAX_RETRIES,
    **analysis_time_limits(DEFAULT_SOFT_TIME_LIMIT),
)
def analyze_series(self: Task, job_id: int) -> None:
    """Run one analysis job, then queue the deliveries of its results.

    The time limit comes with the message (``analysis_time_limits`` of the
    profile step's ``timeout_seconds`` or the installation default).
    """
    app = self.app
    try:
        deliveries = run_job(app.settings, app.sessions, job_id, worker=self.request.hostname or "")
    except JobNotRunnable as exc:
        log.info("analysis message for job %d ignored: %s", job_id, exc)
        return
    except SoftTimeLimitExceeded:
        _give_up(app, job_id, f"error: analysis exceeded its time limit of {_soft_limit(self):g} s")
        return
    except Exception as exc:
        if self.request.retries >= ANALYZE_MAX_RETRIES:
            _give_up(
                app, job_id, f"error: {type(exc).__name__}: {exc} (after {self.request.retries} retries)"
            )
            return
        raise self.retry(exc=exc, countdown=5 * 2**self.request.retries) from exc
    for delivery_id in deliveries:
        app.send_task(DELIVER_TASK, args=[delivery_id], queue="dispatch")


def _soft_limit(task: Task) -> float:
    """The soft limit of this run: the message's (``request.timelimit`` is (hard, soft)) or the task's."""
    limits = task.request.timelimit or (None, None)
    soft = limits[1] if len(limits) > 1 else None
    return float(soft if soft is not None else task.soft_time_limit or DEFAULT_SOFT_TIME_LIMIT)


def _give_up(app, job_id: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    with session_scope(app.sessions) as session:
        job = session.get(Job, job_id)
        if job is not None and job.state not in (JobState.SUCCEEDED, JobState.CANCELLED):
            job.state = JobState.FAILED
            job.error = reason
            job.finished_at = utcnow()
    log.error("job %d failed for good: %s", job_id, reason)


@shared_task(name=DELIVER_TASK, bind=True, acks_late=True)
def deliver_result(self: Task, delivery_id: int) -> None:
    """Send one result to one destination once.

    A failed attempt records when to try again; the scheduler re-enqueues due
    deliveries from the index, so waiting retries never sit in the broker
    (where a long countdown would collide with the visibility timeout).
    """
    attempt_delivery(self.app.settings, self.app.sessions, delivery_id)


#: Attempts of a webhook call before it is given up (and audited as failed).
NOTIFY_MAX_RETRIES = 5


@shared_task(name=NOTIFY_TASK, bind=True, acks_late=True, max_retries=NOTIFY_MAX_RETRIES)
def notify(self: Task, url: str, payload: dict[str, Any]) -> None:
    """POST a routing decision (identifiers only) to a webhook; retried with backoff, outcome audited."""
    try:
        response = requests.post(url, json=payload, timeout=10)
        response.raise_for_status()
    except requests.RequestException as exc:
        if self.request.retries < NOTIFY_MAX_RETRIES:
            raise self.retry(exc=exc, countdown=2 * 2**self.request.retries) from exc
        outcome, detail = "notify.failed", {"url": url, "error": str(exc)}
    else:
        outcome, detail = "notify.sent", {"url": url, "status": response.status_code}
    with session_scope(self.app.sessions) as session:
        record_audit(
            session,
            actor="dispatcher",
            action=outcome,
            object_type="series",
            object_uid=payload.get("series_instance_uid"),
            detail={**detail, "rule": payload.get("rule")},
        )
