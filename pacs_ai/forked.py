"""Running one function in a forked child process while this process does something else.

A job's SEG and SR are built by pure-Python code (highdicom, pydicom) that
holds the GIL, so threads would take turns instead of using a second core.  A
forked child inherits the in-memory inputs (the volume's headers, the
analyzer's result) without pickling them, does its part and exits; only a
short error text comes back through a pipe.  The child's work must be
self-contained: it writes its output where the parent expects it and touches
no shared state (no index session, no broker connection).

``os.fork`` directly, not :mod:`multiprocessing`: Celery's pool processes
count as daemonic there, and :mod:`multiprocessing` refuses to start children
from those.  The child leaves with ``os._exit`` whatever happens, so it never
runs the parent's exit handlers (Celery's, pytest's) or returns into its code.

Linux only (``fork``), like the rest of the worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

__all__ = ["ForkedCall", "ForkedCallFailed"]

#: Longest error text a failed child sends back, in bytes (one atomic pipe write).
_MAX_ERROR_BYTES = 2000


class ForkedCallFailed(RuntimeError):
    """The child raised (its exception type and message are in the text) or died."""


class ForkedCall:
    """``function()`` started in a forked child; :meth:`wait` returns once it has succeeded.

    Use as a context manager, so the child is killed if the parent gives up
    waiting (an exception, a time limit)::

        with ForkedCall(write_report, name="SR") as child:
            write_segmentation()
            child.wait()
    """

    def __init__(self, function: Callable[[], None], *, name: str) -> None:
        self.name = name
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:
            os.close(read_end)
            _run_child(function, write_end)  # never returns
        os.close(write_end)
        self._pid: int | None = pid
        self._errors = read_end

    def wait(self) -> None:
        """Wait for the child; raise :class:`ForkedCallFailed` with its reason unless it succeeded."""
        if self._pid is None:
            raise RuntimeError(f"{self.name}: the child was already waited for or killed")
        _, status = os.waitpid(self._pid, 0)
        self._pid = None
        code = os.waitstatus_to_exitcode(status)
        reason = os.read(self._errors, _MAX_ERROR_BYTES).decode("utf-8", "replace")
        if code == 0:
            return
        if not reason:
            reason = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
        raise ForkedCallFailed(f"{self.name} (forked child) failed: {reason}")

    def kill(self) -> None:
        """Stop the child if it is still running (the parent no longer wants its result)."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = None

    def __enter__(self) -> ForkedCall:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()
        os.close(self._errors)


def _run_child(function: Callable[[], None], errors: int) -> NoReturn:
    """Body of the child: call ``function``, send an exception's text, and leave with its exit code."""
    code = 1
    try:
        function()
        code = 0
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(errors, f"{type(exc).__name__}: {exc}".encode()[:_MAX_ERROR_BYTES])
    finally:
        os._exit(code)
