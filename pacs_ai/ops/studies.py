"""Studies as an administrator sees them: every series with the router's decision and why, and a timeline.

:func:`study_rows` lists studies with their series' routing decisions
(routed, unmatched with the reason, discarded, still receiving), job and
delivery states, filterable by decision, state and text; :func:`study_timeline`
puts one study's path through pacs-ai in order (received, routed, queued,
analysed, encoded, delivered, drafted, signed), with how long each step took,
from what the index holds.  Neither reads patient names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from pacs_ai.index.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    RoutingState,
    Series,
    Study,
)
from pacs_ai.index.reports import ReportDraft, ReportStatus, User

__all__ = ["STUDY_FILTERS", "TimelineStep", "describe_study", "study_rows", "study_timeline"]

#: What :func:`study_rows` can keep: studies with a series in that routing state, or a job or delivery failed.
STUDY_FILTERS = ("all", *(state.value for state in RoutingState), "failed")
#: Studies listed at most, newest first.
STUDY_LIST_LIMIT = 500


def study_rows(
    session: Session, *, show: str = "all", text: str | None = None, limit: int = STUDY_LIST_LIMIT
) -> list[dict[str, Any]]:
    """Studies newest first, each with its series' routing decisions and reasons, jobs and deliveries.

    ``show`` is one of :data:`STUDY_FILTERS`; ``text`` keeps studies whose UID
    or accession number contains it.  Failed: a job failed, or a delivery gave up.
    """
    if show not in STUDY_FILTERS:
        raise ValueError(f"show must be one of {', '.join(STUDY_FILTERS)}, not {show!r}")
    query = select(Study).order_by(Study.first_received_at.desc(), Study.id.desc())
    if text:
        pattern = f"%{text.strip()}%"
        query = query.where(or_(Study.study_instance_uid.like(pattern), Study.accession_number.like(pattern)))
    if show == "failed":
        failed_jobs = (
            select(Series.study_fk).join(Job, Job.series_fk == Series.id).where(Job.state == JobState.FAILED)
        )
        failed_deliveries = (
            select(Series.study_fk)
            .join(Job, Job.series_fk == Series.id)
            .join(Result, Result.job_fk == Job.id)
            .join(Delivery, Delivery.result_fk == Result.id)
            .where(Delivery.state == DeliveryState.FAILED)
        )
        query = query.where(or_(Study.id.in_(failed_jobs), Study.id.in_(failed_deliveries)))
    elif show != "all":
        query = query.where(Study.id.in_(select(Series.study_fk).where(Series.routing_state == show)))
    studies = list(session.scalars(query.limit(limit)))
    ids = [study.id for study in studies]
    series_by_study: dict[int, list[Series]] = {}
    for series in session.scalars(select(Series).where(Series.study_fk.in_(ids)).order_by(Series.id)):
        series_by_study.setdefault(series.study_fk, []).append(series)
    jobs: dict[int, Counter[str]] = {}
    errors: dict[int, list[str]] = {}
    for study_fk, job in session.execute(
        select(Series.study_fk, Job).join(Job, Job.series_fk == Series.id).where(Series.study_fk.in_(ids))
    ):
        jobs.setdefault(study_fk, Counter())[job.state.value] += 1
        if job.state == JobState.FAILED and job.error:
            errors.setdefault(study_fk, []).append(f"job {job.id} ({job.analyzer}): {job.error}")
    deliveries: dict[int, Counter[str]] = {}
    for study_fk, delivery in session.execute(
        select(Series.study_fk, Delivery)
        .join(Job, Job.series_fk == Series.id)
        .join(Result, Result.job_fk == Job.id)
        .join(Delivery, Delivery.result_fk == Result.id)
        .where(Series.study_fk.in_(ids))
    ):
        deliveries.setdefault(study_fk, Counter())[delivery.state.value] += 1
        if delivery.state == DeliveryState.FAILED:
            errors.setdefault(study_fk, []).append(
                f"delivery to {delivery.destination}: {delivery.last_error or 'failed'}"
            )
    return [
        {
            **_study_fields(study),
            "series": [
                {
                    "series_instance_uid": series.series_instance_uid,
                    "modality": series.modality,
                    "series_description": series.series_description,
                    "instances": series.instance_count,
                    "routing_state": series.routing_state.value,
                    "routing_detail": series.routing_detail,
                }
                for series in series_by_study.get(study.id, [])
            ],
            "jobs": dict(sorted(jobs.get(study.id, Counter()).items())),
            "deliveries": dict(sorted(deliveries.get(study.id, Counter()).items())),
            "failures": errors.get(study.id, []),
        }
        for study in studies
    ]


@dataclass(frozen=True)
class TimelineStep:
    """One step of a study's path: when, which stage, what happened, and how long it took."""

    at: datetime
    #: received, routed, unmatched, discarded, queued, analysed, failed, encoded, delivered,
    #: delivery failed, drafted, draft failed, signed, rejected, cancelled, retried, reprocessed.
    stage: str
    what: str
    #: Seconds the step itself took (receiving, analysing, delivering), where the index says.
    took_seconds: float | None = None
    #: Whether the step went wrong (a failure), for the page to mark it.
    problem: bool = False

    def as_dict(self, since: datetime | None = None) -> dict[str, Any]:
        return {
            "at": self.at,
            "stage": self.stage,
            "what": self.what,
            "took_seconds": self.took_seconds,
            "after_seconds": (self.at - since).total_seconds() if since else None,
            "problem": self.problem,
        }


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def _stage_timings(timings: dict[str, Any] | None) -> str:
    """``load 1.2 s, analyze 3.4 s, encode 0.5 s`` from a job's recorded stage timings."""
    parts = [
        f"{name.removesuffix('_seconds')} {value:.1f} s"
        for name, value in (timings or {}).items()
        if name.endswith("_seconds") and isinstance(value, int | float)
    ]
    return ", ".join(parts)


