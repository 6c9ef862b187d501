"""Study assembly: deciding when a series is complete and what to do with it.

DICOM has no "end of series" message.  A series is taken as complete when no
instance of it has arrived for a quiet period (global setting, or the longest
override among the profiles it matches).  The router then records either the
jobs to run (one per profile analyzer, with a version number) or why nothing
matched.  A job takes its parameters, destinations, priority rules and time
limit from the profile as it is at that moment.  Each instance row carries a
``routed`` flag: instances that arrive after a decision are unrouted, and the
next pass opens a new job version for their series, so nothing received is
ever ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs_ai.analyze.registry import get_analyzer
from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import Instance, Job, JobState, RoutingState, Series, Study
from pacs_ai.route.profiles import AnalyzerStep, MatchDecision, Profile, SeriesFacts, match_profiles

log = logging.getLogger(__name__)


def job_key(series_uid: str, profile: str, analyzer: str, analyzer_version: str, version: int) -> str:
    """The identity of one unit of work; results derive their UIDs from it."""
    return f"{series_uid}|{profile}|{analyzer}@{analyzer_version}|v{version}"


def series_facts(series: Series) -> SeriesFacts:
    return SeriesFacts(
        modality=series.modality,
        body_part_examined=series.body_part_examined,
        series_description=series.series_description,
        sop_class_uid=series.sop_class_uid,
        image_type=series.image_type,
        slice_thickness=series.slice_thickness,
        instance_count=series.instance_count,
    )


def quiet_period_for(decision: MatchDecision, default_seconds: float) -> float:
    overrides = [p.quiet_period_seconds for p in decision.matched if p.quiet_period_seconds is not None]
    return max(overrides) if overrides else default_seconds


@dataclass(frozen=True)
class RoutingPass:
    """What one pass of the router did."""

    #: (job id, Celery queue, time limit or None for the default) of the jobs opened, to enqueue
    #: after commit.
    new_jobs: list[tuple[int, str, float | None]]


def route_ready_series(
    session: Session, profiles: list[Profile], *, now: datetime, default_quiet_seconds: float
) -> RoutingPass:
    """Route every series with unrouted instances whose quiet period is over.

    The caller commits, then enqueues ``new_jobs``: a job row always exists
    before its message does, so a lost message is recovered from the index.
    """
    shortest_quiet = min(
        [
            default_quiet_seconds,
            *(p.quiet_period_seconds for p in profiles if p.quiet_period_seconds is not None),
        ]
    )
    # Series with instances the router has not decided on yet, and when the latest arrived.
    activity = session.execute(
        select(Instance.series_fk, func.max(Instance.received_at))
        .where(Instance.routed.is_(False))
        .group_by(Instance.series_fk)
        .having(func.max(Instance.received_at) <= now - timedelta(seconds=shortest_quiet))
    ).all()

    new_jobs: list[Job] = []
    for series_id, last_received in sorted(activity, key=lambda row: row[1]):
        series = session.get_one(Series, series_id)
        series.instance_count = (
            session.scalar(select(func.count(Instance.id)).where(Instance.series_fk == series_id)) or 0
        )
        decision = match_profiles(profiles, series_facts(series))
        if last_received > now - timedelta(seconds=quiet_period_for(decision, default_quiet_seconds)):
            continue  # a matched profile asks for a longer quiet period
        session.execute(
            update(Instance)
            .where(
                Instance.series_fk == series_id,
                Instance.routed.is_(False),
                Instance.received_at <= last_received,
            )
            .values(routed=True)
        )
        series.last_received_at = last_received
        series.routing_detail = decision.explain()
        study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == series.study_fk))
        if not decision.matched:
            series.routing_state = RoutingState.UNMATCHED
            record_audit(
                session,
                actor="router",
                action="series.unmatched",
                object_type="series",
                object_uid=series.series_instance_uid,
                detail={"reason": series.routing_detail},
            )
            log.info("series %s (study %s): %s", series.series_instance_uid, study_uid, series.routing_detail)
            continue
        series.routing_state = RoutingState.ROUTED
        for profile in decision.matched:
            for step in profile.analyzers:
                new_jobs.append(_open_job(session, series, profile, step))
        log.info("series %s (study %s): %s", series.series_instance_uid, study_uid, series.routing_detail)
    session.flush()
    return RoutingPass(new_jobs=[(job.id, job.queue, job.timeout_seconds) for job in new_jobs])


def _open_job(session: Session, series: Series, profile: Profile, step: AnalyzerStep) -> Job:
    analyzer_name = step.name
    analyzer_version = get_analyzer(analyzer_name).version
    previous = session.scalar(
        select(func.max(Job.version)).where(
            Job.series_fk == series.id, Job.profile == profile.name, Job.analyzer == analyzer_name
        )
    )
    version = (previous or 0) + 1
    job = Job(
        idempotency_key=job_key(
            series.series_instance_uid, profile.name, analyzer_name, analyzer_version, version
        ),
        series_fk=series.id,
        profile=profile.name,
        analyzer=analyzer_name,
        analyzer_version=analyzer_version,
        version=version,
        queue=step.queue,
        params=step.params,
        destinations=list(profile.destinations),
        priority_rules=[rule.model_dump(by_alias=True, mode="json") for rule in step.priority],
        timeout_seconds=step.timeout_seconds,
        state=JobState.QUEUED,
        attempts=0,
        instance_count=series.instance_count,
    )
    session.add(job)
    record_audit(
        session,
        actor="router",
        action="job.created",
        object_type="series",
        object_uid=series.series_instance_uid,
        detail={"profile": profile.name, "analyzer": analyzer_name, "version": version},
    )
    return job
