"""Process helpers for the supervisor and its children."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys

from pacs_ai.config import Settings, load_settings
from pacs_ai.logging_setup import configure_logging

_PR_SET_PDEATHSIG = 1


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
    the environment (``PACS_AI_SETTINGS_JSON``) and logs to ``log_name`` in
    the log folder.
    """
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process dies")
    arguments = parser.parse_args(argv)
    die_with_parent(arguments.parent_pid)
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_dir / log_name)
    return arguments, settings
