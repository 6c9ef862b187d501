"""Where studies and results live: a local folder or an S3-compatible object store.

One setting chooses (``storage_url``; see :mod:`pacs_ai.storage.registry`);
the index records storage keys (:mod:`pacs_ai.storage.keys`), so a worker on
another host reads the series from the storage and writes its results there.
"""

from pacs_ai.storage.base import (
    Storage,
    StorageBucketMissing,
    StorageCredentialsRefused,
    StorageError,
    StorageKeyMissing,
    StorageUnavailable,
)
from pacs_ai.storage.registry import is_embedded, open_storage, storage_for

__all__ = [
    "Storage",
    "StorageBucketMissing",
    "StorageCredentialsRefused",
    "StorageError",
    "StorageKeyMissing",
    "StorageUnavailable",
    "is_embedded",
    "open_storage",
    "storage_for",
]
