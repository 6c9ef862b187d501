"""The ``pacs-ai`` command line: one tool for running and administering pacs-ai.

Every listing verb takes ``--json`` for scripts.  Exit codes: 0 success,
1 the thing asked about is in a bad state (e.g. invalid profiles), 2 usage
errors (from Typer/Click).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import __version__
from pacs_ai.cli import admin
from pacs_ai.cli.models import models_app
from pacs_ai.cli.rules import rules_app
from pacs_ai.cli.users import users_app
from pacs_ai.cli.worklist import worklist_app
from pacs_ai.config import Settings, load_settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Delivery, DeliveryState, Instance, Job, JobState, Result, Series, Study

app = typer.Typer(help="pacs-ai: PACS-integrated AI pipeline.", no_args_is_help=True)
profiles_app = typer.Typer(help="Processing profiles (dicom_profiles/*.yaml).", no_args_is_help=True)
studies_app = typer.Typer(help="Studies in the index.", no_args_is_help=True)
jobs_app = typer.Typer(help="Analysis jobs.", no_args_is_help=True)
db_app = typer.Typer(help="The index database.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
app.add_typer(studies_app, name="studies")
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(rules_app, name="rules")
app.add_typer(users_app, name="users")
app.add_typer(worklist_app, name="worklist")

console = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file (else PACS_AI_CONFIG_FILE).")
    ] = None,
) -> None:
    ctx.obj = load_settings(config)


@app.command()
def version() -> None:
    """Print the pacs-ai version."""
    console.print(__version__)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run listener, workers, broker (embedded unless configured) and scheduler until stopped."""
    from pacs_ai.service import serve as run_service

    run_service(_settings(ctx))


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the index database schema."""
    upgrade_schema(_settings(ctx).effective_database_url)
    console.print("index database is up to date")


@profiles_app.command("validate")
def profiles_validate(
    ctx: typer.Context,
    directory: Annotated[
        Path | None, typer.Argument(help="Profiles directory (default: configured).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check every profile file; report all problems with file names; exit 1 if any."""
    from pacs_ai.analyze.registry import available_analyzers
    from pacs_ai.route.profiles import ProfileError, load_profiles

    settings = _settings(ctx)
    directory = directory or settings.profiles_dir
    problems: list[str] = []
    profiles = []
    try:
        profiles = load_profiles(directory)
    except ProfileError as exc:
        problems.extend(str(exc).splitlines())
    known_analyzers = set(available_analyzers())
    for profile in profiles:
        for step in profile.analyzers:
            if step.name not in known_analyzers:
                problems.append(
                    f"{profile.name}: unknown analyzer {step.name!r} (known: {sorted(known_analyzers)})"
                )
        for destination in profile.destinations:
            if destination not in settings.destinations:
                problems.append(
                    f"{profile.name}: destination {destination!r} is not configured "
                    f"(configured: {sorted(settings.destinations)}); results would stay undelivered"
                )
    if as_json:
        print(
            json.dumps(
                {"directory": str(directory), "profiles": [p.name for p in profiles], "problems": problems},
                indent=2,
            )
        )
    else:
        for profile in profiles:
            console.print(f"[green]ok[/green] {profile.name}: {profile.description}")
        for problem in problems:
            console.print(f"[red]problem[/red] {problem}")
    raise typer.Exit(1 if problems else 0)


def _sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on an existing index; exit 1 with a clear message where there is none yet."""
    url = settings.effective_database_url
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        console.print(
            f"[red]no index database at {url.split('///', 1)[-1]}[/red]: pacs-ai has not run with this "
            "data directory (PACS_AI_DATA_DIR) yet; start it with `pacs-ai serve` or create the schema "
            "with `pacs-ai db upgrade`"
        )
        raise typer.Exit(1)
    return make_session_factory(make_engine(url))


def _print_rows(rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    console.print(table)


@app.command()
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Service processes, index counts, job states and free disk space."""
    settings = _settings(ctx)
    run_file = settings.data_dir / "run" / "service.json"
    service = json.loads(run_file.read_text()) if run_file.is_file() else None
    with session_scope(_sessions(settings)) as session:
        counts = {
            "studies": session.scalar(select(func.count(Study.id))),
            "series": session.scalar(select(func.count(Series.id))),
            "instances": session.scalar(select(func.count(Instance.id))),
        }
        jobs = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
        deliveries = dict(
            session.execute(select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)).all()
        )
    free = shutil.disk_usage(settings.data_dir).free if settings.data_dir.exists() else None
    ready_dir = settings.data_dir / "run" / "worker-ready"
    workers_ready = sorted(p.name for p in ready_dir.iterdir()) if service and ready_dir.is_dir() else []
    report = {
        "service": service,
        "workers_ready": workers_ready,
        "data_dir": str(settings.data_dir),
        "free_disk_mb": None if free is None else free // (1024 * 1024),
        "index": counts,
        "jobs": {str(state.value): n for state, n in jobs.items()},
        "deliveries": {str(state.value): n for state, n in deliveries.items()},
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"service: {'running, pid ' + str(service['service_pid']) if service else 'not running'}")
    for key in ("workers_ready", "data_dir", "free_disk_mb", "index", "jobs", "deliveries"):
        console.print(f"{key}: {report[key]}")