_ROUTING_EVENTS = {"job.created", "series.unmatched", "series.discarded", "series.forwarded"}
_ADMIN_EVENTS = {
    "job.cancelled": "cancelled",
    "job.retried": "retried",
    "delivery.retried": "retried",
    "study.reprocess": "reprocessed",
    "report.draft_failed": "draft failed",
}


def study_timeline(session: Session, study: Study) -> list[TimelineStep]:
    """The study's steps in time order, from instance, job, result, delivery, draft and audit rows."""
    steps: list[TimelineStep] = []
    series_list = list(session.scalars(select(Series).where(Series.study_fk == study.id).order_by(Series.id)))
    series_uids = {series.id: series.series_instance_uid for series in series_list}
    for series in series_list:
        first, last, count = session.execute(
            select(
                func.min(Instance.received_at), func.max(Instance.received_at), func.count(Instance.id)
            ).where(Instance.series_fk == series.id)
        ).one()
        if first is not None:
            steps.append(
                TimelineStep(
                    first,
                    "received",
                    f"{count} instance(s) of {series.modality or '?'} series {series.series_instance_uid}"
                    + (f" from {series.calling_ae_title}" if series.calling_ae_title else ""),
                    _seconds(first, last),
                )
            )
    uids = [*series_uids.values(), study.study_instance_uid]
    events = list(
        session.scalars(
            select(AuditEvent).where(AuditEvent.object_uid.in_(uids)).order_by(AuditEvent.at, AuditEvent.id)
        )
    )
    for event in events:
        detail = event.detail or {}
        if event.action in _ROUTING_EVENTS:
            if event.action == "series.unmatched":
                stage, what = (
                    "unmatched",
                    f"series {event.object_uid}: {detail.get('reason') or 'no rule matched'}",
                )
            elif event.action == "series.discarded":
                stage = "discarded"
                what = f"series {event.object_uid}: rule {detail.get('rule')}: {detail.get('reason') or ''}"
            elif event.action == "series.forwarded":
                stage, what = "routed", f"series {event.object_uid}: originals forwarded"
            else:
                stage = "routed"
                what = (
                    f"series {event.object_uid}: profile {detail.get('profile')}, analyzer "
                    f"{detail.get('analyzer')} v{detail.get('version')}"
                    + (f" (rule {detail['rule']})" if detail.get("rule") else "")
                )
            steps.append(TimelineStep(event.at, stage, what, problem=stage == "unmatched"))
        elif event.action in _ADMIN_EVENTS:
            stage = _ADMIN_EVENTS[event.action]
            reason = detail.get("reason") or detail.get("parameters") or ""
            steps.append(
                TimelineStep(
                    event.at,
                    stage,
                    f"{event.action} by {event.actor}" + (f": {reason}" if reason else ""),
                    problem=stage == "draft failed",
                )
            )
    jobs = list(session.scalars(select(Job).where(Job.series_fk.in_(list(series_uids))).order_by(Job.id)))
    # A series whose decision left no audit event (older data, a job opened by hand): from its rows.
    decided = {e.object_uid for e in events if e.action in _ROUTING_EVENTS}
    for series in series_list:
        if series.series_instance_uid in decided:
            continue
        first_job = min((j.created_at for j in jobs if j.series_fk == series.id), default=None)
        if first_job is not None:
            steps.append(
                TimelineStep(first_job, "routed", f"series {series.series_instance_uid}: jobs opened")
            )
        elif series.routing_state != RoutingState.RECEIVING and series.last_received_at is not None:
            state = series.routing_state.value
            steps.append(
                TimelineStep(
                    series.last_received_at,
                    state,
                    f"series {series.series_instance_uid}: {series.routing_detail or state}",
                    problem=series.routing_state == RoutingState.UNMATCHED,
                )
            )
    for job in jobs:
        name = f"job {job.id} ({job.profile}/{job.analyzer} v{job.version})"
        steps.append(
            TimelineStep(job.created_at, "queued", f"{name} on queue {job.queue}, {job.routing_priority}")
        )
        if job.started_at is not None and job.state in (JobState.SUCCEEDED, JobState.FAILED):
            failed = job.state == JobState.FAILED
            timings = _stage_timings(job.timings)
            steps.append(
                TimelineStep(
                    job.finished_at or job.started_at,
                    "failed" if failed else "analysed",
                    f"{name}: {job.error or 'failed'}"
                    if failed
                    else f"{name}" + (f": {timings}" if timings else ""),
                    _seconds(job.started_at, job.finished_at),
                    problem=failed,
                )
            )
        elif job.state == JobState.RUNNING and job.started_at is not None:
            steps.append(
                TimelineStep(job.started_at, "analysing", f"{name}: running on {job.claimed_by or '?'}")
            )
    results = list(
        session.scalars(select(Result).where(Result.job_fk.in_([j.id for j in jobs])).order_by(Result.id))
    )
    # A job's analysis results; report SRs recorded later under the job are the "drafted" step's.
    finished = {job.id: job for job in jobs}
    encoded: dict[int, list[Result]] = {}
    for result in results:
        job = finished[result.job_fk]
        if job.finished_at is None or result.created_at <= job.finished_at:
            encoded.setdefault(result.job_fk, []).append(result)
    for job_id, job_results in encoded.items():
        took = (finished[job_id].timings or {}).get("encode_seconds")
        steps.append(
            TimelineStep(
                max(r.created_at for r in job_results),
                "encoded",
                f"job {job_id}: " + ", ".join(f"{r.kind} {r.sop_instance_uid}" for r in job_results),
                took if isinstance(took, int | float) else None,
            )
        )
    for delivery, result in session.execute(
        select(Delivery, Result)
        .join(Result, Result.id == Delivery.result_fk)
        .where(Result.job_fk.in_([j.id for j in jobs]))
        .order_by(Delivery.id)
    ):
        if delivery.state == DeliveryState.SENT and delivery.sent_at is not None:
            steps.append(
                TimelineStep(
                    delivery.sent_at,
                    "delivered",
                    f"{result.kind} to {delivery.destination} after {delivery.attempts} attempt(s)",
                    _seconds(result.created_at, delivery.sent_at),
                )
            )
        elif delivery.state == DeliveryState.FAILED:
            steps.append(
                TimelineStep(
                    delivery.next_attempt_at or result.created_at,
                    "delivery failed",
                    f"{result.kind} to {delivery.destination} after {delivery.attempts} attempt(s): "
                    f"{delivery.last_error or 'failed'}",
                    problem=True,
                )
            )
    for draft, username in session.execute(
        select(ReportDraft, User.username)
        .join(User, User.id == ReportDraft.decided_by_fk, isouter=True)
        .where(ReportDraft.study_fk == study.id)
        .order_by(ReportDraft.version)
    ):
        steps.append(
            TimelineStep(
                draft.created_at,
                "drafted",
                f"AI draft v{draft.version} by {draft.backend} {draft.model}"
                + (f" (fallback: {draft.fallback_reason})" if draft.fallback_reason else ""),
            )
        )
        if draft.decided_at is not None and draft.status in (ReportStatus.ACCEPTED, ReportStatus.REJECTED):
            signed = draft.status == ReportStatus.ACCEPTED
            steps.append(
                TimelineStep(
                    draft.decided_at,
                    "signed" if signed else "rejected",
                    f"v{draft.version} {'signed' if signed else 'rejected'} by {username or '?'}"
                    + (" (edited)" if signed and draft.edited else "")
                    + (f": {draft.reject_reason}" if not signed and draft.reject_reason else ""),
                    _seconds(draft.created_at, draft.decided_at),
                )
            )
    steps.sort(key=lambda step: step.at)
    return steps


