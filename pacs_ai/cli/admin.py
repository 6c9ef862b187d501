"""Administrator verbs: ``retry``, ``cancel``, ``send``, ``echo`` and ``audit``.

They change the index (the source of truth) and then, where the service is
running, hand the work to the broker at once.  Where it is not running,
nothing is lost: ``pacs-ai serve`` re-enqueues queued jobs and pending
deliveries from the index when it starts.  Every change is audited with the
operating-system user as the actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.cli.common import (
    JsonOption,
    cli_actor,
    console,
    index_sessions,
    print_json,
    print_rows,
    settings_of,
)
from pacs_ai.config import Settings
from pacs_ai.dispatch.check import check_destination
from pacs_ai.dispatch.destinations import DicomDestination
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    Series,
    Study,
    utcnow,
)
from pacs_ai.route.assembly import JobTicket
from pacs_ai.route.profiles import AnalyzerStep


def _enqueue(
    settings: Settings, jobs: list[JobTicket], deliveries: list[int], drafts: Sequence[int] = ()
) -> bool:
    """Hand work to the broker now; False (work stays queued in the index) when it cannot be reached.

    ``drafts`` are ids of studies whose AI report is now due.
    """
    if not jobs and not deliveries and not drafts:
        return True
    from kombu.exceptions import OperationalError

    from pacs_ai.service import CeleryTaskQueue
    from workers.factory import create_app

    app = create_app(settings)
    app.conf.broker_connection_timeout = 3
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


def _report_enqueued(done: bool, as_json: bool) -> None:
    if not done and not as_json:
        console.print(
            "[yellow]the broker is not reachable[/yellow] (is `pacs-ai serve` running?): the work is queued "
            "in the index and will be sent when the service starts"
        )


def _jobs_to_retry(session: Session, job_ids: list[int] | None) -> list[Job]:
    """The given jobs, or every job that failed or has a failed delivery."""
    query = select(Job)
    if job_ids:
        query = query.where(Job.id.in_(job_ids))
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
    from pacs_ai.route.profiles import ProfileError, load_profiles

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


def retry(
    ctx: typer.Context,
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids; none means every failed one.")] = None,
    keep_params: Annotated[
        bool,
        typer.Option(
            "--keep-params",
            help="Run with the parameters the job had when it failed, not its profile's current ones.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run failed jobs again and resend their failed deliveries (results are never duplicated).

    A failed job runs with its profile's current analyzer parameters (a fixed
    profile takes effect), unless --keep-params; ``reprocess`` is the way to
    analyse a series again when its job succeeded (a new result version).
    """
    settings = settings_of(ctx)
    actor = cli_actor()
    retried: list[dict[str, Any]] = []
    jobs_to_send: list[JobTicket] = []
    deliveries_to_send: list[int] = []
    with session_scope(index_sessions(settings)) as session:
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
                jobs_to_send.append(JobTicket.of(job))
                retried.append({"job": job.id, "what": f"analysis {how}"})
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
                deliveries_to_send.append(delivery.id)
                retried.append({"job": job.id, "what": f"delivery to {delivery.destination}"})
                record_audit(
                    session,
                    actor=actor,
                    action="delivery.retried",
                    object_type="delivery",
                    object_uid=str(delivery.id),
                    detail={"job": job.id, "destination": delivery.destination},
                )
            if job_ids and job.state != JobState.QUEUED and not failed_deliveries:
                retried.append({"job": job.id, "what": f"nothing to retry (job {job.state.value})"})
        missing = sorted(set(job_ids or []) - {job.id for job in candidates})
    done = _enqueue(settings, jobs_to_send, deliveries_to_send)
    if as_json:
        print_json({"retried": retried, "unknown_jobs": missing, "enqueued": done})
    else:
        for row in retried:
            console.print(f"job {row['job']}: {row['what']}")
        if not retried:
            console.print("nothing failed; nothing to retry")
        _report_enqueued(done, as_json)
        for job_id in missing:
            console.print(f"[red]no job {job_id}[/red]")
    raise typer.Exit(1 if missing else 0)


def _studies_due_for_draft(
    settings: Settings, sessions: sessionmaker[Session], job_ids: list[int]
) -> list[int]:
    """Ids of the studies of these jobs whose AI report draft is now due (no job of theirs unfinished)."""
    from pacs_ai.report.pipeline import ReportPipeline

    pipeline = ReportPipeline(settings, sessions)
    return sorted({study for job_id in job_ids if (study := pipeline.study_to_draft(job_id)) is not None})


def cancel(
    ctx: typer.Context,
    job_ids: Annotated[list[int], typer.Argument(help="Ids of queued or running jobs.")],
    as_json: JsonOption = False,
) -> None:
    """Cancel jobs that have not finished; a running one stops being retried and its results are not sent."""
    settings = settings_of(ctx)
    outcome: list[dict[str, Any]] = []
    sessions = index_sessions(settings)
    with session_scope(sessions) as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            if job is None:
                outcome.append({"job": job_id, "cancelled": False, "reason": "no such job"})
            elif job.state not in (JobState.QUEUED, JobState.RUNNING):
                outcome.append({"job": job_id, "cancelled": False, "reason": f"job is {job.state.value}"})
            else:
                job.state = JobState.CANCELLED
                job.finished_at = utcnow()
                record_audit(
                    session,
                    actor=cli_actor(),
                    action="job.cancelled",
                    object_type="job",
                    object_uid=str(job_id),
                )
                outcome.append({"job": job_id, "cancelled": True, "reason": None})
    # A cancelled job may have been the last one its study's report draft waited for.
    cancelled = [row["job"] for row in outcome if row["cancelled"]]
    drafts = _studies_due_for_draft(settings, sessions, cancelled)
    _report_enqueued(_enqueue(settings, [], [], drafts), as_json)
    if as_json:
        print_json(outcome)
    else:
        for row in outcome:
            shown = "cancelled" if row["cancelled"] else f"[red]not cancelled[/red]: {row['reason']}"
            console.print(f"job {row['job']}: {shown}")
    raise typer.Exit(0 if all(row["cancelled"] for row in outcome) else 1)


