"""``pacs-ai models``: register, list, verify and remove hospital-supplied models.

Exit codes: 0 success, 1 the model is unusable or the operation failed (the
message names the file and key at fault), 2 usage errors (from Typer/Click).
Every change and every verification is recorded in the audit trail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pacs_ai.cli.common import JsonOption, console, print_table, settings_of
from pacs_ai.config import Settings
from pacs_ai.models import ModelError
from pacs_ai.models.store import ModelStore, RegisteredModel

models_app = typer.Typer(
    help="Models the analyzer monai-bundle runs (MONAI bundles, TorchScript).", no_args_is_help=True
)


def _store(ctx: typer.Context) -> tuple[Settings, ModelStore]:
    settings = settings_of(ctx)
    return settings, ModelStore(settings.effective_models_dir)


def _row(model: RegisteredModel) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "kind": m.kind,
        "version": m.version,
        "task": m.task,
        "spatial_dims": m.spatial_dims,
        "files": len(m.files),
        "added_at": m.added_at,
        "path": str(model.directory),
    }


def _fail(message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": message}, indent=2))
    else:
        console.print(f"[red]error[/red] {message}", soft_wrap=True)
    raise typer.Exit(1)


def _audit(settings: Settings, action: str, name: str, detail: dict[str, Any]) -> None:
    """Record in the index's audit trail, creating an embedded (SQLite) index on first use."""
    from pacs_ai.index.audit import record_audit
    from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema

    url = settings.effective_database_url
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        upgrade_schema(url)
    with session_scope(make_session_factory(make_engine(url))) as session:
        record_audit(session, actor="cli", action=action, object_type="model", object_uid=name, detail=detail)


@models_app.command("add")
def models_add(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="Bundle directory, or TorchScript file / its YAML descriptor.")
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Registry name (default: from the model).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Copy a model into the registry and record its file hashes."""
    settings, store = _store(ctx)
    try:
        model = store.add(path, name)
    except ModelError as exc:
        _fail(str(exc), as_json)
        return
    row = _row(model)
    _audit(
        settings,
        "model.added",
        model.name,
        {k: row[k] for k in ("kind", "version", "task")}
        | {"source": model.manifest.source, "manifest_sha256": model.manifest_sha256},
    )
    if as_json:
        print(json.dumps(row, indent=2))
    else:
        console.print(
            f"[green]added[/green] {model.name} ({row['kind']} {row['task']}, {row['spatial_dims']}D, "
            f"version {row['version']}) at {model.directory}"
        )


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Registered models."""
    _, store = _store(ctx)
    try:
        rows = [_row(m) for m in store.models()]
    except ModelError as exc:
        _fail(str(exc), as_json)
        return
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Models in {store.root}")
    columns = ["name", "kind", "version", "task", "spatial_dims", "added_at"]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    print_table(table)


@models_app.command("verify")
def models_verify(
    ctx: typer.Context,
    name: str,
    roi_size: Annotated[
        list[int] | None,
        typer.Option(
            "--roi-size",
            help="Smoke-test with this sliding window (repeat per axis, e.g. --roi-size 64 ...); "
            "faster on a CPU for networks with a large window.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check metadata, hashes, config, network and weights, then a smoke inference; exit 1 on failure."""
    from pacs_ai.models.device import choose_device
    from pacs_ai.models.verify import verify_model

    settings, store = _store(ctx)
    try:
        model = store.get(name)
        device = choose_device(settings.inference_device)
    except (ModelError, ValueError) as exc:
        _fail(str(exc), as_json)
        return
    report = verify_model(model, device, tuple(roi_size) if roi_size else None)
    _audit(
        settings,
        "model.verified",
        name,
        {"ok": report.ok, "failed": [c.name for c in report.checks if not c.ok]},
    )
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        table = Table(title=f"Verification of {name} on {report.device}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for check in report.checks:
            table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAILED[/red]", check.detail)
        print_table(table)
    raise typer.Exit(0 if report.ok else 1)


@models_app.command("labels")
def models_labels(ctx: typer.Context, name: str, as_json: JsonOption = False) -> None:
    """The model's output labels and the codes the shipped table gives them (what a profile may override)."""
    from pacs_ai.models.labels import code_for, is_background
    from pacs_ai.models.store import model_title, output_names

    _, store = _store(ctx)
    try:
        model = store.get(name)
        names, title = output_names(model), model_title(model)
    except ModelError as exc:
        _fail(str(exc), as_json)
        return
    rows: list[dict[str, Any]] = []
    for value, label in sorted(names.items()):
        if model.manifest.task == "segmentation" and (value == 0 or is_background(label)):
            continue
        found = code_for(label, title)
        rows.append(
            {
                "value": value,
                "name": label,
                "label": found.display_label if found else None,
                "type": list(found.type) if found else None,
                "category": list(found.category) if found and found.category else None,
                "source": found.source if found else None,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Labels of {name} ({title})")
    for column in ("value", "name", "code", "source"):
        table.add_column(column)
    for row in rows:
        shown = " ".join(row["type"]) if row["type"] else "[red]no code[/red]"
        source = str(row["source"] or "code it in the profile")
        table.add_row(str(row["value"]), str(row["name"]), shown, source)
    print_table(table)


@models_app.command("remove")
def models_remove(ctx: typer.Context, name: str, as_json: JsonOption = False) -> None:
    """Unregister a model and delete its copy (profiles that name it will fail their jobs)."""
    settings, store = _store(ctx)
    try:
        model = store.remove(name)
    except ModelError as exc:
        _fail(str(exc), as_json)
        return
    _audit(
        settings,
        "model.removed",
        name,
        {"version": model.manifest.version, "manifest_sha256": model.manifest_sha256},
    )
    if as_json:
        print(json.dumps({"ok": True, "removed": name}, indent=2))
    else:
        console.print(f"[green]removed[/green] {name}")
