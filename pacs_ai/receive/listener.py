"""The DICOM listener: C-ECHO and C-STORE SCP for all storage SOP classes.

An instance is acknowledged with Success only after its file is fsynced in the
spool and its row is committed in the index (:mod:`pacs_ai.receive.store`).

Several listener processes accept from one listening socket opened by the
supervisor: a Python process is held by the GIL to about one core, and a free
process takes the next association.  Each process serves each of its
associations on a thread of its own (:mod:`pacs_ai.receive.server`); data sets
are streamed to a temporary file in the spool as they arrive, never held whole
in memory.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from pacs_ai.config import Settings
from pacs_ai.process import SignalledStop, StopRequest, start_child_of_serve
from pacs_ai.receive.acceptor import AcceptorPolicy
from pacs_ai.receive.balance import ListenerLoad
from pacs_ai.receive.health import listener_state_file
from pacs_ai.receive.security import open_listener_warning, server_tls_context
from pacs_ai.receive.server import AssociationServer, ServerOptions
from pacs_ai.receive.store import StoreHandler
from pacs_ai.sockets import bind_listening_socket

log = logging.getLogger(__name__)

#: How long a stopping listener lets associations in progress finish.
SHUTDOWN_GRACE_SECONDS = 10.0


def open_listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen once, in the supervisor; every listener process accepts from it.

    Processes waiting on one shared socket take connections as they become
    free, the least busy first (:mod:`pacs_ai.receive.balance`), which spreads
    associations over processes far more evenly than SO_REUSEPORT's hashing
    (where two of four associations often land on the same process while
    another idles).  The socket is non-blocking so that processes losing the
    race for a connection go back to waiting.
    """
    listening = bind_listening_socket(
        host, port, purpose="listen", advice="is another DICOM service using it?", backlog=backlog
    )
    listening.setblocking(False)
    return listening


def acceptor_policy(settings: Settings) -> AcceptorPolicy:
    """Who may associate: the called AE title must be ours, the calling one a known peer (if named)."""
    return AcceptorPolicy(
        ae_title=settings.ae_title,
        allowed_calling_ae_titles=tuple(settings.allowed_calling_ae_titles),
        maximum_pdu_length=settings.maximum_pdu_bytes,
        known_peers=tuple(settings.known_peers),
    )


def server_options(settings: Settings) -> ServerOptions:
    """The listener's limits and timers, from the settings."""
    return ServerOptions(
        state_file=listener_state_file(settings, os.getpid()),
        acse_timeout=settings.association_negotiation_timeout_seconds,
        idle_timeout=settings.association_idle_timeout_seconds,
        maximum_associations=settings.maximum_associations,
        maximum_associations_per_address=settings.maximum_associations_per_address,
        maximum_negotiating=settings.maximum_negotiating_connections,
        maximum_instance_bytes=settings.maximum_instance_mb * 1024 * 1024,
    )


def open_tls_socket(settings: Settings) -> socket.socket | None:
    """The DICOM TLS port's own listening socket, when it is set apart from the plain port.

    Every listener process binds it with SO_REUSEPORT (the kernel spreads TLS
    connections over them); None when TLS is off or shares ``listen_port``.
    """
    tls = settings.listener_tls
    if tls is None or tls.port is None or tls.port == settings.listen_port:
        return None
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listening.bind((settings.listen_host, tls.port))
    except OSError as exc:
        listening.close()
        raise OSError(f"cannot listen for DICOM TLS on {settings.listen_host}:{tls.port}: {exc}") from exc
    listening.listen(128)
    listening.setblocking(False)
    return listening


def serve(
    settings: Settings,
    stop: StopRequest | None = None,
    listening_socket: socket.socket | None = None,
    load: ListenerLoad | None = None,
) -> None:
    """Run one listener until SIGTERM/SIGINT (or ``stop`` is set).

    ``listening_socket`` is the socket shared by all listener processes; alone,
    the listener opens its own.  ``load`` is this process's slot in the
    association counts shared with the others (:mod:`pacs_ai.receive.balance`).
    """
    if listening_socket is None:
        listening_socket = open_listening_socket(settings.listen_host, settings.listen_port)
    if stop is None:  # running as a process of its own: stop on SIGTERM/SIGINT
        stop = SignalledStop()

    tls_context = server_tls_context(settings.listener_tls) if settings.listener_tls else None
    tls_socket = open_tls_socket(settings)
    handler = StoreHandler(settings)
    # A listener process killed with associations open left their series marked as being received.
    handler.interrupt_dead_associations()
    server = AssociationServer(
        handler,
        acceptor_policy(settings),
        listening_socket,
        server_options(settings),
        load,
        tls_context=tls_context,
        tls_socket=tls_socket,
    )
    warning = open_listener_warning(settings.listen_host, settings.known_peers)
    if warning:
        log.warning("SECURITY: %s", warning)
    log.info(
        "DICOM listener pid %d: AE %s on %s:%d%s, spool %s",
        os.getpid(),
        settings.ae_title,
        settings.listen_host,
        settings.listen_port,
        _tls_description(settings),
        settings.spool_dir,
    )
    # Stop accepting when asked, then give associations in progress a moment to
    # finish: what they have not had acknowledged, their senders will send again.
    try:
        server.serve(stop, SHUTDOWN_GRACE_SECONDS)
    finally:
        if tls_socket is not None:
            tls_socket.close()
    log.info("DICOM listener pid %d stopped", os.getpid())


def _tls_description(settings: Settings) -> str:
    tls = settings.listener_tls
    if tls is None:
        return ""
    mutual = ", client certificates required" if tls.ca_file else ""
    if tls.port is None or tls.port == settings.listen_port:
        return f" (TLS only{mutual})"
    return f" and TLS on {tls.port}{mutual}"


def main(argv: list[str] | None = None) -> None:
    """Entry point of a listener process of ``pacs-ai serve``.

    ``python -m pacs_ai.receive.listener`` is a fresh interpreter that imports
    the listener's modules only; a multiprocessing child would first import
    the ``pacs-ai`` command's main module, and with it Celery, highdicom and
    FastAPI (about 110 MB more in every listener process).  The settings come
    from the supervisor's environment (``PACS_AI_SETTINGS_JSON``).
    """
    parser = argparse.ArgumentParser(description="pacs-ai DICOM listener process (started by pacs-ai serve)")
    parser.add_argument("--socket-fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--loads-fd", type=int, required=True, help="inherited association counts")
    parser.add_argument("--slot", type=int, required=True, help="this process's index among the listeners")
    arguments, settings = start_child_of_serve(parser, argv, "pacs-ai.log")
    serve(
        settings,
        listening_socket=socket.socket(fileno=arguments.socket_fd),
        load=ListenerLoad.attach(arguments.loads_fd, arguments.slot),
    )


if __name__ == "__main__":
    main()
