"""``pacs-ai reprocess``: analyse studies again, fetching them from the PACS where the spool lost them.

Studies are chosen by Study Instance UID, accession number, or a study date
range (optionally with a modality).  The index is asked first.  A series
whose spool files are gone (deleted by an administrator or by retention), and
a study the index does not know at all, is found in the PACS with C-FIND and
retrieved with C-MOVE to pacs-ai's own listener, which receives it through
the normal durable path; ``pacs-ai serve`` must be running, and the PACS must
know pacs-ai's AE title (see :mod:`pacs_ai.receive.retrieve`).

The series are then reopened (:mod:`pacs_ai.route.reprocess`): the router
decides them again and opens a new job version per analysis, whose results
get new Series and SOP Instance UIDs, say "(v2)" and reference the results
they replace (:mod:`pacs_ai.encode.results`).  A study the index did not know
is routed like any newly received study.  ``--wait`` follows the new jobs and
their deliveries to the end.

Exit codes: 0 done, 1 nothing found or something failed (retrieval, a job, a
delivery, the wait's time limit), 2 usage errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.cli.common import (
    JsonOption,
    cli_actor,
    console,
    index_sessions,
    print_json,
    print_table,
    settings_of,
)
from pacs_ai.config import Settings
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import DeliveryState, JobState, Series
from pacs_ai.receive.retrieve import (
    MoveProgress,
    QueryRetrieveClient,
    RetrieveError,
    date_range,
    dicom_date,
    explain_move_status,
    series_to_retrieve,
)
from pacs_ai.route.reprocess import (
    IndexedStudy,
    ReprocessProgress,
    find_indexed_studies,
    last_job_id,
    missing_files,
    new_versions,
    reopen_series,
    reprocess_progress,
)
from pacs_ai.storage.files import HostFiles


@dataclass
class SeriesPlan:
    """One series to reprocess: known to the index, or found in the PACS only."""

    series_instance_uid: str
    modality: str | None
    instances: int | None
    series_id: int | None = None
    missing_files: int = 0
    retrieved: int = 0
    reopened: bool = False
    problem: str | None = None

    @property
    def needs_retrieval(self) -> bool:
        return self.series_id is None or self.missing_files > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "instances": self.instances,
            "in_index": self.series_id is not None,
            "missing_files": self.missing_files,
            "retrieved": self.retrieved,
            "reopened": self.reopened,
            "problem": self.problem,
        }


@dataclass
class StudyPlan:
    study_instance_uid: str
    accession_number: str | None
    #: "index", or the name of the PACS (``query_retrieve`` entry) that holds it.
    source: str
    series: list[SeriesPlan] = field(default_factory=list)
    #: The PACS to retrieve missing parts from (found there by C-FIND).
    peer: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "source": self.source,
            "retrieved_from": self.peer if any(s.needs_retrieval for s in self.series) else None,
            "series": [s.as_dict() for s in self.series],
        }


def _usage(message: str) -> typer.Exit:
    console.print(f"[red]usage:[/red] {message}")
    return typer.Exit(2)


def _clients(settings: Settings, pacs: str | None) -> dict[str, QueryRetrieveClient]:
    names = [pacs] if pacs else list(settings.query_retrieve)
    return {
        name: QueryRetrieveClient(settings.query_retrieve[name], calling_ae_title=settings.ae_title)
        for name in names
    }


def _from_index(study: IndexedStudy) -> StudyPlan:
    return StudyPlan(
        study.study_instance_uid,
        study.accession_number,
        "index",
        [
            SeriesPlan(s.series_instance_uid, s.modality, s.instances, s.series_id, s.missing_files)
            for s in study.series
        ],
    )


def _from_pacs(
    client: QueryRetrieveClient, name: str, study_uid: str, accession: str | None, modality: str | None
) -> StudyPlan:
    """A study only the PACS has: its series, less derived objects and other modalities."""
    plan = StudyPlan(study_uid, accession, name, peer=name)
    for series in series_to_retrieve(client.find_series(study_uid), modality):
        plan.series.append(SeriesPlan(series.series_instance_uid, series.modality, series.instances))
    return plan


def _resolve(
    sessions: sessionmaker[Session],
    clients: dict[str, QueryRetrieveClient],
    files: HostFiles,
    *,
    study_uids: list[str],
    accessions: list[str],
    study_dates: tuple[str | None, str | None] | None,
    modality: str | None,
    problems: list[str],
) -> list[StudyPlan]:
    """The studies to reprocess: the index's, then what only the PACS holds."""
    with session_scope(sessions) as session:
        indexed = find_indexed_studies(
            session,
            study_uids=study_uids,
            accession_numbers=accessions,
            study_dates=study_dates,
            modality=modality,
            files=files,
        )
    plans = {study.study_instance_uid: _from_index(study) for study in indexed}
    known_accessions = {study.accession_number for study in indexed}
    queries: list[dict[str, str | None]] = []
    queries += [{"study_uid": uid} for uid in study_uids if uid not in plans]
    queries += [{"accession_number": number} for number in accessions if number not in known_accessions]
    if study_dates is not None:
        queries.append({"study_dates": date_range(*study_dates), "modality": modality})
    if queries and not clients:
        if study_uids or accessions:
            problems.append(
                "some studies are not in the index, and no PACS to query is configured (query_retrieve)"
            )
        return list(plans.values())
    for query in queries:
        for name, client in clients.items():
            try:
                matches = client.find_studies(**query)  # type: ignore[arg-type]
            except RetrieveError as exc:
                problems.append(f"{name}: {exc}")
                continue
            for match in matches:
                if match.study_instance_uid in plans:
                    continue
                try:
                    plans[match.study_instance_uid] = _from_pacs(
                        client, name, match.study_instance_uid, match.accession_number, modality
                    )
                except RetrieveError as exc:
                    problems.append(f"{name}: {exc}")
            if matches:
                break  # the first PACS that has it is the one to retrieve from
    # Studies in the index with files gone: find which PACS holds them.
    for plan in plans.values():
        if plan.peer is None and any(s.needs_retrieval for s in plan.series):
            plan.peer = _locate(clients, plan.study_instance_uid, problems)
    return list(plans.values())


