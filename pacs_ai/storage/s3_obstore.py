"""An S3-compatible object store as the storage through obstore (Rust ``object_store``), the default.

The same store, settings and guarantees as :class:`~pacs_ai.storage.s3.S3Storage`
(boto3; ``storage_s3_client = "boto3"``), with the requests signed, sent and
read in Rust: a GET of a 0.5 MB instance costs a fraction of boto3's 2-3 ms of
client CPU, and a worker fetches a series of hundreds of them at once, at most
``storage_fetch_concurrency`` (:meth:`ObstoreS3Storage.get_files`).  No HTTP or
S3 signing is written here.

``storage_url`` is ``s3://bucket/optional/prefix``; every key is stored under
the prefix.  Endpoint (path-style addressing, as SeaweedFS, MinIO and Ceph
expect), region, a CA bundle and timeouts come from the settings.  Credentials
set in the settings are used as they are; left unset, they come from botocore's
chain, exactly as for the boto3 client (``AWS_*`` variables, the shared
credentials file, or ``storage_s3_credentials_file`` in its place, an instance
role), resolved at the first request and refreshed by botocore.

A PUT that returned is durable in the store.  An object at or above
``storage_s3_multipart_threshold_mb`` is uploaded as a multipart upload in parts
of ``storage_s3_multipart_part_mb``, ``storage_s3_upload_concurrency`` at once
(obstore aborts the upload when a part fails); smaller ones in one PUT.
:meth:`ObstoreS3Storage.delete_many` removes up to 1000 objects per
DeleteObjects call.  obstore's errors become
:class:`~pacs_ai.storage.base.StorageError` subclasses whose messages say what
to check; the secret never appears in them.

obstore's runtime does not survive ``fork``: a process forked after its parent
made a request through obstore would hang on its first request.  pacs-ai forks
no process that uses the storage after its parent did (Celery's pool processes
open theirs in the child; listeners and workers are started with exec), and
:func:`_guard_fork` turns such a use into a :class:`StorageError` saying so
instead of a hang.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import botocore.credentials
import botocore.session
import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import MemoryStore, S3Store

from pacs_ai.config import Settings
from pacs_ai.storage.base import (
    StorageBucketMissing,
    StorageCredentialsRefused,
    StorageError,
    StorageKeyMissing,
    StorageUnavailable,
)
from pacs_ai.storage.local import write_atomically
from pacs_ai.storage.s3_objects import CREDENTIAL_CODES, MIB, NO_CREDENTIALS, S3Objects

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config, S3Credential

__all__ = ["ObstoreS3Storage"]

#: Bytes a GET's body is written in: an instance is one piece, a large SEG is streamed.
READ_CHUNK = MIB
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
#: How long refreshable credentials (an instance role) are trusted before botocore is asked again.
_REFRESHED_CREDENTIALS_TTL = timedelta(minutes=5)
_T = TypeVar("_T")


class _NoCredentials(Exception):
    """botocore's chain found no credentials (raised inside obstore's credential callback)."""


class _BotocoreCredentials:
    """obstore's credential callback: botocore's chain, pointed at ``credentials_file`` if one is set.

    Resolved at the first request, not when the storage is opened: an instance
    role's metadata service may take a second to answer, and a worker's start
    must not wait for it.
    """

    def __init__(self, credentials_file: Path | None) -> None:
        self._session = botocore.session.Session()
        if credentials_file is not None:
            self._session.set_config_variable("credentials_file", str(credentials_file))
        self._credentials: botocore.credentials.Credentials | None = None
        self._lock = threading.Lock()
        #: False once the chain was asked and found nothing (for the error message).
        self.found = True

    def __call__(self) -> S3Credential:
        with self._lock:
            if self._credentials is None:
                self._credentials = self._session.get_credentials()
            credentials = self._credentials
        if credentials is None:
            self.found = False
            raise _NoCredentials("no credentials")
        frozen = credentials.get_frozen_credentials()
        if frozen.access_key is None or frozen.secret_key is None:
            self.found = False
            raise _NoCredentials("incomplete credentials")
        self.found = True
        refreshable = isinstance(credentials, botocore.credentials.RefreshableCredentials)
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + _REFRESHED_CREDENTIALS_TTL if refreshable else None,
        }


#: The process that first made a request through obstore (its runtime's threads live there only).
_runtime_pid: int | None = None


def _guard_fork() -> None:
    """Refuse, rather than hang, in a process forked after its parent made a request through obstore."""
    global _runtime_pid
    pid = os.getpid()
    if _runtime_pid is None:
        _runtime_pid = pid
    elif _runtime_pid != pid:
        raise StorageError(
            "this process was forked after its parent used the object store through obstore, whose "
            "runtime does not survive a fork; open the storage only in the child, or set "
            "storage_s3_client = 'boto3'"
        )


class ObstoreS3Storage(S3Objects):
    """Objects in one bucket under one prefix of an S3-compatible store, through obstore."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        endpoint = settings.storage_s3_endpoint_url
        timeout = timedelta(seconds=settings.storage_timeout_seconds)
        client: ClientConfig = {
            "connect_timeout": timeout,
            # No answer (or no further bytes of one) for this long fails the attempt, as boto3's
            # read timeout does; obstore's own 30 s bound on a whole request would cut off a large
            # SEG on a slow link, so the whole request is bounded only generously.
            "read_timeout": timeout,
            "timeout": timedelta(hours=1),
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
        }
        if settings.storage_s3_ca_bundle is not None:
            try:
                client["root_certificate"] = settings.storage_s3_ca_bundle.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"storage_s3_ca_bundle {settings.storage_s3_ca_bundle} cannot be read: {exc.strerror}"
                ) from exc
        config: S3Config = {
            # Path-style addressing with an endpoint (what SeaweedFS, MinIO and Ceph expect);
            # AWS's own virtual-hosted style without one.
            "virtual_hosted_style_request": endpoint is None,
            # As botocore: the body is signed over plain HTTP; over HTTPS, TLS protects it.
            "unsigned_payload": not (endpoint and endpoint.startswith("http://")),
        }
        if endpoint:
            config["endpoint"] = endpoint
        if settings.storage_s3_region:
            config["region"] = settings.storage_s3_region
        self._chain: _BotocoreCredentials | None = None
        secret = settings.storage_s3_secret_access_key
        if settings.storage_s3_access_key_id and secret is not None:
            config["access_key_id"] = settings.storage_s3_access_key_id
            config["secret_access_key"] = secret.get_secret_value()
        else:
            self._chain = _BotocoreCredentials(settings.storage_s3_credentials_file)
        self.store = S3Store(
            self.bucket,
            config=config,
            client_options=client,
            # Three attempts in all, as the boto3 client makes.
            retry_config={"max_retries": 2},
            credential_provider=self._chain,
        )
        #: Objects this large or larger are uploaded in parts.
        self.multipart_threshold = settings.storage_s3_multipart_threshold_mb * MIB
        self.part_size = settings.storage_s3_multipart_part_mb * MIB
        self.upload_concurrency = settings.storage_s3_upload_concurrency
        self.fetch_concurrency = settings.storage_fetch_concurrency

    def put_file(self, key: str, path: Path) -> None:
        size = os.stat(path).st_size
        self._put(key, path, size)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(key, data, len(data))

    def _put(self, key: str, body: Path | bytes, size: int) -> None:
        name = self._object(key)
        self._call(
            "store",
            key,
            lambda: obstore.put(
                self.store,
                name,
                body,
                use_multipart=size >= self.multipart_threshold,
                chunk_size=self.part_size,
                max_concurrency=self.upload_concurrency,
            ),
        )

    def get_file(self, key: str, destination: Path) -> None:
        name = self._object(key)
        result = self._call("read", key, lambda: obstore.get(self.store, name))

        def fill(handle: BinaryIO) -> None:
            for chunk in result.stream(min_chunk_size=READ_CHUNK):
                handle.write(chunk)

        try:
            write_atomically(destination, fill, fsync=False)
        except ObstoreError as exc:  # the connection failed while the body was read
            raise self._translate(exc, "read", key) from exc
        except OSError as exc:
            raise StorageUnavailable(f"reading {key} from {self.description} failed: {exc}") from exc

    def get_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """:meth:`get_file` for each ``(key, destination)``, ``storage_fetch_concurrency`` at once.

        Each runs on a thread of its own, but the request (signing, sending,
        reading) runs in Rust on obstore's runtime, outside the GIL.  obstore's
        async API would need no threads, but a process that used it aborts now
        and then at exit (obstore 0.12.1: 2 of 40 runs here), so it is not used.
        The first failure is raised and the fetches not yet started are dropped;
        no destination is left half-written.
        """
        if not items:
            return
        with ThreadPoolExecutor(
            max_workers=min(self.fetch_concurrency, len(items)), thread_name_prefix="fetch"
        ) as fetchers:
            fetches = [fetchers.submit(self.get_file, key, destination) for key, destination in items]
            try:
                for fetch in fetches:
                    fetch.result()
            except BaseException:
                fetchers.shutdown(wait=True, cancel_futures=True)
                raise

    def exists(self, key: str) -> bool:
        name = self._object(key)
        try:
            self._call("look up", key, lambda: obstore.head(self.store, name))
        except StorageKeyMissing:
            return False
        return True

    def delete(self, key: str) -> None:
        name = self._object(key)
        self._call("delete", key, lambda: obstore.delete(self.store, name))

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Remove the objects of ``keys``, 1000 per DeleteObjects call; key -> why, for those not removed.

        A key with no object counts as removed (S3 answers so).  A call that fails
        (store unreachable, credentials refused, or any key of it refused) fails
        each of its keys with the reason; they are tried again later, and those
        already gone then count as removed.  The other calls are still made.
        """
        failed: dict[str, str] = {}
        for names in self._deletion_batches(keys, failed):
            try:
                self._call("delete objects of", "", partial(obstore.delete, self.store, list(names)))
            except StorageError as exc:
                failed.update(dict.fromkeys(names.values(), str(exc)))
        return failed

    def list(self, prefix: str = "") -> Iterator[str]:
        start = self.start
        # object_store lists whole path segments: ask for the folder, keep the keys that start with prefix.
        folder = (start + prefix).rpartition("/")[0]
        _guard_fork()
        try:
            for chunk in obstore.list(self.store, prefix=folder or None):
                for item in chunk:
                    name = item["path"]
                    if name.startswith(start + prefix):
                        yield name[len(start) :]
        except (ObstoreError, OSError) as exc:
            raise self._translate(exc, "list", prefix) from exc

    def start_threads(self, setup: Callable[[], None]) -> None:
        """Start obstore's runtime from a new thread that first runs ``setup``.

        Their threads do the work of every request of this process (signing,
        hashing, sending): started so, they run at the priority ``setup`` gives,
        e.g. the receiver's uploads at ``storage_upload_nice``.  No request is
        made (a put into an in-memory store starts the runtime).  Too late, and a no-op,
        once this process made a request through obstore.
        """
        global _runtime_pid
        if _runtime_pid == os.getpid():
            return

        def start() -> None:
            setup()
            obstore.put(MemoryStore(), "start", b"")

        starter = threading.Thread(target=start, name="obstore-start")
        starter.start()
        starter.join()
        _runtime_pid = os.getpid()

    def check(self) -> None:
        folder = f"{self.prefix}/check" if self.prefix else "check"
        self._call("reach the bucket of", "", lambda: obstore.list_with_delimiter(self.store, folder))
        probe = f"check/{uuid.uuid4().hex}"
        self.put_bytes(probe, b"pacs-ai storage check")
        self.delete(probe)

    def _call(self, action: str, key: str, request: Callable[[], _T]) -> _T:
        _guard_fork()
        try:
            return request()
        except (ObstoreError, OSError) as exc:
            raise self._translate(exc, action, key) from exc

    def _translate(self, exc: Exception, action: str, key: str) -> StorageError:
        """The StorageError saying what went wrong, in words an operator can act on.

        obstore raises FileNotFoundError, PermissionDeniedError and
        UnauthenticatedError for what they say, and GenericError for the rest
        with the store's answer (HTTP status and S3 error code) in its message.
        """
        if isinstance(exc, StorageError):
            return exc
        what = f"cannot {action} {key or self.bucket} in {self.description}"
        text = str(exc)
        summary = text.split("\n\nDebug source:")[0].split("\n")[0]
        status_match, code_match = _STATUS.search(text), _CODE.search(text)
        status = int(status_match.group(1)) if status_match else None
        code = code_match.group(1) if code_match else ""
        if self._chain is not None and not self._chain.found:
            return StorageCredentialsRefused(f"{what}: {NO_CREDENTIALS}")
        if code == "NoSuchBucket" or (status == 404 and not key):
            return StorageBucketMissing(f"{what}: the bucket {self.bucket!r} does not exist")
        if isinstance(exc, FileNotFoundError) or status == 404:
            return StorageKeyMissing(f"{what}: no such object")
        refused = isinstance(exc, PermissionDeniedError | UnauthenticatedError)
        if refused or code in CREDENTIAL_CODES or status == 403:
            return StorageCredentialsRefused(
                f"{what}: the store refused the credentials ({code or status}); check the access key id "
                f"and secret"
            )
        if status is None or status >= 500:
            # No answer at all (refused, reset, timed out) or the store's own failure: worth retrying.
            return StorageUnavailable(f"{what}: {summary}")
        return StorageError(f"{what}: {code or status} {summary}".rstrip())