@studies_app.command("list")
def studies_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Studies with their AI priority and series count (no patient names).

    STAT studies first, then URGENT, then the rest; newest first within each.
    """
    from pacs_ai.index.models import StudyPriority

    urgent_first = {StudyPriority.STAT.value: 0, StudyPriority.URGENT.value: 1}
    with session_scope(_sessions(_settings(ctx))) as session:
        rows = [
            {
                "study_instance_uid": uid,
                "accession_number": accession,
                "ai_priority": priority,
                "ai_priority_reason": reason,
                "series": n,
                "first_received_at": at,
            }
            for uid, accession, priority, reason, n, at in session.execute(
                select(
                    Study.study_instance_uid,
                    Study.accession_number,
                    Study.ai_priority,
                    Study.ai_priority_reason,
                    func.count(Series.id),
                    Study.first_received_at,
                )
                .join(Series, Series.study_fk == Study.id, isouter=True)
                .group_by(Study.id)
                .order_by(Study.first_received_at.desc(), Study.id.desc())
            ).all()
        ]
    # Stable sort: the query's newest-first order holds within each priority.
    rows.sort(key=lambda row: urgent_first.get(str(row["ai_priority"]), len(urgent_first)))
    _print_rows(
        rows,
        [
            "study_instance_uid",
            "accession_number",
            "ai_priority",
            "ai_priority_reason",
            "series",
            "first_received_at",
        ],
        "Studies",
        as_json,
    )


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    state: Annotated[
        JobState | None,
        typer.Option(
            help="Only jobs in this state; 'failed' also lists jobs whose results could not be delivered."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Jobs, newest first, with their state, error reason and the state of their deliveries."""
    with session_scope(_sessions(_settings(ctx))) as session:
        delivery_counts: dict[int, dict[str, int]] = {}
        for job_id, delivery_state, count in session.execute(
            select(Result.job_fk, Delivery.state, func.count(Delivery.id))
            .join(Delivery, Delivery.result_fk == Result.id)
            .group_by(Result.job_fk, Delivery.state)
        ).all():
            delivery_counts.setdefault(job_id, {})[delivery_state.value] = count
        query = select(Job, Series.series_instance_uid).join(Series, Series.id == Job.series_fk)
        rows = []
        for job, series_uid in session.execute(query.order_by(Job.id.desc())).all():
            deliveries = delivery_counts.get(job.id, {})
            undelivered = deliveries.get(DeliveryState.FAILED.value, 0) > 0
            if state is not None and not (job.state == state or (state == JobState.FAILED and undelivered)):
                continue
            rows.append(
                {
                    "id": job.id,
                    "series_instance_uid": series_uid,
                    "profile": job.profile,
                    "analyzer": job.analyzer,
                    "version": job.version,
                    "state": job.state.value,
                    "attempts": job.attempts,
                    "deliveries": deliveries,
                    "error": job.error or (_delivery_error(session, job.id) if undelivered else None),
                }
            )
    _print_rows(
        rows,
        ["id", "series_instance_uid", "profile", "analyzer", "version", "state", "deliveries", "error"],
        "Jobs",
        as_json,
    )


def _delivery_error(session: Session, job_id: int) -> str | None:
    """The last error of a job's failed delivery, e.g. the destination that refused or was down."""
    row = session.execute(
        select(Delivery.destination, Delivery.last_error)
        .join(Result, Result.id == Delivery.result_fk)
        .where(Result.job_fk == job_id, Delivery.state == DeliveryState.FAILED)
        .order_by(Delivery.id.desc())
        .limit(1)
    ).first()
    return None if row is None else f"delivery to {row[0]} failed: {row[1]}"


# The administrator verbs come after the ones above in --help.
admin.register(app)

if __name__ == "__main__":
    app()
