"""``pacs-ai purge``: run retention now (see :mod:`pacs_ai.index.retention` for what may go and what stays).

Prints each study that was (or, with ``--dry-run``, would be) purged and each
study kept although it met a limit, with why.  Exit 0 when done, 1 when a file
could not be deleted, 2 when no retention limit is configured or given.

``--json`` keys (stable): ``dry_run``, ``policy`` (``days``, ``high_watermark_percent``,
``low_watermark_percent``), ``disk`` (``total_mb``, ``free_mb``, ``used_percent``),
``watermark_bytes_wanted``, ``watermark_shortfall_bytes``, ``purged`` and ``kept`` (lists of
``study_instance_uid``, ``accession_number``, ``last_received_at``, ``limit``, ``purged``,
``kept_because``, ``instances``, ``bytes``, ``results``, ``objects_deleted``, ``problems``),
``storage_deletions`` (earlier failed deletions from the object store tried again: ``deleted``,
``in_use_again``, ``pending`` with ``count``, ``oldest_failure``, ``last_error``), ``problems``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pacs_ai.cli.common import JsonOption, cli_actor, console, index_sessions, print_json, settings_of
from pacs_ai.index.purge import PurgeOutcome, RetentionRun, plan_now, policy_of, run_retention

MIB = 1024 * 1024


def purge(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be purged; delete nothing.")
    ] = False,
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than", min=0, metavar="DAYS", help="Age limit for this run (else retention_days)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Delete spool files of studies past retention (age, disk watermark); studies still needed are kept."""
    settings = settings_of(ctx)
    policy = policy_of(settings, older_than_days=older_than)
    if not policy.enabled:
        console.print(
            "[red]no retention limit[/red]: give --older-than DAYS, or configure retention_days or "
            "retention_high_watermark_percent"
        )
        raise typer.Exit(2)
    sessions = index_sessions(settings)
    plan = plan_now(sessions, settings, policy)
    total = len(plan.purge) + len(plan.kept)
    if as_json or total == 0:
        run = run_retention(sessions, settings, policy, actor=cli_actor(), dry_run=dry_run, plan=plan)
    else:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("checking" if dry_run else "purging", total=total)

            def advance(_outcome: PurgeOutcome) -> None:
                progress.advance(task)

            run = run_retention(
                sessions, settings, policy, actor=cli_actor(), dry_run=dry_run, plan=plan, on_study=advance
            )
    if as_json:
        print_json(run.as_dict())
    else:
        _print_run(run)
    raise typer.Exit(1 if run.problems else 0)


def _print_run(run: RetentionRun) -> None:
    verb = "would purge" if run.dry_run else "purged"
    for outcome in run.purged:
        console.print(
            f"{verb} {outcome.study_instance_uid} (accession {outcome.accession_number or '-'}, "
            f"last received {outcome.last_received_at:%Y-%m-%d %H:%M}): {outcome.instances} instance(s), "
            f"{outcome.results} result(s), {outcome.bytes / MIB:.1f} MB"
            + (f", {outcome.objects_deleted} object(s) from the store" if outcome.objects_deleted else "")
            + f"; {outcome.limit}"
        )
        for problem in outcome.problems:
            console.print(f"  [red]problem[/red] {problem}")
    for outcome in run.kept:
        console.print(
            f"kept {outcome.study_instance_uid} (accession {outcome.accession_number or '-'}; "
            f"{outcome.limit}): " + "; ".join(outcome.kept_because)
        )
        for problem in outcome.problems:
            console.print(f"  [red]problem[/red] {problem}")
    freed = sum(o.bytes for o in run.purged) / MIB
    console.print(
        f"{len(run.purged)} studies {verb} ({freed:.1f} MB), {len(run.kept)} kept"
        + (" (dry run: nothing deleted)" if run.dry_run else "")
    )
    retried = run.deletions
    if retried.deleted or retried.in_use_again:
        console.print(
            f"deleted {retried.deleted} object(s) earlier passes could not"
            + (f"; {retried.in_use_again} in use again, kept" if retried.in_use_again else "")
        )
    if retried.pending is not None and retried.pending.count:
        console.print(f"[red]problem[/red] {run.problems[-1]}")
    if run.plan.shortfall_bytes:
        console.print(
            "[yellow]the disk stays above the low watermark[/yellow]: "
            f"{run.plan.shortfall_bytes / MIB:.0f} MB more are held by studies that must stay"
        )
