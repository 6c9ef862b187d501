"""``pacs-ai rules``: validate the routing rules and show which rules a study or file would match, and why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_json, settings_of
from pacs_ai.index.db import session_scope
from pacs_ai.ops.rules import SeriesSample, explain_rules, samples_from_index
from pacs_ai.route.profiles import ProfileError, load_profiles
from pacs_ai.route.rules import (
    ForwardOriginalsAction,
    ForwardResultsAction,
    ProcessAction,
    RulesError,
    RuleSet,
    facts_from_dataset,
    find_rules_file,
    load_rules,
)
from pacs_ai.storage.files import HostFiles

rules_app = typer.Typer(help="Routing rules (rules.yaml next to the profiles).", no_args_is_help=True)

RulesFileOption = Annotated[
    Path | None, typer.Option("--rules", help="Rules file (default: rules.yaml in the profiles directory).")
]


def _rules_file(ctx: typer.Context, given: Path | None) -> Path:
    path = given or find_rules_file(settings_of(ctx).profiles_dir)
    if path is None or not path.is_file():
        where = given or settings_of(ctx).profiles_dir / "rules.yaml"
        console.print(f"[red]no rules file at {where}[/red] (give one with --rules)")
        raise typer.Exit(1)
    return path


def _load(path: Path) -> RuleSet:
    try:
        return load_rules(path)
    except RulesError as exc:
        for line in str(exc).split("; "):
            console.print(f"[red]problem[/red] {line}")
        raise typer.Exit(1) from exc


def reference_problems(rules: RuleSet, profile_names: set[str], destinations: set[str]) -> list[str]:
    """Profiles and destinations that rules name but that are not configured."""
    problems: list[str] = []
    for rule in rules.rules:
        for action in rule.actions:
            if isinstance(action, ProcessAction) and action.process not in profile_names:
                problems.append(f"rule {rule.name}: profile {action.process!r} does not exist")
            if isinstance(action, ForwardOriginalsAction | ForwardResultsAction):
                targets = (
                    action.forward_originals
                    if isinstance(action, ForwardOriginalsAction)
                    else action.forward_results
                )
                problems.extend(
                    f"rule {rule.name}: destination {name!r} is not configured"
                    for name in targets
                    if name not in destinations
                )
    return problems


@rules_app.command("validate")
def validate(ctx: typer.Context, rules_file: RulesFileOption = None) -> None:
    """Check the rules file, and that the profiles and destinations it names exist."""
    settings = settings_of(ctx)
    path = _rules_file(ctx, rules_file)
    rules = _load(path)
    try:
        profile_names = {profile.name for profile in load_profiles(settings.profiles_dir)}
    except ProfileError as exc:
        console.print(f"[red]problem[/red] profiles: {exc}")
        raise typer.Exit(1) from exc
    problems = reference_problems(rules, profile_names, set(settings.destinations))
    for rule in rules.rules:
        tags = ", ".join(
            t for t in ("fallback" if rule.fallback else "", "shadow" if rule.shadow else "") if t
        )
        console.print(f"[green]ok[/green] {rule.name}{f' ({tags})' if tags else ''}")
    for problem in problems:
        console.print(f"[red]problem[/red] {problem}")
    raise typer.Exit(1 if problems else 0)


def _samples_from_files(target: Path, calling_ae: str | None, peer: str | None) -> Iterator[SeriesSample]:
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    seen: set[str] = set()
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        series_uid = str(header.get("SeriesInstanceUID", "") or path.name)
        if series_uid not in seen:
            seen.add(series_uid)
            yield SeriesSample(
                series_uid, facts_from_dataset(header, calling_ae_title=calling_ae, peer_address=peer)
            )


def _samples_from_index(ctx: typer.Context, study_uid: str, peer: str | None) -> list[SeriesSample]:
    settings = settings_of(ctx)
    with session_scope(index_sessions(settings)) as session:
        return samples_from_index(session, HostFiles(settings), study_uid, peer)


@rules_app.command("test")
def test(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(help="A DICOM file or folder, or a Study Instance UID / accession.")
    ],
    rules_file: RulesFileOption = None,
    calling_ae: Annotated[str | None, typer.Option(help="Calling AE title to assume for files.")] = None,
    peer_address: Annotated[str | None, typer.Option(help="Sender IP address to assume.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show which rules match each series of TARGET, and why; nothing is changed or sent."""
    rules = _load(_rules_file(ctx, rules_file))
    path = Path(target)
    samples = (
        list(_samples_from_files(path, calling_ae, peer_address))
        if path.exists()
        else _samples_from_index(ctx, target, peer_address)
    )
    if not samples:
        console.print(
            f"[red]nothing to test[/red]: {target} is neither readable DICOM nor a study in the index"
        )
        raise typer.Exit(1)
    report = explain_rules(rules, samples)
    if as_json:
        print_json(report)
        return
    for entry in report:
        applied = ", ".join(entry["applied"]) or "none"
        console.print(f"[bold]series {entry['series_instance_uid']}[/bold]: applies {applied}")
        if entry["shadow"]:
            console.print(f"  shadow rules that would apply: {', '.join(entry['shadow'])}")
        for line in entry["explanation"]:
            console.print(f"  {line}", markup=False)