def _locate(clients: dict[str, QueryRetrieveClient], study_uid: str, problems: list[str]) -> str | None:
    for name, client in clients.items():
        try:
            if client.find_studies(study_uid=study_uid):
                return name
        except RetrieveError as exc:
            problems.append(f"{name}: {exc}")
    return None


def _retrieve(
    settings: Settings,
    clients: dict[str, QueryRetrieveClient],
    plans: list[StudyPlan],
    *,
    show: bool,
    plain: bool,
) -> None:
    """C-MOVE every series that needs it: a progress bar of instances when ``show``, lines when ``plain``."""
    work = [(plan, series) for plan in plans for series in plan.series if series.needs_retrieval]
    if not work:
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show) as progress:
        total = sum(series.instances or 0 for _, series in work) or None
        task = progress.add_task("retrieving from the PACS", total=total)
        done = 0
        for plan, series in work:
            if plan.peer is None:
                series.problem = "not found in any configured PACS (query_retrieve)"
                continue
            client = clients[plan.peer]
            destination = client.peer.move_destination or settings.ae_title

            def advance(moved: MoveProgress, base: int = done) -> None:
                progress.update(task, completed=base + moved.completed + moved.warning + moved.failed)

            try:
                outcome = client.move_series(
                    plan.study_instance_uid,
                    series.series_instance_uid,
                    destination=destination,
                    on_progress=advance,
                )
            except RetrieveError as exc:
                series.problem = str(exc)
                continue
            moved = outcome.progress
            series.retrieved = moved.completed + moved.warning
            done += moved.total
            if not outcome.ok:
                series.problem = explain_move_status(outcome.status, client.peer, destination)
                if outcome.failed_sop_instance_uids:
                    series.problem += f"; failed: {len(outcome.failed_sop_instance_uids)} instance(s)"
            if plain:
                console.print(
                    f"retrieved {series.retrieved} instance(s) of series {series.series_instance_uid} "
                    f"from {plan.peer}"
                )


