"""A worker's bounded local copies of objects it fetched from a remote storage.

A series is fetched once per host: a second analysis of the same study (another
model, a retry, a reprocess) reads the copies already here.  The cache holds
at most ``worker_cache_max_mb``; when a fetch takes it past that, the least
recently used files go first (a file's modification time is set each time it
is used).  It is safe to delete at any time, wholly or in part: every copy is
written under a temporary name and renamed, and a missing copy is fetched
again.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from pacs_ai.storage.base import Storage, check_key

__all__ = ["LocalCache"]

log = logging.getLogger(__name__)


class LocalCache:
    """Copies of ``storage``'s objects in ``directory``, at most ``max_bytes`` of them."""

    def __init__(self, storage: Storage, directory: Path, max_bytes: int) -> None:
        self.storage = storage
        self.directory = directory
        self.max_bytes = max_bytes
        self._evicting = threading.Lock()
        #: Objects this cache has fetched from the storage so far (a job records its own share).
        self.fetched_objects = 0

    def path_of(self, key: str) -> Path:
        """Where the copy of ``key`` is (or would be) kept."""
        return self.directory / check_key(key)

    def fetch(self, keys: Sequence[str], *, evict: bool = True) -> list[Path]:
        """Local files holding the objects of ``keys``, in order, fetching those not here yet.

        With ``evict`` (the default) the cache is brought back within its size after a fetch; a
        caller fetching in rounds passes False and calls :meth:`evict` once at the end (each
        eviction lists the whole cache).  Raises the storage's
        :class:`~pacs_ai.storage.base.StorageError` when one cannot be fetched.
        """
        paths = [self.path_of(key) for key in keys]
        missing = [(key, path) for key, path in zip(keys, paths, strict=True) if not _touch(path)]
        if missing:
            started = time.perf_counter()
            for _, path in missing:
                path.parent.mkdir(parents=True, exist_ok=True)
            with _collection_paused():
                self.storage.get_files(missing)  # concurrently: storage_fetch_concurrency at once
            self.fetched_objects += len(missing)
            for _, path in missing:
                _touch(path)
            log.info(
                "fetched %d object(s) into the cache in %.2f s", len(missing), time.perf_counter() - started
            )
            if evict:
                self.evict(keep=set(paths))
        return paths

    def evict(self, keep: Collection[Path] = ()) -> int:
        """Delete the least recently used copies until the cache fits; returns the bytes freed."""
        with self._evicting:
            files = []
            total = 0
            for directory, _, names in os.walk(self.directory):
                for name in names:
                    path = Path(directory, name)
                    with contextlib.suppress(FileNotFoundError):
                        status = path.stat()
                        files.append((status.st_mtime, status.st_size, path))
                        total += status.st_size
            freed = 0
            for _, size, path in sorted(files):
                if total - freed <= self.max_bytes:
                    break
                if path in keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += size
            if freed:
                log.info("cache %s: evicted %d MB of least recently used copies", self.directory, freed >> 20)
            return freed


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a series is fetched.

    The fetch's threads create many short-lived container objects (futures,
    request handles), which start a collection every few hundred; each holds
    the GIL that every other fetch thread waits for to write its object.  In a
    worker (millions of live objects) 300 objects took 0.7-1.3 s to fetch,
    against 0.34-0.44 s in a fresh process; with collection paused 0.39 s in
    one run, and 0.58 and 0.74 s (medians of 3) in two runs together with
    :func:`workers.factory._freeze_what_is_loaded`.  The rest of the
    difference was the machine's, not the worker's: the same fetch in a
    worker's pool process outside the pipeline took 0.30-0.44 s, and in the
    pipeline 0.39 s once the virtual machine stopped handing freed memory
    back to its hypervisor (the 150 MB of new page cache had been slow to
    touch; ``benchmarks/machine.py``).  Nothing here makes reference cycles
    worth collecting early; the next collection after the fetch takes
    whatever there is.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _touch(path: Path) -> bool:
    """Mark ``path`` as just used; False if it is not there.

    The time is the process clock's in nanoseconds: the kernel stamps files with a clock that moves
    in ticks of several milliseconds, so two uses within one tick looked equally recent and the
    eviction order fell back to the file names.
    """
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        return False
    return True
