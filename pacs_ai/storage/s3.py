"""An S3-compatible object store as the storage (SeaweedFS, MinIO, Ceph RGW, AWS S3), through boto3.

The alternative client (``storage_s3_client = "boto3"``); the default is obstore's
(:mod:`pacs_ai.storage.s3_obstore`), with the same settings and behaviour.

``storage_url`` is ``s3://bucket/optional/prefix``; every key is stored under
the prefix.  Endpoint, region, credentials and a CA bundle come from the
settings; credentials left unset come from boto3's own chain (``AWS_*``
variables, the shared credentials file, an instance role), and
``storage_s3_credentials_file`` points that chain at a file of its own.

A PUT that returned is durable in the store (that is S3's contract).  An
object at or above ``storage_s3_multipart_threshold_mb`` (a SEG of a whole-body
model with a hundred segments) goes through boto3's managed transfer in parts
of ``storage_s3_multipart_part_mb``, several at once, each retried on its own,
so one slow or dropped connection does not restart the whole object; smaller
ones (every received instance) are one PUT, with no transfer threads to start.
:meth:`S3Storage.delete_many` removes up to 1000 objects per DeleteObjects
call (retention).  boto3's
errors are turned into :class:`~pacs_ai.storage.base.StorageError` subclasses
whose messages say what to check; the secret never appears in them.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

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

__all__ = ["S3Storage"]

#: Error codes boto3 gives a refusal of the credentials as (a HEAD's answer has no body, only its status).
_CREDENTIAL_CODES = CREDENTIAL_CODES | {"403", "Forbidden"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Storage(S3Objects):
    """Objects in one bucket under one prefix of an S3-compatible store."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        endpoint = settings.storage_s3_endpoint_url
        core = botocore.session.Session()
        if settings.storage_s3_credentials_file is not None:
            core.set_config_variable("credentials_file", str(settings.storage_s3_credentials_file))
        secret = settings.storage_s3_secret_access_key
        session = boto3.Session(
            botocore_session=core,
            aws_access_key_id=settings.storage_s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
            region_name=settings.storage_s3_region,
        )
        timeout = settings.storage_timeout_seconds
        self.client: Any = session.client(
            "s3",
            endpoint_url=endpoint,
            verify=str(settings.storage_s3_ca_bundle) if settings.storage_s3_ca_bundle else None,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 3, "mode": "standard"},
                # Path-style addressing: what SeaweedFS, MinIO and Ceph expect of a bucket in an endpoint URL.
                s3={"addressing_style": "path"} if endpoint else None,
                max_pool_connections=max(32, settings.storage_fetch_concurrency),
                # boto3's client-side parameter validation and its optional CRC32 checksums (which not
                # every S3-compatible store supports; only checksums a request requires are kept) cost
                # about a quarter of a small GET's client CPU (0.79 -> 0.58 s for 300 x 0.5 MB here),
                # and a worker fetches a series as hundreds of such GETs.
                parameter_validation=False,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        #: Objects this large or larger are uploaded in parts by boto3's managed transfer.
        self.multipart_threshold = settings.storage_s3_multipart_threshold_mb * MIB
        self.transfer = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=settings.storage_s3_multipart_part_mb * MIB,
            max_concurrency=settings.storage_s3_upload_concurrency,
        )
        self.fetch_concurrency = settings.storage_fetch_concurrency

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            if os.fstat(body.fileno()).st_size >= self.multipart_threshold:
                self._upload_in_parts(key, body)
                return
            self._call(
                "store", key, self.client.put_object, Bucket=self.bucket, Key=self._object(key), Body=body
            )

    def put_bytes(self, key: str, data: bytes) -> None:
        if len(data) >= self.multipart_threshold:
            self._upload_in_parts(key, io.BytesIO(data))
            return
        self._call("store", key, self.client.put_object, Bucket=self.bucket, Key=self._object(key), Body=data)

    def _upload_in_parts(self, key: str, body: Any) -> None:
        """A large object through boto3's managed transfer (multipart: parts retried, aborted on failure)."""
        self._call(
            "store",
            key,
            self.client.upload_fileobj,
            Fileobj=body,
            Bucket=self.bucket,
            Key=self._object(key),
            Config=self.transfer,
        )

    def get_file(self, key: str, destination: Path) -> None:
        response = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._object(key))
        body = response["Body"]
        try:
            write_atomically(
                destination, lambda handle: shutil.copyfileobj(body, handle, 1 << 20), fsync=False
            )
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"reading {key} from {self.description} failed: {exc}") from exc
        finally:
            body.close()

    def get_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """:meth:`get_file` for each item, in ``storage_fetch_concurrency`` threads (boto3 is synchronous)."""
        if not items:
            return
        with ThreadPoolExecutor(
            max_workers=min(self.fetch_concurrency, len(items)), thread_name_prefix="fetch"
        ) as fetchers:
            for fetched in [fetchers.submit(self.get_file, key, path) for key, path in items]:
                fetched.result()

    def exists(self, key: str) -> bool:
        try:
            self._call("look up", key, self.client.head_object, Bucket=self.bucket, Key=self._object(key))
        except StorageKeyMissing:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._object(key))

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Remove the objects of ``keys``, 1000 per DeleteObjects call; key -> why, for those not removed.

        A key with no object counts as removed (S3 answers so).  A call that fails
        as a whole (store unreachable, credentials refused) fails each of its keys
        with the same reason; the other calls are still made.
        """
        failed: dict[str, str] = {}
        for names in self._deletion_batches(keys, failed):
            batch = list(names.values())
            try:
                answer = self._call(
                    "delete objects of",
                    "",
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
                )
            except StorageError as exc:
                failed.update(dict.fromkeys(batch, str(exc)))
                continue
            for error in answer.get("Errors", []):
                key = names.get(error.get("Key", ""), error.get("Key", "?"))
                code, message = error.get("Code", "?"), error.get("Message", "")
                failed[key] = f"{self.description} answered {code} {message}".rstrip()
        return failed

    def list(self, prefix: str = "") -> Iterator[str]:
        start = self.start
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start + prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][len(start) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, "list", prefix) from exc

    def start_threads(self, setup: Callable[[], None]) -> None:
        """Nothing to start: boto3 works on its callers' threads (and threads they start, for parts)."""

    def check(self) -> None:
        self._call("reach the bucket of", "", self.client.head_bucket, Bucket=self.bucket)
        probe = f"check/{uuid.uuid4().hex}"
        self.put_bytes(probe, b"pacs-ai storage check")
        self.delete(probe)

    def _call(self, action: str, key: str, method: Any, **arguments: Any) -> Any:
        try:
            return method(**arguments)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, action, key) from exc

    def _translate(self, exc: Exception, action: str, key: str) -> StorageError:
        """The StorageError saying what went wrong, in words an operator can act on."""
        what = f"cannot {action} {key or self.bucket} in {self.description}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageCredentialsRefused(f"{what}: {NO_CREDENTIALS}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in _MISSING_KEY_CODES and not key):
                return StorageBucketMissing(f"{what}: the bucket {self.bucket!r} does not exist")
            if code in _MISSING_KEY_CODES:
                return StorageKeyMissing(f"{what}: no such object")
            if code in _CREDENTIAL_CODES or status == 403:
                return StorageCredentialsRefused(
                    f"{what}: the store refused the credentials ({code}); check the access key id and secret"
                )
            if status is not None and status >= 500:
                return StorageUnavailable(f"{what}: the store answered {status} {code}")
            return StorageError(f"{what}: {code or status} {error.get('Message', '')}".rstrip())
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}")
