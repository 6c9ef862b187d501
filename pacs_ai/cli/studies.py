"""``pacs-ai studies list`` and ``pacs-ai studies show``: studies in the index, never with patient names.

``studies show UID_OR_ACCESSION --json`` keys (stable; new keys may be added):
``study`` (``study_instance_uid``, ``accession_number``, ``study_date``, ``study_description``,
``first_received_at``, ``ai_priority``, ``ai_priority_reason``, ``ai_priority_at``), ``series``
(``series_instance_uid``, ``modality``, ``series_description``, ``series_number``, ``instances``,
``purged_instances``, ``last_received_at``, ``calling_ae_title``, ``routing_state``,
``routing_detail``, ``interrupted_at``, ``interrupted_instances``), ``jobs`` (``id``,
``series_instance_uid``, ``profile``, ``analyzer``, ``analyzer_version``, ``version``, ``rule``,
``routing_priority``, ``state``, ``attempts``, ``error``, ``created_at``, ``started_at``,
``finished_at``, ``timings``), ``results`` (``id``, ``job``, ``kind``, ``sop_instance_uid``,
``series_instance_uid``, ``path``, ``purged_at``, ``deliveries``: ``destination``, ``state``,
``attempts``, ``last_status``, ``last_error``, ``sent_at``), ``drafts`` (``id``, ``version``,
``status``, ``backend``, ``model``, ``fallback_reason``, ``created_at``, ``decided_at``,
``decided_by``).  Exit 1 when no study matches, or when an accession number matches several
(name one by its UID).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy import func, select

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_json, print_rows, settings_of
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Series, Study, StudyPriority
from pacs_ai.ops.studies import describe_study  # also imported from here by pacs-ai demo

studies_app = typer.Typer(help="Studies in the index.", no_args_is_help=True)


@studies_app.command("list")
def studies_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Studies with their AI priority and series count (no patient names).

    STAT studies first, then URGENT, then the rest; newest first within each.
    """
    urgent_first = {StudyPriority.STAT.value: 0, StudyPriority.URGENT.value: 1}
    with session_scope(index_sessions(settings_of(ctx))) as session:
        rows = [
            {
                "study_instance_uid": uid,
                "accession_number": accession,
                "ai_priority": priority,
                "ai_priority_reason": reason,
                "series": n,
                "incomplete_series": int(incomplete or 0),
                "first_received_at": at,
            }
            for uid, accession, priority, reason, n, incomplete, at in session.execute(
                select(
                    Study.study_instance_uid,
                    Study.accession_number,
                    Study.ai_priority,
                    Study.ai_priority_reason,
                    func.count(Series.id),
                    # Series an aborted association cut short: held for a resend, or incomplete.
                    func.count(Series.interrupted_at),
                    Study.first_received_at,
                )
                .join(Series, Series.study_fk == Study.id, isouter=True)
                .group_by(Study.id)
                .order_by(Study.first_received_at.desc(), Study.id.desc())
            ).all()
        ]
    # Stable sort: the query's newest-first order holds within each priority.
    rows.sort(key=lambda row: urgent_first.get(str(row["ai_priority"]), len(urgent_first)))
    print_rows(
        rows,
        [
            "study_instance_uid",
            "accession_number",
            "ai_priority",
            "ai_priority_reason",
            "series",
            "incomplete_series",
            "first_received_at",
        ],
        "Studies",
        as_json,
    )


@studies_app.command("show")
def studies_show(
    ctx: typer.Context,
    study: Annotated[str, typer.Argument(help="Study Instance UID or accession number.")],
    as_json: JsonOption = False,
) -> None:
    """One study: its series and routing, jobs, results and deliveries, AI priority and report drafts."""
    with session_scope(index_sessions(settings_of(ctx))) as session:
        matches = list(
            session.scalars(
                select(Study)
                .where((Study.study_instance_uid == study) | (Study.accession_number == study))
                .order_by(Study.id)
            )
        )
        if not matches:
            console.print(
                f"[red]no study {study!r} in the index[/red] (give a Study Instance UID or accession number)"
            )
            raise typer.Exit(1)
        if len(matches) > 1:
            console.print(
                f"[red]accession {study!r} matches {len(matches)} studies[/red]; name one by its UID: "
                + ", ".join(s.study_instance_uid for s in matches)
            )
            raise typer.Exit(1)
        report = describe_study(session, matches[0])
    if as_json:
        print_json(report)
    else:
        _print_study(report)


def _print_study(report: dict[str, Any]) -> None:
    study = report["study"]
    console.print(f"[bold]study {study['study_instance_uid']}[/bold]")
    for key in ("accession_number", "study_date", "study_description", "first_received_at"):
        console.print(f"  {key}: {'' if study[key] is None else study[key]}")
    priority = study["ai_priority"] or "none"
    reason = f" ({study['ai_priority_reason']})" if study["ai_priority_reason"] else ""
    console.print(f"  ai_priority: {priority}{reason}")
    _table(
        "Series",
        [{**series, "interrupted": _interrupted(series)} for series in report["series"]],
        [
            "series_instance_uid",
            "modality",
            "instances",
            "purged_instances",
            "routing_state",
            "interrupted",
            "routing_detail",
        ],
    )
    _table(
        "Jobs",
        [{**job, "timings": _timings(job["timings"])} for job in report["jobs"]],
        ["id", "analyzer", "version", "state", "attempts", "error", "started_at", "finished_at", "timings"],
    )
    _table(
        "Results",
        [
            {
                **result,
                "purged": "yes" if result["purged_at"] else "",
                "deliveries": "; ".join(
                    f"{d['destination']}: {d['state']}"
                    + (f" ({d['last_error']})" if d["state"] != "sent" and d["last_error"] else "")
                    for d in result["deliveries"]
                ),
            }
            for result in report["results"]
        ],
        ["id", "job", "kind", "sop_instance_uid", "purged", "deliveries"],
    )
    _table(
        "Report drafts", report["drafts"], ["id", "version", "status", "backend", "decided_by", "decided_at"]
    )


def _interrupted(series: dict[str, Any]) -> str:
    """What an association that ended without A-RELEASE left of the series ("" when none did)."""
    if series["interrupted_at"] is None:
        return ""
    held = "" if series["routing_state"] == "incomplete" else ", held for a resend"
    return f"aborted after {series['interrupted_instances']} at {series['interrupted_at']:%H:%M:%S}{held}"


def _timings(timings: dict[str, Any] | None) -> str:
    if not timings:
        return ""
    return ", ".join(
        f"{name} {value:.1f}s" if isinstance(value, int | float) else f"{name} {value}"
        for name, value in timings.items()
    )


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if rows:
        print_rows(rows, columns, title, as_json=False)
    else:
        console.print(f"{title}: none")
