"""``pacs-ai reports import`` (past signed reports) and ``pacs-ai drafts stats`` (how drafts fare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pacs_ai.cli.common import (
    JsonOption,
    cli_actor,
    console,
    index_sessions,
    print_json,
    print_rows,
    settings_of,
)
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.report.draft_stats import draft_stats
from pacs_ai.report.signed_reports import FORMATS, ReportImportError, import_reports, read_past_reports

reports_app = typer.Typer(
    help="The site's signed reports, which impression suggestions learn from.", no_args_is_help=True
)
drafts_app = typer.Typer(help="AI report drafts in use.", no_args_is_help=True)


@reports_app.command("import")
def reports_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV, JSON Lines or a FHIR Bundle of DiagnosticReports.")],
    file_format: Annotated[
        str | None, typer.Option("--format", help=f"One of {', '.join(FORMATS)}; guessed when not given.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Load past signed reports (findings and impression) for the retrieval drafter; repeats are skipped."""
    sessions = index_sessions(settings_of(ctx))
    try:
        with session_scope(sessions) as session:
            summary = import_reports(session, read_past_reports(file, file_format))
            record_audit(
                session,
                actor=cli_actor(),
                action="reports.imported",
                object_type="signed_reports",
                detail={"imported": summary.imported, "duplicates": summary.duplicates},
            )
    except (ReportImportError, OSError, UnicodeDecodeError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    result = {
        "imported": summary.imported,
        "duplicates": summary.duplicates,
        "problems": [{"where": p.where, "reason": p.reason} for p in summary.problems],
    }
    if as_json:
        print_json(result)
    else:
        console.print(f"{summary.imported} reports imported, {summary.duplicates} already there")
        for problem in summary.problems:
            console.print(f"[yellow]{problem.where}[/yellow]: {problem.reason}")
    if summary.problems and not summary.imported:
        raise typer.Exit(1)


@drafts_app.command("stats")
def drafts_stats(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Per drafter and model: signed unchanged, edited or rejected; edit distance; guardrail fallbacks."""
    sessions = index_sessions(settings_of(ctx))
    with session_scope(sessions) as session:
        rows = draft_stats(session)
    columns = [
        "drafter",
        "model",
        "drafts",
        "share_signed_unchanged",
        "share_signed_edited",
        "share_rejected",
        "edit_distance_median",
        "guardrail_fallbacks",
    ]
    print_rows(rows, columns, "AI drafts in use", as_json)
