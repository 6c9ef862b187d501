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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pydicom
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs_ai.analyze.registry import get_analyzer
from pacs_ai.index.associations import interrupt_dead_associations
from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    RoutingState,
    Series,
    Study,
    utcnow,
)
from pacs_ai.route.plan import SeriesPlan, plan_series
from pacs_ai.route.profiles import AnalyzerStep, MatchDecision, Profile, SeriesFacts, match_profiles
from pacs_ai.route.rules import RuleSet, evaluate_rules, facts_from_dataset
from pacs_ai.storage.files import HostFiles

#: Jobs of routing priority "off-peak" are opened HELD and released by the scheduler in the window.
OFF_PEAK = "off-peak"
#: The pseudo-analyzer of jobs that forward original instances.
FORWARD_ANALYZER = "forward"

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
class Notification:
    """A webhook to call about a routing decision (no patient names, only UIDs and codes)."""

    url: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class JobTicket:
    """What enqueueing a job needs: its id, Celery queue, time limit (None: the default) and priority."""

    job_id: int
    queue: str
    timeout_seconds: float | None = None
    routing_priority: str = "routine"

    @classmethod
    def of(cls, job: Job) -> JobTicket:
        return cls(job.id, job.queue, job.timeout_seconds, job.routing_priority)


@dataclass(frozen=True)
class RoutingPass:
    """What one pass of the router did."""

    #: Jobs opened, to enqueue after commit (off-peak jobs are held for the scheduler to release).
    new_jobs: list[JobTicket]
    #: Deliveries of forwarded originals, to enqueue after commit.
    new_deliveries: list[int] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    #: When the next series still receiving becomes quiet (the shortest quiet period after its latest
    #: instance), so the scheduler can route it then rather than at its next regular pass; None when
    #: no unrouted series is waiting for its quiet period.
    next_quiet_at: datetime | None = None


def route_ready_series(
    session: Session,
    profiles: list[Profile],
    *,
    now: datetime,
    default_quiet_seconds: float,
    rules: RuleSet | None = None,
    files: HostFiles | None = None,
    require_uploaded: bool = False,
    resend_window_seconds: float = 600.0,
) -> RoutingPass:
    """Route every series with unrouted instances whose quiet period is over.

    A series an association stored into and then ended without A-RELEASE
    (``Series.interrupted_at``, set by the listener) is held for
    ``resend_window_seconds`` from then: a resend on an association that is
    released clears the mark and the series is routed as usual; without one
    it is marked incomplete (:func:`_mark_incomplete`) and not analysed.
    A series still being received by an association of a listener process
    of this host that is gone (killed, power lost) is marked interrupted
    first (:func:`~pacs_ai.index.associations.interrupt_dead_associations`),
    so it is held the same way.

    ``files`` reads an instance's header for the rules (instance keys as local
    files: the receiver's spool).  With ``require_uploaded`` (a remote object
    store) a series waits until every one of its instances is in the store
    (``Instance.uploaded_at``, set by :class:`pacs_ai.receive.uploader.Uploader`),
    so no worker looks for an object the store does not have yet.

    Without ``rules`` each profile's own ``match`` criteria decide.  With
    rules (``rules.yaml`` next to the profiles) the rules decide what happens
    to each series (see :func:`plan_series`), and a profile named by a rule
    still checks its own criteria as the input requirements of its analyzers.

    The caller commits, then enqueues ``new_jobs`` and ``new_deliveries``: a
    row always exists before its message does, so a lost message is
    recovered from the index.
    """
    interrupt_dead_associations(session, now)
    shortest_quiet = min(
        [
            default_quiet_seconds,
            *(p.quiet_period_seconds for p in profiles if p.quiet_period_seconds is not None),
        ]
    )
    # Series with instances the router has not decided on yet: when the latest arrived, and whether
    # all of them are in the store.
    quiet = timedelta(seconds=shortest_quiet)
    unrouted = session.execute(
        select(
            Instance.series_fk,
            func.max(Instance.received_at),
            func.count(Instance.uploaded_at) == func.count(Instance.id),
        )
        .where(Instance.routed.is_(False))
        .group_by(Instance.series_fk)
    ).all()
    activity = [
        (series_id, latest)
        for series_id, latest, uploaded in unrouted
        if latest <= now - quiet and (uploaded or not require_uploaded)
    ]
    still_receiving = [latest for _, latest, _ in unrouted if latest > now - quiet]

    new_jobs: list[Job] = []
    new_deliveries: list[Delivery] = []
    notifications: list[Notification] = []
    waiting_studies = _studies_still_receiving(session, now, default_quiet_seconds) if rules else set()
    for series_id, last_received in sorted(activity, key=lambda row: row[1]):
        series = session.get_one(Series, series_id)
        series.instance_count = (
            session.scalar(select(func.count(Instance.id)).where(Instance.series_fk == series_id)) or 0
        )
        if series.interrupted_at is not None:
            if series.interrupted_at > now - timedelta(seconds=resend_window_seconds):
                continue  # cut short by an aborted association: wait for the sender's resend
            _mark_incomplete(session, series, last_received, resend_window_seconds)
            continue
        if rules is not None:
            if series.study_fk in waiting_studies and any(
                rule.trigger == "study" and rule.enabled for rule in rules.rules
            ):
                continue  # study-triggered rules decide once the whole study is quiet
            routed = _route_by_rules(session, series, profiles, rules, now, last_received, files)
            new_jobs.extend(routed.jobs)
            new_deliveries.extend(routed.deliveries)
            notifications.extend(routed.notifications)
            continue
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
            _record_unmatched(session, series)
            log.info("series %s (study %s): %s", series.series_instance_uid, study_uid, series.routing_detail)
            continue
        series.routing_state = RoutingState.ROUTED
        for profile in decision.matched:
            for step in profile.analyzers:
                new_jobs.append(_open_job(session, series, profile, step))
        log.info("series %s (study %s): %s", series.series_instance_uid, study_uid, series.routing_detail)
    session.flush()
    return RoutingPass(
        new_jobs=[JobTicket.of(job) for job in new_jobs if job.state == JobState.QUEUED],
        new_deliveries=[delivery.id for delivery in new_deliveries],
        notifications=notifications,
        next_quiet_at=min(still_receiving) + quiet if still_receiving else None,
    )