def send(
    ctx: typer.Context,
    study: Annotated[str, typer.Argument(help="Study Instance UID or accession number.")],
    to: Annotated[
        list[str] | None, typer.Option("--to", help="Destination name(s); default: the job's own.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Send a study's results again (same SOP Instance UIDs, so the PACS replaces rather than duplicates)."""
    settings = settings_of(ctx)
    unknown = sorted(set(to or []) - set(settings.destinations))
    if unknown:
        console.print(
            f"[red]destination(s) not configured[/red]: {unknown}; known: {sorted(settings.destinations)}"
        )
        raise typer.Exit(1)
    queued: list[dict[str, Any]] = []
    with session_scope(index_sessions(settings)) as session:
        rows = session.execute(
            select(Result, Job)
            .join(Job, Job.id == Result.job_fk)
            .join(Series, Series.id == Job.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .where((Study.study_instance_uid == study) | (Study.accession_number == study))
            .order_by(Result.id)
        ).all()
        if not rows:
            console.print(f"[red]no results for study {study}[/red]")
            raise typer.Exit(1)
        for result, job in rows:
            for destination in to or list(job.destinations or []):
                delivery = session.scalar(
                    select(Delivery).where(
                        Delivery.result_fk == result.id, Delivery.destination == destination
                    )
                )
                if delivery is None:
                    delivery = Delivery(result_fk=result.id, destination=destination)
                    session.add(delivery)
                delivery.state = DeliveryState.PENDING
                delivery.attempts = 0
                delivery.next_attempt_at = utcnow()
                session.flush()
                record_audit(
                    session,
                    actor=cli_actor(),
                    action="result.resend",
                    object_type="result",
                    object_uid=result.sop_instance_uid,
                    detail={"destination": destination},
                )
                queued.append({"delivery": delivery.id, "result": result.kind, "destination": destination})
    done = _enqueue(settings, [], [row["delivery"] for row in queued])
    if as_json:
        print_json({"queued": queued, "enqueued": done})
        return
    for row in queued:
        console.print(f"{row['result']} -> {row['destination']} (delivery {row['delivery']})")
    _report_enqueued(done, as_json)


def echo(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A destination name, or AE@HOST:PORT.")],
    as_json: JsonOption = False,
) -> None:
    """Check that a destination answers: C-ECHO for DICOM, a QIDO query for DICOMweb, a write for folders."""
    settings = settings_of(ctx)
    destination = settings.destinations.get(target)
    if destination is None:
        try:
            ae_title, address = target.split("@", 1)
            host, port = address.rsplit(":", 1)
            destination = DicomDestination(ae_title=ae_title, host=host, port=int(port), timeout_seconds=10)
        except ValueError:
            console.print(
                f"[red]{target!r} is neither a configured destination ({sorted(settings.destinations)}) "
                "nor AE@HOST:PORT[/red]"
            )
            raise typer.Exit(2) from None
    problem = check_destination(destination, calling_ae_title=settings.ae_title)
    if as_json:
        print_json(
            {"target": target, "destination": destination.describe(), "ok": problem is None, "error": problem}
        )
    elif problem is None:
        console.print(f"[green]ok[/green] {destination.describe()}")
    else:
        console.print(f"[red]failed[/red] {destination.describe()}: {problem}")
    raise typer.Exit(0 if problem is None else 1)


def audit(
    ctx: typer.Context,
    action: Annotated[
        str | None, typer.Option(help="Only this action, e.g. job.failed; a trailing * matches a prefix.")
    ] = None,
    object_uid: Annotated[
        str | None, typer.Option("--object", help="Only events about this UID or id.")
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only events by this actor.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only events at or after this time (UTC).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many events, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Who did what to which object, newest first."""
    with session_scope(index_sessions(settings_of(ctx))) as session:
        query = select(AuditEvent)
        if action is not None:
            query = (
                query.where(AuditEvent.action.startswith(action[:-1]))
                if action.endswith("*")
                else query.where(AuditEvent.action == action)
            )
        if object_uid is not None:
            query = query.where(AuditEvent.object_uid == object_uid)
        if actor is not None:
            query = query.where(AuditEvent.actor == actor)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        rows = [
            {
                "at": event.at,
                "actor": event.actor,
                "action": event.action,
                "object_type": event.object_type,
                "object_uid": event.object_uid,
                "detail": event.detail,
            }
            for event in session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit))
        ]
    print_rows(rows, ["at", "actor", "action", "object_type", "object_uid", "detail"], "Audit", as_json)


def register(app: typer.Typer) -> None:
    """Add the administrator verbs to the top-level ``pacs-ai`` command."""
    for command in (retry, cancel, send, echo, audit):
        app.command()(command)
