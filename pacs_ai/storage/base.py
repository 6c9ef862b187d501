"""What every storage backend offers, and the errors it raises.

A backend keeps opaque byte objects under keys: relative, ``/``-separated
names such as ``instances/<study>/<series>/<sop>.dcm`` (see
:mod:`pacs_ai.storage.keys`).  The index records keys, never a host's paths,
so any host that can reach the storage can read what another host wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = [
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StorageCredentialsRefused",
    "StorageBucketMissing",
    "StorageKeyMissing",
    "check_key",
]


class StorageError(Exception):
    """The storage could not do what was asked; the message says why and what to check."""


class StorageUnavailable(StorageError):
    """The storage cannot be reached or did not answer in time (retrying later may help)."""


class StorageCredentialsRefused(StorageError):
    """The storage refused the credentials (wrong key, wrong secret, no permission)."""


class StorageBucketMissing(StorageError):
    """The bucket (or folder) named by ``storage_url`` does not exist."""


class StorageKeyMissing(StorageError, KeyError):
    """No object is stored under the key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_key(key: str) -> str:
    """``key`` if it is a safe relative key; ValueError otherwise (nothing may escape the storage root)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in key:
        raise ValueError(f"{key!r} is not a storage key (relative, '/'-separated, no '.' or '..' parts)")
    return key


@runtime_checkable
class Storage(Protocol):
    """Objects under keys: a local folder or an S3-compatible object store.

    Writes are atomic: a reader sees the whole object or none.  Every method
    raises :class:`StorageError` (or a subclass) for the storage's own failures.
    """

    #: Where the storage is, for messages and ``pacs-ai status`` (no credentials in it).
    description: str

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key``, replacing what was there; durable on return."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there; durable on return."""
        ...

    def get_file(self, key: str, destination: Path) -> None:
        """Write the object of ``key`` to ``destination`` (atomically); :class:`StorageKeyMissing` if none."""
        ...

    def get_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """:meth:`get_file` for each ``(key, destination)``, several at once where the store allows.

        Raises the first failure; no destination is left half-written.  A
        worker fetches a series (hundreds of objects) this way.
        """
        ...

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` on this host, for a local folder; None for a remote store."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object of ``key``; nothing happens when there is none."""
        ...

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Remove the objects of ``keys`` (in batches where the store allows); key -> why, for those left.

        A key with no object counts as removed.  Never raises for a key it could
        not delete: the caller records those and tries again later.
        """
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """The keys that start with ``prefix``, in no promised order."""
        ...

    def start_threads(self, setup: Callable[[], None]) -> None:
        """Start the storage's own worker threads, if it has any, from a thread that first runs ``setup``.

        Threads inherit what their creator's ``setup`` set (Linux: the ``nice``
        value), so the receiver's uploader can run a client's threads at its own
        lower priority.  Too late once they are running; nothing to do for a
        storage that works on its callers' threads.
        """
        ...

    def check(self) -> None:
        """Raise a :class:`StorageError` saying what is wrong unless objects can be written and deleted."""
        ...
