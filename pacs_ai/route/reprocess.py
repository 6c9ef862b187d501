"""Reprocessing: analysing studies again, as new job versions, from what the index holds.

``pacs-ai reprocess`` finds the studies in the index (by Study Instance UID,
accession number, or study date range and modality), has the series whose
spool files are gone retrieved from the PACS (:mod:`pacs_ai.receive.retrieve`),
and then *reopens* the series here: every instance row is marked unrouted,
exactly as if it had just arrived.  The router then decides the series again
by today's rules and profiles and opens a new job version for each analysis
(see :func:`pacs_ai.route.assembly.job_key`): a new key, so new Series and SOP
Instance UIDs for the results, which reference the version they replace (see
:mod:`pacs_ai.encode.results`).  Nothing is run here; the running service does
the work, and :func:`reprocess_progress` tells how far it got.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
)
from pacs_ai.storage.files import HostFiles

_FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class IndexedSeries:
    """A series of a study to reprocess, as the index knows it."""

    series_id: int
    series_instance_uid: str
    modality: str | None
    instances: int
    #: Instance rows whose spool file is gone (deleted by an administrator or by retention).
    missing_files: int


@dataclass
class IndexedStudy:
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    series: list[IndexedSeries] = field(default_factory=list)


def find_indexed_studies(
    session: Session,
    *,
    study_uids: Sequence[str] = (),
    accession_numbers: Sequence[str] = (),
    study_dates: tuple[str | None, str | None] | None = None,
    modality: str | None = None,
    files: HostFiles,
) -> list[IndexedStudy]:
    """Studies matching any of the UIDs or accession numbers, or the date range (DA, inclusive).

    ``modality`` keeps only series of that modality (and studies that have
    one).  Each series says how many of its instances are missing: neither in
    this host's spool nor in the storage (``files``).
    """
    conditions: list[Any] = []
    if study_uids:
        conditions.append(Study.study_instance_uid.in_(list(study_uids)))
    if accession_numbers:
        conditions.append(Study.accession_number.in_(list(accession_numbers)))
    if study_dates is not None:
        first, last = study_dates
        in_range: list[Any] = [Study.study_date.is_not(None)]
        if first:
            in_range.append(Study.study_date >= first)
        if last:
            in_range.append(Study.study_date <= last)
        conditions.append(and_(*in_range))
    if not conditions:
        return []
    studies: list[IndexedStudy] = []
    for study in session.scalars(select(Study).where(or_(*conditions)).order_by(Study.id)):
        query = select(Series).where(Series.study_fk == study.id).order_by(Series.id)
        if modality:
            query = query.where(func.upper(Series.modality) == modality.upper())
        found = IndexedStudy(study.study_instance_uid, study.accession_number, study.study_date)
        for series in session.scalars(query):
            paths = list(session.scalars(select(Instance.path).where(Instance.series_fk == series.id)))
            found.series.append(
                IndexedSeries(
                    series_id=series.id,
                    series_instance_uid=series.series_instance_uid,
                    modality=series.modality,
                    instances=len(paths),
                    missing_files=sum(1 for key in paths if not files.has(key)),
                )
            )
        if found.series or not modality:
            studies.append(found)
    return studies


def missing_files(session: Session, series_ids: Collection[int], files: HostFiles) -> dict[int, int]:
    """Series id -> number of its instances neither in the spool nor in the storage (none: omitted)."""
    missing: dict[int, int] = {}
    for series_id, key in session.execute(
        select(Instance.series_fk, Instance.path).where(Instance.series_fk.in_(list(series_ids)))
    ):
        if not files.has(key):
            missing[series_id] = missing.get(series_id, 0) + 1
    return missing


def reopen_series(
    session: Session, study_uid: str, series_ids: Collection[int], *, actor: str, detail: dict[str, Any]
) -> int:
    """Mark every instance of the series unrouted, so the router opens new job versions; audit it.

    The audit event (``study.reprocess``) is recorded even when no series is
    reopened (a study retrieved whole is routed as a new arrival).  Returns
    the number of instances reopened.  The caller commits.
    """
    ids = list(series_ids)
    count = session.scalar(select(func.count(Instance.id)).where(Instance.series_fk.in_(ids))) or 0
    if ids:
        session.execute(
            update(Instance)
            .where(Instance.series_fk.in_(ids))
            .values(routed=False)
            .execution_options(synchronize_session=False)
        )
        # Asked for by name: a series an aborted association left incomplete is analysed as it is.
        session.execute(
            update(Series)
            .where(Series.id.in_(ids), Series.interrupted_at.is_not(None))
            .values(interrupted_at=None, interrupted_instances=None)
            .execution_options(synchronize_session=False)
        )
    reopened = list(session.scalars(select(Series.series_instance_uid).where(Series.id.in_(ids))))
    record_audit(
        session,
        actor=actor,
        action="study.reprocess",
        object_type="study",
        object_uid=study_uid,
        detail={"reopened_series": reopened, "instances": count, **detail},
    )
    return count


@dataclass(frozen=True)
class ReprocessProgress:
    """How far the service got with reopened series."""

    #: Series the router has not decided on again yet.
    undecided_series: int
    #: Jobs opened since the reprocess started, by state.
    jobs: dict[str, int]
    #: Deliveries of those jobs' results, by state.
    deliveries: dict[str, int]

    @property
    def jobs_total(self) -> int:
        return sum(self.jobs.values())

    @property
    def jobs_finished(self) -> int:
        return sum(n for state, n in self.jobs.items() if state in {s.value for s in _FINISHED})

    @property
    def done(self) -> bool:
        """Decided, every job finished or held for off-peak, and nothing left to deliver."""
        waiting = {JobState.QUEUED.value, JobState.RUNNING.value}
        return (
            self.undecided_series == 0
            and not any(self.jobs.get(state) for state in waiting)
            and not self.deliveries.get(DeliveryState.PENDING.value)
        )


def last_job_id(session: Session) -> int:
    """The newest job's id (0 without jobs): jobs opened by a reprocess have larger ones.

    Ids rather than clock times, because the service that opens the jobs may
    run on another machine with another clock.
    """
    return session.scalar(select(func.max(Job.id))) or 0


def reprocess_progress(session: Session, series_ids: Collection[int], after_job_id: int) -> ReprocessProgress:
    """Progress of the reopened ``series_ids``, counting jobs with ids above ``after_job_id``."""
    ids = list(series_ids)
    undecided = (
        session.scalar(
            select(func.count(func.distinct(Instance.series_fk))).where(
                Instance.series_fk.in_(ids), Instance.routed.is_(False)
            )
        )
        or 0
    )
    new_jobs = select(Job.id).where(Job.series_fk.in_(ids), Job.id > after_job_id)
    jobs = {
        state.value: n
        for state, n in session.execute(
            select(Job.state, func.count(Job.id)).where(Job.id.in_(new_jobs)).group_by(Job.state)
        )
    }
    deliveries = {
        state.value: n
        for state, n in session.execute(
            select(Delivery.state, func.count(Delivery.id))
            .join(Result, Result.id == Delivery.result_fk)
            .where(Result.job_fk.in_(new_jobs))
            .group_by(Delivery.state)
        )
    }
    return ReprocessProgress(undecided, jobs, deliveries)


def new_versions(session: Session, series_ids: Collection[int], after_job_id: int) -> list[dict[str, Any]]:
    """The jobs above ``after_job_id`` of the series, with their results and what each replaces."""
    rows: list[dict[str, Any]] = []
    for job, series_uid in session.execute(
        select(Job, Series.series_instance_uid)
        .join(Series, Series.id == Job.series_fk)
        .where(Job.series_fk.in_(list(series_ids)), Job.id > after_job_id)
        .order_by(Job.id)
    ):
        results = list(session.scalars(select(Result).where(Result.job_fk == job.id).order_by(Result.id)))
        replaces = _replaced(session, [r.sop_instance_uid for r in results])
        rows.append(
            {
                "job": job.id,
                "series_instance_uid": series_uid,
                "profile": job.profile,
                "analyzer": job.analyzer,
                "version": job.version,
                "state": job.state.value,
                "error": job.error,
                "results": [
                    {
                        "kind": r.kind,
                        "sop_instance_uid": r.sop_instance_uid,
                        "series_instance_uid": r.series_instance_uid,
                        "replaces": replaces.get(r.sop_instance_uid, []),
                    }
                    for r in results
                ],
            }
        )
    return rows


def _replaced(session: Session, sop_instance_uids: list[str]) -> dict[str, list[str]]:
    """New result UID -> the UIDs it replaces, from the ``result.replaces`` audit events."""
    replaced: dict[str, list[str]] = {}
    if not sop_instance_uids:
        return replaced
    for event in session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "result.replaces", AuditEvent.object_uid.in_(sop_instance_uids)
        )
    ):
        old = (event.detail or {}).get("replaces_sop_instance_uid")
        if old and event.object_uid:
            replaced.setdefault(event.object_uid, []).append(str(old))
    return replaced