def _reopen(
    sessions: sessionmaker[Session], plans: list[StudyPlan], actor: str, files: HostFiles
) -> list[int]:
    """Reopen every complete series; returns the ids of the series the service will now work on."""
    series_ids: list[int] = []
    with session_scope(sessions) as session:
        for plan in plans:
            known = [s for s in plan.series if s.series_id is not None and s.problem is None]
            still_missing = missing_files(
                session, [s.series_id for s in known if s.series_id is not None], files
            )
            for series in known:
                lost = still_missing.get(series.series_id or 0, 0)
                if lost:
                    series.problem = f"{lost} instance file(s) still missing after retrieval"
            reopen = [s for s in known if s.problem is None]
            # Series only the PACS had are new to the index: the router takes them as it takes any arrival.
            fetched: dict[str, int] = {}
            for series in plan.series:
                if series.series_id is None and series.problem is None and series.retrieved:
                    found = session.scalar(
                        select(Series.id).where(Series.series_instance_uid == series.series_instance_uid)
                    )
                    if found is None:
                        series.problem = "retrieved, but not in the index (refused? see `pacs-ai audit`)"
                    else:
                        fetched[series.series_instance_uid] = found
            if not reopen and not fetched:
                continue
            reopen_series(
                session,
                plan.study_instance_uid,
                [s.series_id for s in reopen if s.series_id is not None],
                actor=actor,
                detail={
                    "retrieved_from": plan.peer,
                    "retrieved_instances": sum(s.retrieved for s in plan.series),
                    "new_series": list(fetched),
                },
            )
            for series in reopen:
                series.reopened = True
            series_ids += [s.series_id for s in reopen if s.series_id is not None] + list(fetched.values())
    return series_ids


