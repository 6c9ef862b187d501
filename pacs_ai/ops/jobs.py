"""Retry, cancel and reprocess: what ``pacs-ai retry|cancel|reprocess`` and the admin console's buttons do.

They change the index (the source of truth), audited with the acting user,
and the caller commits and then hands the work to the broker with
:func:`enqueue`.  Where the broker cannot be reached nothing is lost:
``pacs-ai serve`` re-enqueues queued jobs and pending deliveries from the index
when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import OperationalError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import Delivery, DeliveryState, Job, JobState, Result, Study, utcnow
from pacs_ai.report.pipeline import ReportPipeline
from pacs_ai.route.assembly import JobTicket
from pacs_ai.route.profiles import AnalyzerStep, ProfileError, load_profiles
from pacs_ai.route.reprocess import find_indexed_studies, reopen_series
from pacs_ai.storage.files import HostFiles
from workers.celery_app import create_client
from workers.task_queue import CeleryTaskQueue

__all__ = [
    "CancelOutcome",
    "ReprocessOutcome",
    "RetryOutcome",
    "cancel_jobs",
    "enqueue",
    "reprocess_from_index",
    "retry_jobs",
    "studies_due_for_draft",
]

#: Seconds to wait for the broker before leaving the work queued in the index.
BROKER_TIMEOUT_SECONDS = 3


def enqueue(
    settings: Settings, jobs: Sequence[JobTicket], deliveries: Sequence[int], drafts: Sequence[int] = ()
) -> bool:
    """Hand work to the broker now; False (work stays queued in the index) when it cannot be reached.

    ``drafts`` are ids of studies whose AI report is now due.
    """
    if not jobs and not deliveries and not drafts:
        return True
    app = create_client(settings)
    app.conf.broker_connection_timeout = BROKER_TIMEOUT_SECONDS
    app.conf.broker_connection_max_retries = 0
    queue = CeleryTaskQueue(app)
    try:
        for ticket in jobs:
            queue.enqueue_analysis(ticket)
        for delivery_id in deliveries:
            queue.enqueue_delivery(delivery_id)
        for study_id in drafts:
            queue.enqueue_draft(study_id)
    except (OperationalError, OSError):
        return False
    return True


@dataclass
class RetryOutcome:
    """What :func:`retry_jobs` did: one row per job or delivery (``job``, ``what``), and what to enqueue."""

    retried: list[dict[str, Any]] = field(default_factory=list)
    #: Job ids asked for that the index does not have.
    unknown_jobs: list[int] = field(default_factory=list)
    jobs: list[JobTicket] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)


def _jobs_to_retry(session: Session, job_ids: Sequence[int] | None) -> list[Job]:
    """The given jobs, or every job that failed or has a failed delivery."""
    query = select(Job)
    if job_ids:
        query = query.where(Job.id.in_(list(job_ids)))
    else:
        with_failed_delivery = (
            select(Result.job_fk)
            .join(Delivery, Delivery.result_fk == Result.id)
            .where(Delivery.state == DeliveryState.FAILED)
        )
        query = query.where((Job.state == JobState.FAILED) | Job.id.in_(with_failed_delivery))
    return list(session.scalars(query.order_by(Job.id)))


def _failed_deliveries_of(session: Session, job: Job) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery)
            .join(Result, Result.id == Delivery.result_fk)
            .where(Result.job_fk == job.id, Delivery.state == DeliveryState.FAILED)
        )
    )


def _current_step(settings: Settings, job: Job) -> tuple[AnalyzerStep | None, str]:
    """The job's analyzer step in its profile as the profile is now, or None and why not."""
    try:
        profiles = {profile.name: profile for profile in load_profiles(settings.profiles_dir)}
    except ProfileError as exc:
        return None, f"the profiles cannot be read ({str(exc).splitlines()[0]})"
    profile = profiles.get(job.profile)
    if profile is None:
        return None, f"profile {job.profile!r} no longer exists"
    step = next((s for s in profile.analyzers if s.name == job.analyzer), None)
    if step is None:
        return None, f"profile {job.profile!r} no longer runs analyzer {job.analyzer!r}"
    return step, ""


def _take_current_profile(settings: Settings, job: Job) -> str:
    """Give a failed job its profile's current parameters and priority rules; says what it runs with."""
    step, why_not = _current_step(settings, job)
    if step is None:
        return f"with its original parameters: {why_not}"
    rules = [rule.model_dump(by_alias=True, mode="json") for rule in step.priority]
    changed = (job.params or {}) != step.params or (job.priority_rules or []) != rules
    job.params = dict(step.params)
    job.priority_rules = rules
    return f"with profile {job.profile} as it is now ({'changed' if changed else 'unchanged'} parameters)"


