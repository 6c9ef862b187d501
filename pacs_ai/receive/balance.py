"""Spreading associations evenly over the listener processes that share one socket.

Every listener process waits on the same listening socket and the kernel
wakes them all for a new connection; whichever calls ``accept`` first gets
it.  Left to that race, a process already serving associations often wins
again (the idle one may be woken a few milliseconds late on a busy machine),
and one process ends up with all four associations of a sender while the
other idles.  Measured with DCMTK storescu over 4 associations into 2
processes (files not flushed, to see the listener alone): 375 instances/s
with all four in one process, 440 with three, 500-570 with two each, because
a process is held to one core by the GIL.

So the processes publish how many associations each is serving, in a small
array of shared memory (:class:`AssociationLoads`, created by the
supervisor, an anonymous memory file whose descriptor each listener process
inherits), and a process only takes a new connection when no other is less
busy; otherwise it lets the connection wait for the less busy one, up to
:data:`MAXIMUM_DEFERRAL` seconds, after which it takes it itself (the other
one may be stuck or gone).
"""

from __future__ import annotations

import mmap
import os

__all__ = ["DEFERRAL_STEP", "MAXIMUM_DEFERRAL", "AssociationLoads", "ListenerLoad"]

#: Longest a busier process leaves a waiting connection to a less busy one, in seconds.
MAXIMUM_DEFERRAL = 0.2
#: How often a deferring process looks again whether the connection is still waiting, in seconds.
DEFERRAL_STEP = 0.002
_COUNT_BYTES = 4  # one C int per process


class ListenerLoad:
    """One listener process's view of the shared counts: its own slot, written only by itself."""

    def __init__(self, counts: memoryview, index: int) -> None:
        self._counts = counts
        self.index = index

    @classmethod
    def attach(cls, descriptor: int, index: int) -> ListenerLoad:
        """The view of a listener process that inherited :attr:`AssociationLoads.descriptor`."""
        size = os.fstat(descriptor).st_size
        return cls(memoryview(mmap.mmap(descriptor, size)).cast("i"), index)

    def started(self) -> None:
        """Count an association this process has just accepted."""
        self._counts[self.index] += 1

    def ended(self) -> None:
        """Count an association of this process as over."""
        self._counts[self.index] -= 1

    @property
    def serving(self) -> int:
        """Associations this process is serving now."""
        return int(self._counts[self.index])

    def total(self) -> int:
        """Associations all listener processes are serving now."""
        return int(sum(self._counts))

    def is_least_busy(self) -> bool:
        """True if no other listener process serves fewer associations than this one."""
        mine = self._counts[self.index]
        return all(mine <= count for count in self._counts)


class AssociationLoads:
    """Associations in progress per listener process, in shared memory (one int per process).

    The memory is an anonymous file (``memfd_create``): a listener process
    inherits :attr:`descriptor` and maps the same pages (:meth:`ListenerLoad.attach`);
    nothing is left behind on a disk or in ``/dev/shm`` when the service ends.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"need at least one listener process, not {processes}")
        self.descriptor = os.memfd_create("pacs-ai-listener-loads", os.MFD_CLOEXEC)
        os.ftruncate(self.descriptor, processes * _COUNT_BYTES)
        self._counts = memoryview(mmap.mmap(self.descriptor, processes * _COUNT_BYTES)).cast("i")

    def reset(self, index: int) -> None:
        """Set process ``index``'s count to 0, for a listener process being (re)started."""
        self._counts[index] = 0

    def counts(self) -> list[int]:
        """A snapshot of every process's count, for status and tests."""
        return list(self._counts)
