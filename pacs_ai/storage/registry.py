"""Which backend serves which ``storage_url`` scheme: the one place to register a new backend.

``open_storage(settings)`` builds the storage the settings name; the
embedded default (no ``storage_url``) is the data directory's spool and
results folders.  :func:`storage_for` keeps one storage per process and
settings, because an S3 client holds a connection pool worth reusing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pacs_ai.config import Settings
from pacs_ai.storage.base import Storage
from pacs_ai.storage.keys import INSTANCES, RESULTS
from pacs_ai.storage.local import LocalFolderStorage
from pacs_ai.storage.s3 import S3Storage
from pacs_ai.storage.s3_obstore import ObstoreS3Storage

__all__ = ["open_storage", "storage_for", "is_embedded", "connect_early", "BACKENDS"]

log = logging.getLogger(__name__)


def _file_storage(settings: Settings) -> Storage:
    path = Path(unquote(urlsplit(settings.storage_url or "").path))
    if not path.is_absolute():
        raise ValueError(f"storage_url {settings.storage_url!r} must name an absolute folder: file:///path")
    return LocalFolderStorage(path, fsync=settings.fsync)


def _s3_storage(settings: Settings) -> Storage:
    """An S3 store through the client ``storage_s3_client`` names (obstore by default, or boto3)."""
    if settings.storage_s3_client == "boto3":
        return S3Storage(settings)
    return ObstoreS3Storage(settings)


#: URL scheme -> backend factory.
BACKENDS: dict[str, Callable[[Settings], Storage]] = {"file": _file_storage, "s3": _s3_storage}


def is_embedded(settings: Settings) -> bool:
    """Whether the storage is the receiver's own spool (no ``storage_url``): nothing to upload."""
    return not settings.storage_url


def open_storage(settings: Settings) -> Storage:
    """A new storage as ``settings.storage_url`` says; ValueError for an unknown scheme."""
    if is_embedded(settings):
        return LocalFolderStorage(
            settings.data_dir,
            folders={INSTANCES: settings.spool_dir, RESULTS: settings.results_dir},
            fsync=settings.fsync,
        )
    scheme = urlsplit(settings.storage_url or "").scheme
    if scheme not in BACKENDS:
        raise ValueError(
            f"storage_url {settings.storage_url!r}: unknown scheme {scheme!r} (known: {', '.join(BACKENDS)})"
        )
    return BACKENDS[scheme](settings)


_opened: dict[tuple[int, str, int | None], Storage] = {}
_opening = threading.Lock()


def storage_for(settings: Settings) -> Storage:
    """This process's storage for ``settings`` (one per process: a forked child opens its own)."""
    secret = settings.storage_s3_secret_access_key
    identity = (
        os.getpid(),
        settings.model_dump_json(include=_STORAGE_FIELDS),
        hash(secret.get_secret_value()) if secret is not None else None,
    )
    with _opening:
        storage = _opened.get(identity)
        if storage is None:
            storage = _opened[identity] = open_storage(settings)
        return storage


def connect_early(settings: Settings) -> None:
    """Build this process's storage client now, before a job or a delivery needs it.

    boto3 builds an S3 client in 0.3-0.4 s (it parses the service's model;
    obstore's client costs little, but the same call serves both);
    a worker's first job and the receiver's first delivery from a remote
    store paid that inside the turnaround.  Called where a worker process
    warms up.  No request is made: a store that is down must not hold up a
    worker's start (the job that needs the store retries).
    """
    if not is_embedded(settings):
        try:
            storage_for(settings)
        except ValueError as exc:  # a storage_url that cannot work: every job will say so
            log.warning("the storage cannot be opened: %s", exc)


_STORAGE_FIELDS = {
    "data_dir",
    "fsync",
    "storage_url",
    "storage_s3_client",
    "storage_s3_endpoint_url",
    "storage_s3_region",
    "storage_s3_access_key_id",
    "storage_s3_credentials_file",
    "storage_s3_ca_bundle",
    "storage_timeout_seconds",
    "storage_s3_multipart_threshold_mb",
    "storage_s3_multipart_part_mb",
    "storage_s3_upload_concurrency",
    "storage_fetch_concurrency",
}
