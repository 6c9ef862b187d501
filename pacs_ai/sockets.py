"""Listening TCP sockets, bound by the supervisor and handed to the processes that serve them."""

from __future__ import annotations

import socket

__all__ = ["bind_listening_socket"]


def bind_listening_socket(
    host: str, port: int, *, purpose: str, advice: str, backlog: int = 128
) -> socket.socket:
    """A TCP socket listening on ``host:port`` (IPv6 when the host has a colon).

    Binding in the supervisor, before any child starts, makes a taken port a
    start-up error that names the address (``cannot <purpose> on host:port:
    <why> (<advice>)``) instead of a child that dies later.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as exc:
        listening.close()
        raise OSError(f"cannot {purpose} on {host}:{port}: {exc} ({advice})") from exc
    listening.listen(backlog)
    return listening