def _open_job(
    session: Session,
    series: Series,
    profile: Profile,
    step: AnalyzerStep,
    *,
    extra_destinations: Sequence[str] = (),
    rule: str | None = None,
    routing_priority: str = "routine",
) -> Job:
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
        destinations=list(dict.fromkeys([*profile.destinations, *extra_destinations])),
        rule=rule,
        routing_priority=routing_priority,
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
        detail={"profile": profile.name, "analyzer": analyzer_name, "version": version, "rule": rule},
    )
    return job


def _studies_still_receiving(session: Session, now: datetime, quiet_seconds: float) -> set[int]:
    """Studies with an instance received within the quiet period (study-triggered rules wait for them)."""
    return set(
        session.scalars(
            select(Series.study_fk)
            .join(Instance, Instance.series_fk == Series.id)
            .where(Instance.received_at > now - timedelta(seconds=quiet_seconds))
            .distinct()
        )
    )


@dataclass
class _Routed:
    jobs: list[Job] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)


def _route_by_rules(
    session: Session,
    series: Series,
    profiles: list[Profile],
    rules: RuleSet,
    now: datetime,
    last_received: datetime,
    files: HostFiles | None,
) -> _Routed:
    """Decide one ready series by the rules and carry the plan out."""
    newly_routed = list(
        session.scalars(
            select(Instance)
            .where(
                Instance.series_fk == series.id,
                Instance.routed.is_(False),
                Instance.received_at <= last_received,
            )
            .order_by(Instance.id)
        )
    )
    key = newly_routed[0].path
    if files is None and not key.startswith("/"):
        raise ValueError(f"routing by rules reads {key}: route_ready_series needs files= to find it")
    header = pydicom.dcmread(files.local_path(key) if files else key, stop_before_pixels=True)
    facts = facts_from_dataset(
        header, calling_ae_title=series.calling_ae_title, peer_address=series.peer_address
    )
    decision = evaluate_rules(rules.rules, facts)
    plan = plan_series(decision, profiles, series_facts(series))
    for instance in newly_routed:
        instance.routed = True
    series.last_received_at = last_received
    series.routing_detail = "\n".join([*decision.explain(), *plan.problems, *plan.shadow])
    study = session.get_one(Study, series.study_fk)

    for line in plan.shadow:
        record_audit(
            session,
            actor="router",
            action="rule.shadow",
            object_type="series",
            object_uid=series.series_instance_uid,
            detail={"would": line},
        )
    routed = _Routed()
    for step in plan.process:
        for analyzer_step in step.profile.analyzers:
            job = _open_job(
                session,
                series,
                step.profile,
                analyzer_step,
                extra_destinations=plan.result_destinations,
                rule=step.rule,
                routing_priority=plan.priority,
            )
            if plan.priority == OFF_PEAK:
                job.state = JobState.HELD
            routed.jobs.append(job)
    if plan.originals:
        routed.deliveries = _forward_originals(session, series, newly_routed, plan)
    routed.notifications = [
        Notification(url, _notification_payload(series, study, rule, plan)) for url, rule in plan.notify
    ]

    if plan.does_anything:
        series.routing_state = RoutingState.ROUTED
    elif plan.discard is not None:
        series.routing_state = RoutingState.DISCARDED
        rule_name, reason = plan.discard
        series.routing_detail = f"discarded by rule {rule_name}: {reason}\n{series.routing_detail}"
        record_audit(
            session,
            actor="router",
            action="series.discarded",
            object_type="series",
            object_uid=series.series_instance_uid,
            detail={"rule": rule_name, "reason": reason},
        )
    else:
        _record_unmatched(session, series)
    log.info(
        "series %s (study %s, accession %s): rules %s -> %s",
        series.series_instance_uid,
        study.study_instance_uid,
        study.accession_number,
        [rule.name for rule in decision.applied] or "none",
        series.routing_state.value,
    )
    return routed


