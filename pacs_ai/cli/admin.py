"""Administrator verbs: ``retry``, ``cancel``, ``send``, ``echo`` and ``audit``.

They change the index (the source of truth) and then, where the service is
running, hand the work to the broker at once.  Where it is not running,
nothing is lost: ``pacs-ai serve`` re-enqueues queued jobs and pending
deliveries from the index when it starts.  Every change is audited with the
operating-system user as the actor.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from sqlalchemy import select

from pacs_ai.cli.common import (
    JsonOption,
    cli_actor,
    console,
    index_sessions,
    print_json,
    print_rows,
    settings_of,
)
from pacs_ai.dispatch.check import check_destination
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import (
    Delivery,
    DeliveryState,
    Job,
    Result,
    Series,
    Study,
    utcnow,
)
from pacs_ai.ops.audit import audit_row, search_audit
from pacs_ai.ops.jobs import cancel_jobs, enqueue, retry_jobs, studies_due_for_draft
from pacs_ai.peer_settings import DicomDestination


def _report_enqueued(done: bool, as_json: bool) -> None:
    if not done and not as_json:
        console.print(
            "[yellow]the broker is not reachable[/yellow] (is `pacs-ai serve` running?): the work is queued "
            "in the index and will be sent when the service starts"
        )


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
    with session_scope(index_sessions(settings)) as session:
        outcome = retry_jobs(session, settings, job_ids, actor=cli_actor(), keep_params=keep_params)
    retried, missing = outcome.retried, outcome.unknown_jobs
    done = enqueue(settings, outcome.jobs, outcome.deliveries)
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


def cancel(
    ctx: typer.Context,
    job_ids: Annotated[list[int], typer.Argument(help="Ids of queued or running jobs.")],
    as_json: JsonOption = False,
) -> None:
    """Cancel jobs that have not finished; a running one stops being retried and its results are not sent."""
    settings = settings_of(ctx)
    sessions = index_sessions(settings)
    with session_scope(sessions) as session:
        outcome = [row.as_dict() for row in cancel_jobs(session, job_ids, actor=cli_actor())]
    # A cancelled job may have been the last one its study's report draft waited for.
    cancelled = [row["job"] for row in outcome if row["cancelled"]]
    drafts = studies_due_for_draft(settings, sessions, cancelled)
    _report_enqueued(enqueue(settings, [], [], drafts), as_json)
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
    done = enqueue(settings, [], [row["delivery"] for row in queued])
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
    until: Annotated[datetime | None, typer.Option(help="Only events at or before this time (UTC).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many events, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Who did what to which object, newest first."""
    with session_scope(index_sessions(settings_of(ctx))) as session:
        events = search_audit(
            session, action=action, actor=actor, object_uid=object_uid, since=since, until=until, limit=limit
        )
        rows = [{key: value for key, value in audit_row(e).items() if key != "id"} for e in events]
    print_rows(rows, ["at", "actor", "action", "object_type", "object_uid", "detail"], "Audit", as_json)


def register(app: typer.Typer) -> None:
    """Add the administrator verbs to the top-level ``pacs-ai`` command."""
    for command in (retry, cancel, send, echo, audit):
        app.command()(command)
