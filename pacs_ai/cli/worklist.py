"""``pacs-ai worklist serve``: run the radiologist worklist web app."""

from __future__ import annotations

from typing import Annotated

import typer

from pacs_ai.cli.common import console, settings_of
from pacs_ai.index.db import upgrade_schema

worklist_app = typer.Typer(help="The radiologist worklist web app.", no_args_is_help=True)


@worklist_app.command("serve")
def worklist_serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = 8080,
    fhir_endpoint: Annotated[
        str | None, typer.Option("--fhir-endpoint", help="FHIR R4 base URL to POST signed reports to.")
    ] = None,
    secure_cookies: Annotated[
        bool, typer.Option("--secure-cookies", help="Session cookie over HTTPS only (behind a TLS proxy).")
    ] = False,
) -> None:
    """Serve the worklist until stopped (the index schema is brought up to date first)."""
    import uvicorn

    from pacs_ai.worklist import WorklistOptions, create_app

    settings = settings_of(ctx)
    upgrade_schema(settings.effective_database_url)
    app = create_app(settings, WorklistOptions(fhir_endpoint=fhir_endpoint, secure_cookies=secure_cookies))
    console.print(f"worklist on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), proxy_headers=False)
