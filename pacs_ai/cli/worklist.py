"""``pacs-ai worklist serve``: run the radiologist worklist web app on its own.

``pacs-ai serve`` already runs the worklist next to the listener and workers
(``worklist_enabled``); this command is for running it on another machine or
alone.  Address, port and options default to the same settings
(``PACS_AI_WORKLIST_HOST``, ``PACS_AI_WORKLIST_PORT``, ...); options given here win.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pacs_ai.cli.common import console, settings_of
from pacs_ai.index.db import upgrade_schema

worklist_app = typer.Typer(help="The radiologist worklist web app.", no_args_is_help=True)


@worklist_app.command("serve")
def worklist_serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on [default: worklist_host setting].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", help="TCP port [default: worklist_port setting].", min=1, max=65535),
    ] = None,
    fhir_endpoint: Annotated[
        str | None, typer.Option("--fhir-endpoint", help="FHIR R4 base URL to POST signed reports to.")
    ] = None,
    secure_cookies: Annotated[
        bool | None,
        typer.Option("--secure-cookies/--no-secure-cookies", help="Session cookie over HTTPS only."),
    ] = None,
) -> None:
    """Serve the worklist until stopped (the index schema is brought up to date first)."""
    from pacs_ai.logging_setup import configure_logging
    from pacs_ai.worklist.server import run_worklist, worklist_options, worklist_url

    settings = settings_of(ctx)
    configure_logging(settings.log_level, None)
    upgrade_schema(settings.effective_database_url)
    options = worklist_options(settings, fhir_endpoint=fhir_endpoint, secure_cookies=secure_cookies)
    host = host or settings.worklist_host
    port = port or settings.worklist_port
    console.print(f"worklist at {worklist_url(host, port)}")
    run_worklist(settings, options, host=host, port=port)
