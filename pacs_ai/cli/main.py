"""The ``pacs-ai`` command line: one tool for running and administering pacs-ai.

Every listing verb takes ``--json`` for scripts.  Exit codes: 0 success,
1 the thing asked about is in a bad state (e.g. invalid profiles), 2 usage
errors (from Typer/Click).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_ai import __version__
from pacs_ai.cli import admin
from pacs_ai.cli.common import (
    WIDE_OUTPUT,
    JsonOption,
    console,
    err_console,
    index_sessions,
    print_json,
    print_rows,
    settings_of,
)
from pacs_ai.cli.config_show import INHERITED_KEY, NEEDS_SECRET_KEY, config_app
from pacs_ai.cli.demo import demo
from pacs_ai.cli.models import models_app
from pacs_ai.cli.purge import purge
from pacs_ai.cli.reports import drafts_app, reports_app
from pacs_ai.cli.reprocess import reprocess
from pacs_ai.cli.rules import rules_app
from pacs_ai.cli.status import status
from pacs_ai.cli.studies import studies_app
from pacs_ai.cli.users import users_app
from pacs_ai.cli.worker import worker, workers_app
from pacs_ai.cli.worklist import worklist_app
from pacs_ai.config import SETTINGS_FILE_ENV, inherit_service_settings, load_settings
from pacs_ai.index.db import session_scope, upgrade_schema
from pacs_ai.index.models import Delivery, DeliveryState, Job, JobState, Result, Series

app = typer.Typer(help="pacs-ai: PACS-integrated AI pipeline.", no_args_is_help=True)
profiles_app = typer.Typer(help="Processing profiles (dicom_profiles/*.yaml).", no_args_is_help=True)
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
app.add_typer(reports_app, name="reports")
app.add_typer(drafts_app, name="drafts")
app.add_typer(config_app, name="config")
app.add_typer(workers_app, name="workers")


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file (else PACS_AI_CONFIG_FILE).")
    ] = None,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide", "-w", help="Print tables whole, as wide as their values (always so through a pipe)."
        ),
    ] = False,
) -> None:
    WIDE_OUTPUT["enabled"] = wide
    settings = load_settings(config)
    # Another shell's command sees what `pacs-ai serve` was given (e.g. destinations by environment);
    # serve itself, and its children (which get the full settings file), do not.
    if ctx.invoked_subcommand != "serve" and not os.environ.get(SETTINGS_FILE_ENV):
        settings, inherited, needing_secrets = inherit_service_settings(settings)
        ctx.meta[INHERITED_KEY], ctx.meta[NEEDS_SECRET_KEY] = inherited, needing_secrets
        if "database_url" in needing_secrets:
            err_console.print(
                "[yellow]note[/yellow]: the running service uses a database_url this shell does not have "
                "(secrets are not recorded): set PACS_AI_DATABASE_URL or use --config"
            )
    ctx.obj = settings


@app.command()
def version() -> None:
    """Print the pacs-ai version."""
    console.print(__version__)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run listener, workers, broker (embedded unless configured) and scheduler until stopped."""
    from pacs_ai.service import serve as run_service

    run_service(settings_of(ctx))


app.command()(status)
app.command()(worker)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the index database schema."""
    upgrade_schema(settings_of(ctx).effective_database_url)
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
    from pacs_ai.route.profiles import ProfileError, analyzer_problems, load_profiles

    settings = settings_of(ctx)
    directory = directory or settings.profiles_dir
    problems: list[str] = []
    profiles = []
    try:
        profiles = load_profiles(directory)
    except ProfileError as exc:
        problems.extend(str(exc).splitlines())
    for profile in profiles:
        # unknown analyzers, and each analyzer's own check of its params (e.g. the model is registered)
        problems.extend(analyzer_problems(profile, settings))
        for destination in profile.destinations:
            if destination not in settings.destinations:
                problems.append(
                    f"{profile.name}: destination {destination!r} is not configured "
                    f"(configured: {sorted(settings.destinations)}); results would stay undelivered"
                )
    if as_json:
        print_json(
            {"directory": str(directory), "profiles": [p.name for p in profiles], "problems": problems}
        )
    else:
        for profile in profiles:
            console.print(f"[green]ok[/green] {profile.name}: {profile.description}")
        for problem in problems:
            console.print(f"[red]problem[/red] {problem}")
    raise typer.Exit(1 if problems else 0)


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
    with session_scope(index_sessions(settings_of(ctx))) as session:
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
    print_rows(
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
app.command()(purge)
app.command()(reprocess)
app.command()(demo)

if __name__ == "__main__":
    app()
