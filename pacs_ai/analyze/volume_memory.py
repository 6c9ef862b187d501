"""Memory for voxel arrays, kept by a worker process from one study to the next.

A CT volume is a few hundred MB that the kernel must map, zero and hand over
page by page.  Measured in the worker of ``pacs-ai serve`` on the benchmark
machine (a VM), that cost 0.35-0.43 s for a 150 MB volume, right after
ingest, against 0.03 s in a process that had just freed as much: pages the
process had not touched recently were ten times slower to obtain than pages it
reuses.  It was the largest part of the load stage.

So each worker process keeps the memory of its last volume (one anonymous
mapping, :class:`VolumeMemory`) and the next volume that fits goes into it,
instead of into new pages.  A mapping is reused only when nothing refers to it
any more (no array or view of the previous volume is alive), so a volume is
never overwritten while in use.  Its previous content is never read: the loader
writes every voxel before the volume is used, and the memory stays within the
process that loaded the study.

A pool process also reserves a mapping when it starts (the setting
``volume_memory_reserve_mb``, :meth:`VolumeMemory.reserve`), so that its first
study finds warm memory too.  The price is that memory, held while the
process idles: ``volume_memory_reserve_mb`` per pool process until its first
study, then the size of the volumes it loads (the part of a reserve that a
volume does not need is given back when the volume takes it).  0 reserves
nothing up front.

Elsewhere than Linux (no ``MAP_POPULATE``) this is plain ``np.empty``.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading

import numpy as np

__all__ = ["VolumeMemory", "empty_volume", "process_volume_memory"]

_POPULATE = getattr(mmap, "MAP_POPULATE", None)
#: References to a free mapping while it is checked: the holder's, the checking function's local
#: name and getrefcount's own argument.  Any array or view over it adds one.
_FREE_REFERENCES = 3


class VolumeMemory:
    """One reusable anonymous mapping for voxel arrays (see the module docstring)."""

    def __init__(self) -> None:
        self._mapping: mmap.mmap | None = None
        # Between the check that the mapping is free and the array that takes it, no other
        # thread may take it too.
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        """Size of the mapping kept for the next volume (0 when there is none)."""
        return len(self._mapping) if self._mapping is not None else 0

    def _free_mapping(self, nbytes: int) -> mmap.mmap | None:
        mapping = self._mapping
        if mapping is None or len(mapping) < nbytes:
            return None
        # Every array over the mapping holds a reference to it, through its buffer.
        return mapping if sys.getrefcount(mapping) <= _FREE_REFERENCES else None

    def reserve(self, nbytes: int) -> None:
        """Map and touch ``nbytes`` now, unless a free mapping at least that large is kept already."""
        if nbytes <= 0 or _POPULATE is None:
            return
        with self._lock:
            if self._free_mapping(nbytes) is None:
                self._mapping = _populated_mapping(nbytes)

    def empty(self, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
        """An uninitialised C-contiguous array: in the kept mapping when it is free and fits."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if _POPULATE is None or nbytes == 0:
            return np.empty(shape, dtype=dtype)
        with self._lock:
            mapping = self._free_mapping(nbytes)
            if mapping is None:
                # The kernel maps it all in one call (MAP_POPULATE): a few hundred MB otherwise
                # fault in one 4 KiB page at a time on first write, which cost 0.15-0.35 s per CT.
                mapping = self._mapping = _populated_mapping(nbytes)
            else:
                _release_beyond(mapping, nbytes)
            return np.frombuffer(mapping, dtype=dtype, count=math.prod(shape)).reshape(shape)


def _release_beyond(mapping: mmap.mmap, nbytes: int) -> None:
    """Give the pages of ``mapping`` past its first ``nbytes`` back to the kernel (the mapping stays).

    A reserve larger than the volume would otherwise keep its unused part resident for the
    whole study; the next volume that needs it gets fresh pages there.
    """
    used = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    if used < len(mapping):
        mapping.madvise(mmap.MADV_DONTNEED, used, len(mapping) - used)


def _populated_mapping(nbytes: int) -> mmap.mmap:
    assert _POPULATE is not None
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)


_PROCESS_MEMORY = VolumeMemory()


def process_volume_memory() -> VolumeMemory:
    """This process's :class:`VolumeMemory` (a forked child starts with its parent's: reserve anew)."""
    return _PROCESS_MEMORY


def empty_volume(shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """An uninitialised voxel array in this process's :class:`VolumeMemory`."""
    return _PROCESS_MEMORY.empty(shape, dtype)