def _forward_originals(
    session: Session, series: Series, instances: Sequence[Instance], plan: SeriesPlan
) -> list[Delivery]:
    """A finished ``forward`` job whose results are the original instances, one delivery per destination.

    Originals forwarded earlier keep their result row (one per SOP instance);
    only missing deliveries are added, so nothing is sent twice to one place.
    """
    rules = sorted(set(plan.originals.values()))
    previous = session.scalar(
        select(func.max(Job.version)).where(Job.series_fk == series.id, Job.analyzer == FORWARD_ANALYZER)
    )
    version = (previous or 0) + 1
    job = Job(
        idempotency_key=job_key(series.series_instance_uid, "rules", FORWARD_ANALYZER, "1", version),
        series_fk=series.id,
        profile="rules:" + ",".join(rules),
        analyzer=FORWARD_ANALYZER,
        analyzer_version="1",
        version=version,
        queue="dispatch",
        params={},
        destinations=list(plan.originals),
        rule=",".join(rules),
        routing_priority=plan.priority,
        state=JobState.SUCCEEDED,
        attempts=0,
        instance_count=len(instances),
        finished_at=utcnow(),
    )
    session.add(job)
    session.flush()
    deliveries: list[Delivery] = []
    for instance in instances:
        result = session.scalar(select(Result).where(Result.sop_instance_uid == instance.sop_instance_uid))
        if result is None:
            result = Result(
                job_fk=job.id,
                kind="ORIGINAL",
                sop_class_uid=instance.sop_class_uid,
                sop_instance_uid=instance.sop_instance_uid,
                series_instance_uid=series.series_instance_uid,
                path=instance.path,
            )
            session.add(result)
            session.flush()
        known = set(session.scalars(select(Delivery.destination).where(Delivery.result_fk == result.id)))
        for destination in plan.originals:
            if destination not in known:
                delivery = Delivery(
                    result_fk=result.id,
                    destination=destination,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=utcnow() + timedelta(minutes=5),
                )
                session.add(delivery)
                deliveries.append(delivery)
    session.flush()
    record_audit(
        session,
        actor="router",
        action="series.forwarded",
        object_type="series",
        object_uid=series.series_instance_uid,
        detail={"destinations": plan.originals, "instances": len(instances), "job": job.id},
    )
    return deliveries


def _notification_payload(series: Series, study: Study, rule: str, plan: SeriesPlan) -> dict[str, Any]:
    """What a webhook learns: identifiers and the decision, never patient names."""
    return {
        "event": "series.routed",
        "rule": rule,
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "priority": plan.priority,
        "profiles": [step.profile.name for step in plan.process],
        "originals_to": sorted(plan.originals),
    }


def _mark_incomplete(
    session: Session, series: Series, last_received: datetime, resend_window_seconds: float
) -> None:
    """No complete resend came for an interrupted series: recorded as incomplete, never analysed as is.

    Its unrouted instances are decided (so the router does not come back to
    them every pass), no job is opened, the reason is in ``routing_detail``
    (``pacs-ai studies show``) and the audit (``series.incomplete``).  A later
    released association storing into it reopens it (see
    :meth:`pacs_ai.receive.store.StoreHandler.association_ended`);
    ``pacs-ai reprocess`` analyses it as it is.
    """
    session.execute(
        update(Instance)
        .where(
            Instance.series_fk == series.id,
            Instance.routed.is_(False),
            Instance.received_at <= last_received,
        )
        .values(routed=True)
    )
    series.last_received_at = last_received
    series.routing_state = RoutingState.INCOMPLETE
    series.routing_detail = (
        f"association aborted after {series.interrupted_instances or 0} instance(s) of this series "
        f"({series.instance_count} received in all); no complete resend within "
        f"resend_window_seconds={resend_window_seconds:g}: not analysed automatically "
        "(`pacs-ai reprocess` analyses it as it is)"
    )
    record_audit(
        session,
        actor="router",
        action="series.incomplete",
        object_type="series",
        object_uid=series.series_instance_uid,
        detail={
            "reason": "association aborted",
            "instances_in_aborted_association": series.interrupted_instances,
            "instances": series.instance_count,
            "resend_window_seconds": resend_window_seconds,
        },
    )
    log.warning(
        "series %s incomplete: association aborted after %s instance(s), no resend within %g s",
        series.series_instance_uid,
        series.interrupted_instances,
        resend_window_seconds,
    )


def _record_unmatched(session: Session, series: Series) -> None:
    """Nothing will run on the series: recorded with the reason, visible, not an error."""
    series.routing_state = RoutingState.UNMATCHED
    record_audit(
        session,
        actor="router",
        action="series.unmatched",
        object_type="series",
        object_uid=series.series_instance_uid,
        detail={"reason": series.routing_detail},
    )
