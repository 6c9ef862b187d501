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
    """Who may associate: the called AE title must be ours, the calling one allowed (if restricted)."""
    return AcceptorPolicy(
        ae_title=settings.ae_title,
        allowed_calling_ae_titles=tuple(settings.allowed_calling_ae_titles),
        maximum_pdu_length=0,  # no limit: fewer, larger PDUs; data is streamed to disk anyway
    )


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

    idle = settings.association_idle_timeout_seconds
    options = ServerOptions(acse_timeout=min(idle, ServerOptions.acse_timeout), idle_timeout=idle)
    server = AssociationServer(
        StoreHandler(settings), acceptor_policy(settings), listening_socket, options, load
    )
    log.info(
        "DICOM listener pid %d: AE %s on %s:%d, spool %s",
        os.getpid(),
        settings.ae_title,
        settings.listen_host,
        settings.listen_port,
        settings.spool_dir,
    )
    # Stop accepting when asked, then give associations in progress a moment to
    # finish: what they have not had acknowledged, their senders will send again.
    server.serve(stop, SHUTDOWN_GRACE_SECONDS)
    log.info("DICOM listener pid %d stopped", os.getpid())


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