def describe_study(session: Session, study: Study) -> dict[str, Any]:
    """The study as ``studies show --json`` prints it (keys: :mod:`pacs_ai.cli.studies`); no patient names."""
    series_rows = session.execute(
        select(
            Series,
            func.count(Instance.id),
            func.sum(case((Instance.purged_at.is_not(None), 1), else_=0)),
        )
        .join(Instance, Instance.series_fk == Series.id, isouter=True)
        .where(Series.study_fk == study.id)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    series_uids = {series.id: series.series_instance_uid for series, _, _ in series_rows}
    jobs = list(session.scalars(select(Job).where(Job.series_fk.in_(list(series_uids))).order_by(Job.id)))
    results = list(
        session.scalars(select(Result).where(Result.job_fk.in_([job.id for job in jobs])).order_by(Result.id))
    )
    deliveries: dict[int, list[Delivery]] = {}
    for delivery in session.scalars(
        select(Delivery).where(Delivery.result_fk.in_([r.id for r in results])).order_by(Delivery.id)
    ):
        deliveries.setdefault(delivery.result_fk, []).append(delivery)
    drafts = session.execute(
        select(ReportDraft, User.username)
        .join(User, User.id == ReportDraft.decided_by_fk, isouter=True)
        .where(ReportDraft.study_fk == study.id)
        .order_by(ReportDraft.version)
    ).all()
    return {
        "study": {
            **_study_fields(study),
            "ai_priority_reason": study.ai_priority_reason,
            "ai_priority_at": study.ai_priority_at,
        },
        "series": [
            {
                "series_instance_uid": series.series_instance_uid,
                "modality": series.modality,
                "series_description": series.series_description,
                "series_number": series.series_number,
                "instances": count,
                "purged_instances": int(purged or 0),
                "last_received_at": series.last_received_at,
                "calling_ae_title": series.calling_ae_title,
                "routing_state": series.routing_state.value,
                "routing_detail": series.routing_detail,
                # An association storing into it ended without A-RELEASE: held for a resend, or
                # (routing_state "incomplete") never analysed as it is unless reprocessed.
                "interrupted_at": series.interrupted_at,
                "interrupted_instances": series.interrupted_instances,
            }
            for series, count, purged in series_rows
        ],
        "jobs": [
            {
                "id": job.id,
                "series_instance_uid": series_uids[job.series_fk],
                "profile": job.profile,
                "analyzer": job.analyzer,
                "analyzer_version": job.analyzer_version,
                "version": job.version,
                "rule": job.rule,
                "routing_priority": job.routing_priority,
                "state": job.state.value,
                "attempts": job.attempts,
                "error": job.error,
                "created_at": job.created_at,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "timings": job.timings,
            }
            for job in jobs
        ],
        "results": [
            {
                "id": result.id,
                "job": result.job_fk,
                "kind": result.kind,
                "sop_instance_uid": result.sop_instance_uid,
                "series_instance_uid": result.series_instance_uid,
                "path": result.path,
                "purged_at": result.purged_at,
                "deliveries": [
                    {
                        "destination": d.destination,
                        "state": d.state.value,
                        "attempts": d.attempts,
                        "last_status": d.last_status,
                        "last_error": d.last_error,
                        "sent_at": d.sent_at,
                    }
                    for d in deliveries.get(result.id, [])
                ],
            }
            for result in results
        ],
        "drafts": [
            {
                "id": draft.id,
                "version": draft.version,
                "status": draft.status.value,
                "backend": draft.backend,
                "model": draft.model,
                "fallback_reason": draft.fallback_reason,
                "created_at": draft.created_at,
                "decided_at": draft.decided_at,
                "decided_by": username,
            }
            for draft, username in drafts
        ],
    }


def _study_fields(study: Study) -> dict[str, Any]:
    """What both the studies listing and a study's page say of the study itself."""
    return {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "first_received_at": study.first_received_at,
        "ai_priority": study.ai_priority,
    }
