"""Serving the worklist: one uvicorn process, on its own or as a child of ``pacs-ai serve``.

The settings say where it listens and how (``worklist_*`` in
:class:`~pacs_ai.config.Settings`), for both ways of running it:
``pacs-ai worklist serve`` and the supervisor of ``pacs-ai serve``.  The
supervisor binds the port itself (:func:`bind_worklist_socket`), so a port
already in use stops ``pacs-ai serve`` at start with a clear message, and hands
the socket to each worklist process it (re)starts::

    python -m pacs_ai.worklist.server --fd 5

A child reads its settings as every child of ``pacs-ai serve`` does
(:func:`pacs_ai.config.load_settings`, from the file ``PACS_AI_SETTINGS_FILE`` names).
"""

from __future__ import annotations

import argparse
import logging
import socket

from pacs_ai.config import Settings, revealed
from pacs_ai.process import start_child_of_serve
from pacs_ai.sockets import bind_listening_socket
from pacs_ai.worklist.app import WorklistOptions, create_app

__all__ = ["bind_worklist_socket", "run_worklist", "worklist_options", "worklist_url"]

log = logging.getLogger(__name__)


def worklist_options(settings: Settings, **overrides: object) -> WorklistOptions:
    """The :class:`WorklistOptions` the settings describe; ``overrides`` (command-line options) win."""
    values: dict[str, object] = {
        "secret_key": revealed(settings.worklist_session_secret),
        "fhir_endpoint": settings.worklist_fhir_endpoint,
        "fhir_bearer_token": revealed(settings.worklist_fhir_bearer_token),
        "secure_cookies": settings.worklist_secure_cookies,
        "trusted_proxies": tuple(settings.worklist_trusted_proxies),
        "lockout_failures": settings.worklist_lockout_failures,
        "lockout_minutes": settings.worklist_lockout_minutes,
        "login_attempts_per_minute": settings.worklist_login_attempts_per_minute,
        "organization": settings.worklist_organization,
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    return WorklistOptions(**values)  # type: ignore[arg-type]


def worklist_url(host: str, port: int) -> str:
    """The address to open in a browser (an IPv6 host in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def bind_worklist_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; OSError names the address when it is taken."""
    return bind_listening_socket(
        host,
        port,
        purpose="serve the worklist",
        advice="set PACS_AI_WORKLIST_PORT to a free port, or PACS_AI_WORKLIST_ENABLED=false",
    )


def run_worklist(
    settings: Settings,
    options: WorklistOptions,
    *,
    host: str | None = None,
    port: int | None = None,
    listening: socket.socket | None = None,
) -> None:
    """Serve the worklist until stopped, on ``listening`` or else on ``host:port`` (settings by default)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings, options),
        host=host or settings.worklist_host,
        port=port or settings.worklist_port,
        log_level=settings.log_level.lower(),
        # The root logger is configured by pacs-ai; uvicorn's loggers propagate to it.
        log_config=None,
        proxy_headers=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[listening] if listening is not None else None)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the worklist child process of ``pacs-ai serve``."""
    parser = argparse.ArgumentParser(description="pacs-ai worklist process (started by pacs-ai serve)")
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    arguments, settings = start_child_of_serve(parser, argv, "worklist.log")
    listening = socket.socket(fileno=arguments.fd)
    run_worklist(settings, worklist_options(settings), listening=listening)


if __name__ == "__main__":
    main()
