"""Stored objects as files on this host, and results written into the storage.

Analyzers, senders and DICOM readers want files.  :class:`HostFiles` gives
each key a local file: the receiver's own spool copy where this host has one,
the storage's file for a local-folder storage, or else a copy fetched into the
bounded worker cache (:class:`~pacs_ai.storage.cache.LocalCache`).  Nothing
here assumes that another host's paths exist on this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from pacs_ai.config import Settings
from pacs_ai.storage.base import Storage, StorageError
from pacs_ai.storage.cache import LocalCache
from pacs_ai.storage.keys import INSTANCES, RESULTS, spool_path
from pacs_ai.storage.registry import is_embedded, storage_for

__all__ = ["HostFiles"]


class HostFiles:
    """Local files for storage keys, and results put into the storage, on one host."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.settings = settings
        self.storage = storage or storage_for(settings)
        self.cache = LocalCache(
            self.storage, settings.effective_worker_cache_dir, settings.worker_cache_max_mb * 2**20
        )

    def local_paths(self, keys: Sequence[str], *, evict: bool = True) -> list[Path]:
        """A readable local file for each key, in order; fetches what this host does not have.

        ``evict``: see :meth:`LocalCache.fetch`.  Raises
        :class:`~pacs_ai.storage.base.StorageError` when an object cannot be fetched.
        """
        found: dict[int, Path] = {}
        remote: list[tuple[int, str]] = []
        for index, key in enumerate(keys):
            path = self._here(key)
            if path is None:
                remote.append((index, key))
            else:
                found[index] = path
        if remote:
            fetched = self.cache.fetch([key for _, key in remote], evict=evict)
            found.update((index, path) for (index, _), path in zip(remote, fetched, strict=True))
        return [found[index] for index in range(len(keys))]

    @property
    def fetched_objects(self) -> int:
        """Objects fetched from the storage into this host's cache through this instance so far."""
        return self.cache.fetched_objects

    def local_path(self, key: str) -> Path:
        """A readable local file of one key (see :meth:`local_paths`)."""
        return self.local_paths([key])[0]

    def has(self, key: str) -> bool:
        """Whether ``key`` can be read: a file on this host, or an object in the storage."""
        here = self._here(key)
        if here is not None:
            return here.is_file()
        try:
            return self.storage.exists(key)
        except StorageError:
            return False

    def _here(self, key: str) -> Path | None:
        """The file of ``key`` already on this host, if any."""
        if key.startswith("/"):  # a host path recorded before storage keys: only this host has it
            return Path(key)
        if key.startswith(INSTANCES + "/"):
            spooled = spool_path(self.settings.spool_dir, key)
            if spooled.is_file():
                return spooled
        local = self.storage.local_path(key)
        return local if local is not None and (is_embedded(self.settings) or local.is_file()) else None

    def staging_dir(self, study_uid: str) -> Path:
        """Where a job writes a study's result files before they are put in the storage.

        For a local-folder storage, the storage's own folder: the files are
        written once, in place.
        """
        local = self.storage.local_path(f"{RESULTS}/{study_uid}")
        if local is not None:
            return local
        return self.settings.effective_worker_cache_dir / "staging" / study_uid

    def staging_is_storage(self) -> bool:
        """Whether :meth:`staging_dir` is the storage's own folder (so a result written there is stored)."""
        return self.storage.local_path(f"{RESULTS}/staging") is not None

    def put_result(self, key: str, path: Path) -> None:
        """Put a result file written under :meth:`staging_dir` into the storage under ``key``.

        A copy in a remote store leaves no file behind on this host.
        """
        self.storage.put_file(key, path)
        if self.storage.local_path(key) is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
