"""The peak resident memory of one stretch of work in this process (a job), not the process's lifetime high.

``getrusage(RUSAGE_SELF).ru_maxrss`` only ever grows, so in a worker that
has run a large model once every later job would report that model's peak.
Linux keeps a resettable high-water mark instead: writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current resident size
(Linux 4.0+), and ``/proc/self/status`` reports it.  Where that is not
available the lifetime high is used, and :func:`peak_is_per_job` says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak() -> bool:
    """Start a new high-water mark at the current resident size; False where the kernel cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The resident high-water mark since :func:`reset_peak` (else since the process started), MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
