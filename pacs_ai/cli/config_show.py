"""``pacs-ai config show``: the settings this command runs with, and where each came from."""

from __future__ import annotations

import json
from typing import Any

import typer
from pydantic import SecretStr
from pydantic_core import to_jsonable_python
from rich.markup import escape

from pacs_ai.cli.common import JsonOption, console, print_json, settings_of
from pacs_ai.config import setting_origins

config_app = typer.Typer(help="The settings every command uses.", no_args_is_help=True)

#: How a secret is printed: whether it is set shows, its value never does.
MASK = "**********"

#: ``ctx.meta`` keys the top-level callback fills (see ``pacs_ai.cli.main``).
INHERITED_KEY = "pacs_ai.inherited_settings"
NEEDS_SECRET_KEY = "pacs_ai.settings_needing_secrets"


def masked(value: Any) -> Any:
    """``model_dump()`` output with every secret replaced by :data:`MASK`."""
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Print the effective settings, where each came from, secrets as **********.

    Sources, strongest first: environment (PACS_AI_*), the YAML file (--config or
    PACS_AI_CONFIG_FILE), the running service's record in the data directory
    (what `pacs-ai serve` was given), the defaults.
    """
    settings = settings_of(ctx)
    meta = ctx.find_root().meta
    origins = setting_origins(settings, meta.get(INHERITED_KEY, ()))
    values = to_jsonable_python(masked(settings.model_dump()))
    needing_secrets: list[str] = meta.get(NEEDS_SECRET_KEY, [])
    if as_json:
        print_json(
            {
                "settings": {name: {"value": values[name], "from": origins[name]} for name in values},
                "not_taken_from_service": needing_secrets,
            }
        )
        return
    for name, value in values.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        console.print(f"{name} = {escape(shown)}  [dim]({escape(origins[name])})[/dim]", highlight=False)
    for name in needing_secrets:
        console.print(
            f"[yellow]note[/yellow] the running service has {name}, which needs a secret its record "
            "leaves out: give it here by environment (PACS_AI_*) or --config"
        )
