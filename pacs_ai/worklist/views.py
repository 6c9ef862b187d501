"""What the worklist shows, as plain dicts: the same data feeds the HTML pages and the JSON API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.models import AuditEvent, Job, JobState, Patient, Series, Study, StudyPriority
from pacs_ai.index.reports import ReportDraft, ReportStatus
from pacs_ai.worklist.key_images import key_images_of

__all__ = ["draft_view", "format_age", "study_view", "worklist_rows"]

#: Studies listed at most (newest decisions fall off the end first).
WORKLIST_LIMIT = 500
_OPEN = {ReportStatus.DRAFT.value, "analysing", "no draft"}


def format_age(seconds: float) -> str:
    """``"2 d 3 h"``, ``"3 h 12 min"`` or ``"5 min"``."""
    minutes = int(seconds // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


def _priority_rank(priority: str | None) -> int:
    try:
        return StudyPriority(priority).rank if priority else len(StudyPriority)
    except ValueError:
        return len(StudyPriority)


def _jobs_of(session: Session, study: Study) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .join(Series, Series.id == Job.series_fk)
            .where(Series.study_fk == study.id)
            .order_by(Job.id)
        )
    )


def _job_status(jobs: list[Job]) -> str:
    states = {job.state for job in jobs}
    if states & {JobState.QUEUED, JobState.RUNNING}:
        return "analysing"
    if JobState.SUCCEEDED in states:
        return "no draft"
    return "failed"


def _latest_drafts(session: Session) -> dict[int, ReportDraft]:
    latest: dict[int, ReportDraft] = {}
    for draft in session.scalars(select(ReportDraft).order_by(ReportDraft.study_fk, ReportDraft.version)):
        latest[draft.study_fk] = draft
    return latest


def worklist_rows(session: Session, now: datetime) -> list[dict[str, Any]]:
    """Studies with an analysis or a draft: open first, then by AI priority (STAT first), oldest first."""
    latest = _latest_drafts(session)
    with_jobs = set(session.scalars(select(Series.study_fk).join(Job, Job.series_fk == Series.id).distinct()))
    studies = session.scalars(select(Study).where(Study.id.in_(with_jobs | set(latest))))
    rows: list[dict[str, Any]] = []
    for study in studies:
        patient = session.get(Patient, study.patient_fk) if study.patient_fk is not None else None
        draft = latest.get(study.id)
        jobs = _jobs_of(session, study) if draft is None else []
        status = draft.status.value if draft is not None else _job_status(jobs)
        # Why a study has no draft: its failed analyses' reasons, shown on the worklist.
        failure = "; ".join(
            f"{job.analyzer}: {job.error or 'failed'}" for job in jobs if job.state == JobState.FAILED
        )
        age = (now - study.first_received_at).total_seconds()
        rows.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "accession_number": study.accession_number,
                "study_date": study.study_date,
                "study_description": study.study_description,
                "patient_id": patient.patient_id if patient else None,
                "patient_name": str(patient.patient_name or "").replace("^", " ").strip()
                if patient
                else None,
                "status": status,
                "ai_priority": study.ai_priority,
                "ai_priority_reason": study.ai_priority_reason,
                "age_seconds": int(age),
                "age": format_age(age),
                "draft_id": draft.id if draft else None,
                "draft_version": draft.version if draft else None,
                "failure_reason": failure[:300] or None,
            }
        )
    rows.sort(key=lambda r: (r["status"] not in _OPEN, _priority_rank(r["ai_priority"]), -r["age_seconds"]))
    return rows[:WORKLIST_LIMIT]


def draft_view(draft: ReportDraft) -> dict[str, Any]:
    return {
        "id": draft.id,
        "version": draft.version,
        "status": draft.status.value,
        "findings": draft.findings_text,
        "impression": draft.impression_text,
        "backend": draft.backend,
        "model": draft.model,
        "guardrail": draft.guardrail,
        "fallback_reason": draft.fallback_reason,
        "draft_sr_uid": draft.draft_sr_uid,
        "signed_findings": draft.signed_findings_text,
        "signed_impression": draft.signed_impression_text,
        "edited": draft.edited,
        "signed_sr_uid": draft.signed_sr_uid,
        "reject_reason": draft.reject_reason,
        "decided_by": draft.decided_by.username if draft.decided_by else None,
        "decided_at": draft.decided_at.isoformat() if draft.decided_at else None,
        "created_at": draft.created_at.isoformat(),
    }


def _measurements(jobs: list[Job]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    measurements: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for job in jobs:
        recorded = job.findings or {}
        for m in recorded.get("measurements", []):
            measurements.append(
                {
                    "analyzer": job.analyzer,
                    "name": m.get("name"),
                    "derivation": m.get("derivation"),
                    "finding_site": m.get("finding_site"),
                    "value": m.get("value"),
                    "unit": m.get("unit"),
                }
            )
        for f in recorded.get("findings", []):
            findings.append(
                {
                    "analyzer": job.analyzer,
                    "finding": f.get("finding"),
                    "probability": f.get("probability"),
                    "threshold": f.get("threshold"),
                    "present": f.get("present"),
                    "finding_site": f.get("finding_site"),
                }
            )
    return measurements, findings


def _draft_failure(session: Session, study: Study, latest: ReportDraft | None) -> dict[str, Any] | None:
    """The last ``report.draft_failed`` event of the study, unless a draft was written after it."""
    event = session.scalar(
        select(AuditEvent)
        .where(AuditEvent.action == "report.draft_failed", AuditEvent.object_uid == study.study_instance_uid)
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    if event is None or (latest is not None and latest.created_at >= event.at):
        return None
    return {"at": event.at.isoformat(timespec="seconds"), "reason": (event.detail or {}).get("reason")}


def study_view(session: Session, study: Study, now: datetime) -> dict[str, Any]:
    """Everything the study page shows: study, latest draft, earlier drafts, measurements, key images."""
    patient = session.get(Patient, study.patient_fk) if study.patient_fk is not None else None
    jobs = _jobs_of(session, study)
    drafts = list(
        session.scalars(
            select(ReportDraft).where(ReportDraft.study_fk == study.id).order_by(ReportDraft.version.desc())
        )
    )
    measurements, findings = _measurements([job for job in jobs if job.state == JobState.SUCCEEDED])
    return {
        "study": {
            "study_instance_uid": study.study_instance_uid,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "study_description": study.study_description,
            "ai_priority": study.ai_priority,
            "ai_priority_reason": study.ai_priority_reason,
            "age": format_age((now - study.first_received_at).total_seconds()),
            "patient_id": patient.patient_id if patient else None,
            "patient_name": str(patient.patient_name or "").replace("^", " ").strip() if patient else None,
        },
        "draft": draft_view(drafts[0]) if drafts else None,
        "draft_failure": _draft_failure(session, study, drafts[0] if drafts else None),
        "earlier_drafts": [draft_view(d) for d in drafts[1:]],
        "jobs": [
            {
                "id": job.id,
                "analyzer": job.analyzer,
                "version": job.analyzer_version,
                "state": job.state.value,
                "error": job.error,
            }
            for job in jobs
        ],
        "measurements": measurements,
        "findings": findings,
        "key_images": [
            {"label": image.label, "url": image.url}
            for image in key_images_of(session, [job for job in jobs if job.state == JobState.SUCCEEDED])
        ],
    }
