"""What new memory costs on this machine, printed beside benchmarks that allocate or write a lot.

On a virtual machine whose balloon device reports free pages (virtio-balloon
free page reporting, as on this project's 2-core machines), memory the guest
frees is handed back to the hypervisor within moments, and the first touch of
such a page (or of one never touched since boot) costs a fault on the host:
filling 8 GB of new memory took 22 s here (2.7 ms per MB) and writing 2 GB of
new page cache 4.6 s, against 0.5 s for the same write once the memory had
been touched and reporting was off.  Every benchmark that writes new files or
allocates new buffers pays it, and more so the peer that writes more: an
object store on the same machine stores each instance a second time, and a
worker on another "host" writes the fetched series into its cache (0.39 s
warm against 0.85-1.09 s cold for the 300-slice CT; see
``benchmarks/README.md``).  :func:`memory_note` says which case a run was in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["first_touch_mb_per_s", "free_page_reporting", "memory_note"]

#: The balloon devices' negotiated feature bits, one character per bit, bit 0 first.
_BALLOONS = Path("/sys/bus/virtio/drivers/virtio_balloon")
#: VIRTIO_BALLOON_F_REPORTING: the guest reports free pages and the host reclaims them.
_REPORTING_BIT = 5
#: A fresh process's time to fill ``mb`` MB of new memory (numpy writes every byte).
_PROBE = (
    "import time, numpy as np; started = time.perf_counter(); "
    "filled = np.ones({mb} << 20, np.uint8); print(time.perf_counter() - started)"
)


def free_page_reporting() -> bool:
    """Whether a balloon device here reports freed memory to the hypervisor."""
    for features in _BALLOONS.glob("virtio*/features"):
        bits = features.read_text().strip()
        if len(bits) > _REPORTING_BIT and bits[_REPORTING_BIT] == "1":
            return True
    return False


def first_touch_mb_per_s(megabytes: int = 1024) -> float:
    """How fast a fresh process fills ``megabytes`` of new memory, in MB/s.

    Large enough that little of it can be memory freed a moment ago (which
    is still fast to touch); run it after the measurements, not before, as
    the memory it frees would make the next run's allocations cheap.
    """
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE.format(mb=megabytes)], capture_output=True, text=True, check=True
    )
    return megabytes / float(probe.stdout)


def memory_note() -> str:
    """One line for a benchmark's output: the first-touch rate and whether free pages are reported."""
    reporting = (
        "free page reporting on: memory freed goes back to the hypervisor and is slow to touch again"
        if free_page_reporting()
        else "no free page reporting"
    )
    return f"new memory: filled at {first_touch_mb_per_s():.0f} MB/s by a fresh process ({reporting})"