def _wait(
    sessions: sessionmaker[Session], series_ids: list[int], after_job_id: int, timeout: float, show: bool
) -> ReprocessProgress | None:
    """Follow the new jobs and deliveries until done; None if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show) as bar:
        task = bar.add_task("waiting for the router", total=None)
        while True:
            with session_scope(sessions) as session:
                progress = reprocess_progress(session, series_ids, after_job_id)
            pending = progress.deliveries.get(DeliveryState.PENDING.value, 0)
            if progress.undecided_series:
                description = f"waiting for the router ({progress.undecided_series} series)"
            elif progress.jobs_finished < progress.jobs_total:
                description = "analysing"
            else:
                description = f"delivering ({pending} pending)" if pending else "done"
            bar.update(
                task,
                description=description,
                total=progress.jobs_total or None,
                completed=progress.jobs_finished,
            )
            if progress.done:
                return progress
            if time.monotonic() >= deadline:
                return None
            time.sleep(1.0)


def _print_plan(plans: list[StudyPlan]) -> None:
    from rich.table import Table

    table = Table(title="Reprocess")
    for column in (
        "study",
        "accession",
        "source",
        "series",
        "modality",
        "instances",
        "missing",
        "retrieved",
        "reopened",
        "problem",
    ):
        table.add_column(column)
    for plan in plans:
        for series in plan.series or [SeriesPlan("(no series)", None, None)]:
            table.add_row(
                plan.study_instance_uid,
                plan.accession_number or "",
                plan.source,
                series.series_instance_uid,
                series.modality or "",
                "" if series.instances is None else str(series.instances),
                str(series.missing_files),
                str(series.retrieved),
                "yes" if series.reopened else "",
                series.problem or "",
            )
    print_table(table)


def reprocess(
    ctx: typer.Context,
    study_uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs.")] = None,
    accession: Annotated[
        list[str] | None, typer.Option("--accession", help="Accession number (repeatable).")
    ] = None,
    date_from: Annotated[
        str | None, typer.Option("--from", help="First study date, YYYY-MM-DD (inclusive).")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", help="Last study date, YYYY-MM-DD (inclusive).")
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Only series of this modality, e.g. CT.")
    ] = None,
    pacs: Annotated[
        str | None, typer.Option("--pacs", help="The query_retrieve PACS to use (default: all, in order).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the new jobs and deliveries to the end.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds --wait waits at most.")] = 1800,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be done.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Analyse studies again as new result versions, retrieving from the PACS what the spool lost."""
    settings = settings_of(ctx)
    study_uids, accessions = list(study_uids or []), list(accession or [])
    study_dates: tuple[str | None, str | None] | None = None
    if date_from or date_to:
        try:
            study_dates = (
                dicom_date(date_from) if date_from else None,
                dicom_date(date_to) if date_to else None,
            )
            date_range(*study_dates)
        except ValueError as exc:
            raise _usage(f"--from/--to: {exc}") from None
    if not (study_uids or accessions or study_dates):
        raise _usage("name studies by Study Instance UID, --accession, or a --from/--to date range")
    if pacs is not None and pacs not in settings.query_retrieve:
        raise _usage(f"--pacs {pacs!r} is not configured (query_retrieve: {sorted(settings.query_retrieve)})")

    show = not as_json and console.is_terminal
    sessions = index_sessions(settings)
    clients = _clients(settings, pacs)
    problems: list[str] = []
    files = HostFiles(settings)
    plans = _resolve(
        sessions,
        clients,
        files,
        study_uids=study_uids,
        accessions=accessions,
        study_dates=study_dates,
        modality=modality,
        problems=problems,
    )
    report: dict[str, Any] = {"dry_run": dry_run, "studies": [], "problems": problems}
    if not plans:
        problems.append("no matching study in the index or in the PACS")
    elif not dry_run:
        with session_scope(sessions) as session:
            after_job_id = last_job_id(session)  # jobs the router opens from now on are this reprocess's
        _retrieve(settings, clients, plans, show=show, plain=not as_json and not show)
        series_ids = _reopen(sessions, plans, cli_actor(), files)
        report["retrieved_instances"] = sum(s.retrieved for p in plans for s in p.series)
        problems += [
            f"series {s.series_instance_uid}: {s.problem}" for p in plans for s in p.series if s.problem
        ]
        if wait and series_ids:
            progress = _wait(sessions, series_ids, after_job_id, timeout, show)
            with session_scope(sessions) as session:
                report["jobs"] = new_versions(session, series_ids, after_job_id)
            if progress is None:
                problems.append(f"not finished within {timeout:g} s (is `pacs-ai serve` running?)")
            else:
                if progress.jobs.get(JobState.FAILED.value):
                    problems.append(
                        f"{progress.jobs[JobState.FAILED.value]} job(s) failed (pacs-ai jobs list)"
                    )
                if progress.deliveries.get(DeliveryState.FAILED.value):
                    problems.append("some results could not be delivered (pacs-ai jobs list --state failed)")
    report["studies"] = [plan.as_dict() for plan in plans]

    if as_json:
        print_json(report)
    else:
        if plans:
            _print_plan(plans)
        for job in report.get("jobs", []):
            replaced = sum(len(r["replaces"]) for r in job["results"])
            console.print(
                f"job {job['job']} ({job['profile']}/{job['analyzer']} v{job['version']}): {job['state']}"
                + (f", replaces {replaced} earlier result(s)" if replaced else "")
            )
        for problem in problems:
            console.print(f"[red]problem[/red] {problem}")
        if plans and not dry_run and not wait:
            console.print("reopened: the running service analyses the series again (follow with --wait)")
    raise typer.Exit(1 if problems or not plans else 0)
