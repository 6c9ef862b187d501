"""Celery tasks: thin wrappers that call pacs-ai functions and decide on retries."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from celery import Celery, Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from pacs_ai.dispatch.delivery import attempt_delivery
from pacs_ai.dispatch.webhook import post_webhook, webhook_key
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Job, JobState, Study, utcnow
from pacs_ai.jobs.prefetch import prefetch_instances
from pacs_ai.jobs.run import JobNotRunnable, run_job
from pacs_ai.redact import redact_text, redact_url
from pacs_ai.report.pipeline import ReportPipeline
from pacs_ai.storage.base import StorageError
from workers.celery_app import (
    ANALYZE_TASK,
    DEFAULT_SOFT_TIME_LIMIT,
    DELIVER_MANY_TASK,
    DELIVER_TASK,
    DRAFT_IF_DUE_TASK,
    DRAFT_TASK,
    HARD_TIME_LIMIT_GRACE_SECONDS,
    NOTIFY_TASK,
    PREFETCH_TASK,
    analysis_time_limits,
)

log = logging.getLogger(__name__)

#: Retries of an analysis that failed with an internal error (not bad input).
ANALYZE_MAX_RETRIES = 3
#: Retries of an analysis whose series or results the storage could not read or take (unreachable,
#: slow): the store's outage, not the job, is the problem, so it is waited out for longer.
STORAGE_MAX_RETRIES = 10
#: The longest wait between two of those retries; well below the broker's visibility timeout.
STORAGE_RETRY_MAX_SECONDS = 300


def storage_retry_countdown(retries: int) -> float:
    """Seconds before retry ``retries + 1`` of a job the storage failed: 5, 10, 20 ... at most 300."""
    return float(min(STORAGE_RETRY_MAX_SECONDS, 5 * 2**retries))


@shared_task(
    name=ANALYZE_TASK,
    bind=True,
    acks_late=True,
    max_retries=ANALYZE_MAX_RETRIES,
    **analysis_time_limits(DEFAULT_SOFT_TIME_LIMIT),
)
def analyze_series(self: Task, job_id: int) -> None:
    """Run one analysis job, then queue the deliveries of its results and the draft decision.

    The time limit comes with the message (``analysis_time_limits`` of the
    profile step's ``timeout_seconds`` or the installation default).  The
    deliveries go out in one message, sent at the same time
    (:func:`deliver_results`); whether the study's report is now due is decided
    by a task of its own (:func:`draft_report_if_due`), on the ``cpu`` queue,
    which a worker takes after the ``dispatch`` queue: the results are not held
    back by that decision.
    """
    app = self.app
    try:
        deliveries = run_job(app.settings, app.sessions, job_id, worker=self.request.hostname or "")
    except JobNotRunnable as exc:
        log.info("analysis message for job %d ignored: %s", job_id, exc)
        _queue_draft_decision(app, job_id)
        return
    except SoftTimeLimitExceeded:
        _give_up(app, job_id, f"error: analysis exceeded its time limit of {_soft_limit(self):g} s")
        _queue_draft_decision(app, job_id)
        return
    except StorageError as exc:
        retries = self.request.retries
        if retries >= STORAGE_MAX_RETRIES:
            _give_up(app, job_id, f"storage: {exc} (after {retries} retries)")
            _queue_draft_decision(app, job_id)
            return
        countdown = storage_retry_countdown(retries)
        _wait_for_storage(
            app, job_id, f"storage: {exc} (retry {retries + 1} of {STORAGE_MAX_RETRIES} in {countdown:g} s)"
        )
        raise self.retry(exc=exc, countdown=countdown, max_retries=STORAGE_MAX_RETRIES) from exc
    except Exception as exc:
        if self.request.retries >= ANALYZE_MAX_RETRIES:
            _give_up(
                app, job_id, f"error: {type(exc).__name__}: {exc} (after {self.request.retries} retries)"
            )
            _queue_draft_decision(app, job_id)
            return
        raise self.retry(exc=exc, countdown=5 * 2**self.request.retries) from exc
    if deliveries:
        app.send_task(DELIVER_MANY_TASK, args=[deliveries], queue="dispatch")
    _queue_draft_decision(app, job_id)


def _soft_limit(task: Task) -> float:
    """The soft limit of this run: the message's (``request.timelimit`` is (hard, soft)) or the task's."""
    limits = task.request.timelimit or (None, None)
    soft = limits[1] if len(limits) > 1 else None
    return float(soft if soft is not None else task.soft_time_limit or DEFAULT_SOFT_TIME_LIMIT)


def _wait_for_storage(app, job_id: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    """Put a job the storage failed back to QUEUED with the reason, as ``pacs-ai jobs list`` shows it."""
    with session_scope(app.sessions) as session:
        job = session.get(Job, job_id)
        if job is not None and job.state == JobState.RUNNING:
            job.state = JobState.QUEUED
            job.claimed_by = None
            job.error = reason
    log.warning("job %d waits for the storage: %s", job_id, reason)


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


#: Deliveries of one message sent at the same time, each on a thread (and association) of its own.
DELIVERIES_AT_ONCE = 4


@shared_task(name=DELIVER_MANY_TASK, bind=True, acks_late=True)
def deliver_results(self: Task, delivery_ids: list[int]) -> None:
    """Send several deliveries (a job's results) once each, at the same time.

    Each is attempted and recorded exactly as :func:`deliver_result` does it,
    independently of the others: one refused by its destination leaves the rest
    sent.  Sending them together rather than one after another lets the PACS
    store the SR while it is still receiving the SEG (loopback Orthanc: SEG then
    SR 0.26-0.40 s, both at once 0.21-0.26 s).
    """
    settings, sessions = self.app.settings, self.app.sessions
    workers = max(1, min(DELIVERIES_AT_ONCE, len(delivery_ids)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delivery") as senders:
        attempts = [senders.submit(attempt_delivery, settings, sessions, i) for i in delivery_ids]
    for attempt in attempts:
        attempt.result()  # an error that is not the destination's (the index, say) fails the task


#: Attempts of a webhook call before it is given up (and audited as failed).
NOTIFY_MAX_RETRIES = 5


class WebhookFailed(Exception):
    """A webhook call failed and is retried; the message names the URL without its query values."""


@shared_task(name=NOTIFY_TASK, bind=True, acks_late=True, max_retries=NOTIFY_MAX_RETRIES)
def notify(self: Task, url: str, payload: dict[str, Any]) -> None:
    """POST a routing decision (identifiers only) to a webhook, signed; retried with backoff, outcome audited.

    The signature is :mod:`pacs_ai.dispatch.webhook`'s; the audit record and
    the log show the URL without its query values (a token there stays secret).
    """
    detail: dict[str, Any]
    try:
        response = post_webhook(url, payload, webhook_key(self.app.settings))
    except requests.RequestException as exc:
        if self.request.retries < NOTIFY_MAX_RETRIES:
            # Celery logs the retry's exception: the URL in its text goes without its query values.
            failure = WebhookFailed(f"webhook {redact_url(url)} failed: {redact_text(str(exc))}")
            raise self.retry(exc=failure, countdown=2 * 2**self.request.retries) from None
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


# --- report drafts ----------------------------------------------------------------------------------

#: Retries of a draft that failed on the database (a concurrent draft of the same study, a lost connection).
DRAFT_MAX_RETRIES = 3
#: Time limit of one draft: a language model on a CPU may need minutes; the template needs milliseconds.
DRAFT_SOFT_TIME_LIMIT = 900.0


def report_pipeline(app: Celery) -> ReportPipeline:
    """The worker process's :class:`ReportPipeline`: one per process, so drafters load their model once."""
    pipeline: ReportPipeline | None = getattr(app, "report_pipeline", None)
    if pipeline is None:
        pipeline = ReportPipeline(app.settings, app.sessions)  # type: ignore[attr-defined]
        app.report_pipeline = pipeline  # type: ignore[attr-defined]
    return pipeline


def _queue_draft_decision(app: Celery, job_id: int) -> None:
    """Queue :func:`draft_report_if_due` for the job; never raises (the analysis is recorded already)."""
    try:
        app.send_task(DRAFT_IF_DUE_TASK, args=[job_id], queue="cpu")
    except Exception:
        log.exception("could not queue the report draft decision of job %d", job_id)


#: A prefetch that takes longer than this is stopped: the job fetches what is left.
PREFETCH_SOFT_TIME_LIMIT = 300.0


@shared_task(
    name=PREFETCH_TASK,
    bind=True,
    # A hint lost with its worker is not worth running again: the job fetches for itself.
    acks_late=False,
    soft_time_limit=PREFETCH_SOFT_TIME_LIMIT,
    time_limit=PREFETCH_SOFT_TIME_LIMIT + HARD_TIME_LIMIT_GRACE_SECONDS,
)
def prefetch(self: Task, instance_ids: list[int]) -> None:
    """Fetch instances the receiver just put into the store into this host's cache (a prefetch hint,
    :mod:`pacs_ai.route.prefetch`).  Never raises: a failed prefetch leaves the fetch to the job."""
    try:
        fetched = prefetch_instances(self.app.settings, self.app.sessions, instance_ids)
    except (StorageError, SoftTimeLimitExceeded, DBAPIError, OSError) as exc:
        log.warning(
            "prefetch of %d instance(s) stopped (the job will fetch them): %s", len(instance_ids), exc
        )
        return
    log.info("prefetched %d of %d hinted instance(s)", fetched, len(instance_ids))


@shared_task(name=DRAFT_IF_DUE_TASK, bind=True, acks_late=True)
def draft_report_if_due(self: Task, job_id: int) -> None:
    """Queue the draft of the job's study when this job was the study's last unfinished one.

    Never raises: a duplicate draft message is harmless (the draft task is
    idempotent), and start-up recovery (``Scheduler.recover``) queues drafts that are due
    and were never queued.
    """
    app = self.app
    try:
        study_id = report_pipeline(app).study_to_draft(job_id)
        if study_id is not None:
            app.send_task(DRAFT_TASK, args=[study_id], queue="cpu")
            log.info("report draft of study %d queued (job %d was its last analysis)", study_id, job_id)
    except Exception:
        log.exception("could not decide whether to draft the report of job %d's study", job_id)


@shared_task(
    name=DRAFT_TASK,
    bind=True,
    acks_late=True,
    max_retries=DRAFT_MAX_RETRIES,
    soft_time_limit=DRAFT_SOFT_TIME_LIMIT,
    time_limit=DRAFT_SOFT_TIME_LIMIT + HARD_TIME_LIMIT_GRACE_SECONDS,
)
def draft_study_report(self: Task, study_id: int) -> None:
    """Draft, record and queue a study's AI report (:meth:`ReportPipeline.draft_study`); idempotent.

    A failure is logged and written to the audit table as ``report.draft_failed``
    (the worklist shows it); database errors are retried first.
    """
    app = self.app
    try:
        outcome = report_pipeline(app).draft_study(study_id)
    except DBAPIError as exc:
        if self.request.retries < DRAFT_MAX_RETRIES:
            raise self.retry(exc=exc, countdown=2 * 2**self.request.retries) from exc
        _draft_failed(app, study_id, f"database: {exc}")
        return
    except SoftTimeLimitExceeded:
        _draft_failed(app, study_id, f"drafting exceeded its time limit of {DRAFT_SOFT_TIME_LIMIT:g} s")
        return
    except Exception as exc:
        log.exception("report draft of study %d failed", study_id)
        _draft_failed(app, study_id, f"{type(exc).__name__}: {exc}")
        return
    if outcome.status != "drafted":
        log.info("report draft of study %d skipped: %s", study_id, outcome.detail)
        return
    log.info(
        "report draft %d (version %s) of study %s: %s",
        outcome.draft_id,
        outcome.version,
        outcome.study_uid,
        outcome.detail,
    )
    for delivery_id in outcome.delivery_ids:
        app.send_task(DELIVER_TASK, args=[delivery_id], queue="dispatch")


def _draft_failed(app: Celery, study_id: int, reason: str) -> None:
    log.error("report draft of study %d failed: %s", study_id, reason)
    try:
        with session_scope(app.sessions) as session:  # type: ignore[attr-defined]
            study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
            record_audit(
                session,
                actor="drafter",
                action="report.draft_failed",
                object_type="study",
                object_uid=study_uid,
                detail={"study": study_id, "reason": reason[:2000]},
            )
    except Exception:
        log.exception("the failure of study %d's draft could not be recorded", study_id)