def retry_jobs(
    session: Session,
    settings: Settings,
    job_ids: Sequence[int] | None,
    *,
    actor: str,
    keep_params: bool = False,
) -> RetryOutcome:
    """Queue failed jobs again and reset their failed deliveries (results are never duplicated); audited.

    ``job_ids`` None or empty means every failed job and every job with a
    failed delivery.  A failed job runs with its profile's current analyzer
    parameters (a fixed profile takes effect) unless ``keep_params``.  The
    caller commits, then passes ``jobs`` and ``deliveries`` to :func:`enqueue`.
    """
    outcome = RetryOutcome()
    candidates = _jobs_to_retry(session, job_ids)
    for job in candidates:
        failed_deliveries = _failed_deliveries_of(session, job)
        if job.state == JobState.FAILED:
            how = "with its original parameters (--keep-params)"
            if not keep_params:
                how = _take_current_profile(settings, job)
            job.state = JobState.QUEUED
            job.error = None
            job.finished_at = None
            outcome.jobs.append(JobTicket.of(job))
            outcome.retried.append({"job": job.id, "what": f"analysis {how}"})
            record_audit(
                session,
                actor=actor,
                action="job.retried",
                object_type="job",
                object_uid=str(job.id),
                detail={"parameters": how},
            )
        for delivery in failed_deliveries:
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = utcnow()
            outcome.deliveries.append(delivery.id)
            outcome.retried.append({"job": job.id, "what": f"delivery to {delivery.destination}"})
            record_audit(
                session,
                actor=actor,
                action="delivery.retried",
                object_type="delivery",
                object_uid=str(delivery.id),
                detail={"job": job.id, "destination": delivery.destination},
            )
        if job_ids and job.state != JobState.QUEUED and not failed_deliveries:
            outcome.retried.append({"job": job.id, "what": f"nothing to retry (job {job.state.value})"})
    outcome.unknown_jobs = sorted(set(job_ids or []) - {job.id for job in candidates})
    return outcome


@dataclass(frozen=True)
class CancelOutcome:
    """One job :func:`cancel_jobs` was asked to cancel: cancelled, or the reason why not."""

    job: int
    cancelled: bool
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "cancelled": self.cancelled, "reason": self.reason}


def cancel_jobs(session: Session, job_ids: Sequence[int], *, actor: str) -> list[CancelOutcome]:
    """Cancel jobs that have not finished (audited); a running one stops being retried, its results unsent.

    The caller commits, then enqueues the drafts :func:`studies_due_for_draft`
    names: a cancelled job may have been the last one its study's report waited for.
    """
    outcome: list[CancelOutcome] = []
    for job_id in job_ids:
        job = session.get(Job, job_id)
        if job is None:
            outcome.append(CancelOutcome(job_id, False, "no such job"))
        elif job.state not in (JobState.QUEUED, JobState.RUNNING, JobState.HELD):
            outcome.append(CancelOutcome(job_id, False, f"job is {job.state.value}"))
        else:
            job.state = JobState.CANCELLED
            job.finished_at = utcnow()
            record_audit(
                session, actor=actor, action="job.cancelled", object_type="job", object_uid=str(job_id)
            )
            outcome.append(CancelOutcome(job_id, True))
    return outcome


def studies_due_for_draft(
    settings: Settings, sessions: sessionmaker[Session], job_ids: Sequence[int]
) -> list[int]:
    """Ids of the studies of these jobs whose AI report draft is now due (no job of theirs unfinished)."""
    pipeline = ReportPipeline(settings, sessions)
    return sorted({study for job_id in job_ids if (study := pipeline.study_to_draft(job_id)) is not None})


@dataclass
class ReprocessOutcome:
    """What :func:`reprocess_from_index` did: the series reopened and those it could not reopen, with why."""

    study_instance_uid: str
    reopened: list[str] = field(default_factory=list)
    instances: int = 0
    problems: list[str] = field(default_factory=list)


def reprocess_from_index(
    session: Session, files: HostFiles, study: Study, *, actor: str, detail: dict[str, Any] | None = None
) -> ReprocessOutcome:
    """Reopen every series of ``study`` whose files are all here, as ``pacs-ai reprocess`` does; audited.

    The running service's router then decides the series again by today's
    rules and opens new job versions (:mod:`pacs_ai.route.reprocess`).  A
    series with instance files gone (retention) needs them retrieved from the
    PACS first, which only ``pacs-ai reprocess`` does (a C-MOVE can take longer
    than a web request): it is named in ``problems`` and left alone.
    """
    outcome = ReprocessOutcome(study.study_instance_uid)
    found = find_indexed_studies(session, study_uids=[study.study_instance_uid], files=files)
    series = found[0].series if found else []
    ready = []
    for entry in series:
        if entry.missing_files:
            outcome.problems.append(
                f"series {entry.series_instance_uid}: {entry.missing_files} instance file(s) are gone; "
                f"run `pacs-ai reprocess {study.study_instance_uid}` to retrieve them from the PACS"
            )
        else:
            ready.append(entry)
    if not series:
        outcome.problems.append("the index has no series of this study")
    if not ready:
        return outcome
    outcome.instances = reopen_series(
        session, study.study_instance_uid, [s.series_id for s in ready], actor=actor, detail=detail or {}
    )
    outcome.reopened = [s.series_instance_uid for s in ready]
    return outcome
