"""Process helpers for the supervisor and its children."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import socket
import sys
from types import FrameType
from typing import Protocol

from pacs_ai.config import Settings, load_settings
from pacs_ai.logging_setup import configure_logging

_PR_SET_PDEATHSIG = 1


class StopRequest(Protocol):
    """What a loop that runs until asked to stop needs: :class:`threading.Event` has it."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class SignalledStop:
    """A stop request made by SIGTERM or SIGINT, waited for like a :class:`threading.Event`.

    A Python signal handler runs in the main thread between two bytecodes, also
    in the middle of another handler.  A handler that sets a ``threading.Event``
    takes the Event's lock; a second signal arriving while the first handler
    holds it makes the second handler wait for that lock forever, in the same
    thread.  ``pacs-ai serve`` hung that way, given SIGINT and SIGTERM at about
    the same time.  Here the handler only records the signal, which takes no
    lock; a wait ends as soon as a signal arrives, through the interpreter's
    wakeup descriptor (:func:`signal.set_wakeup_fd`).

    Create it in the main thread (signal handlers can only be set there); it
    replaces any wakeup descriptor set before.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signal: int | None = None
        self._wakeup, wakeup_write = socket.socketpair()
        for end in (self._wakeup, wakeup_write):
            end.setblocking(False)
        self._wakeup_write = wakeup_write  # kept open for as long as this object lives
        signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in signals:
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum

    def is_set(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signal is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) for a signal; whether a stop signal has arrived.

        Any signal with a Python handler ends the wait early, so callers wait in a loop.
        """
        if self.signal is None:
            select.select([self._wakeup], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while self._wakeup.recv(512):
                    pass
        # Python runs a pending handler before the next bytecode after the select returns.
        return self.signal is not None


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).

    If ``pacs-ai serve`` is killed outright (SIGKILL, OOM killer), its
    listeners, workers and embedded broker must not live on unsupervised: an
    orphaned listener would keep accepting instances nobody schedules, and a
    second broker would share the first one's files after a restart.  Usable
    as ``preexec_fn`` of :class:`subprocess.Popen`.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        # The parent died before the request took effect.
        os.kill(os.getpid(), sig)


def start_child_of_serve(
    parser: argparse.ArgumentParser, argv: list[str] | None, log_name: str
) -> tuple[argparse.Namespace, Settings]:
    """What every child process of ``pacs-ai serve`` does first; returns its arguments and settings.

    Adds ``--parent-pid`` to ``parser`` and parses ``argv``, stops with the
    supervisor (:func:`die_with_parent`), takes the supervisor's settings from
    the file ``PACS_AI_SETTINGS_FILE`` names (never from the environment's
    values: secrets stay out of it) and logs to ``log_name`` in the log folder.
    """
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process dies")
    arguments = parser.parse_args(argv)
    die_with_parent(arguments.parent_pid)
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_dir / log_name)
    return arguments, settings
