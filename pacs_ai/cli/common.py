"""What every ``pacs-ai`` sub-command shares: the console, ``--json``, settings and index access."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory

console = Console(soft_wrap=True)
#: Notes that must not mix with a command's output (e.g. its JSON).
err_console = Console(stderr=True)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

#: Tables print at their full width, never cut, when true (``pacs-ai --wide``); always when the output
#: is not a terminal, so UIDs piped or redirected can be copied whole.
WIDE_OUTPUT = {"enabled": False}


def cli_actor() -> str:
    """Who runs this command, as the audit trail records it (``cli:<login name>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name for this uid (e.g. a container's)
        return "cli"


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the top-level callback loaded (``--config`` or the environment)."""
    settings: Settings = ctx.find_root().obj
    return settings


def index_sessions(settings: Settings) -> sessionmaker[Session]:
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


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def print_rows(rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool) -> None:
    """Rows as JSON (all keys) or as a table (the given columns)."""
    if as_json:
        print_json(rows)
        return
    table = Table(title=title)
    for column in columns:
        # In a narrow terminal a long value (a UID) folds onto the next line instead of losing its end.
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row[c]) for c in columns))
    print_table(table)


def print_table(table: Table) -> None:
    """Print a table; whole, at its natural width, when ``--wide`` or when output is not a terminal.

    Rich otherwise fits tables into the terminal, or into 80 columns through a
    pipe, which cuts UIDs ("1.2.826.0.…") so they cannot be copied.
    """
    if not WIDE_OUTPUT["enabled"] and console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(max_width=1_000_000), table).maximum
    Console(soft_wrap=True, width=max(natural, 1)).print(table)
