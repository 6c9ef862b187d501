"""Large objects and batched deletes against a real S3 server (SeaweedFS) and a real local folder.

A whole-body SEG (a hundred segments) can be hundreds of MiB: at or above
``storage_s3_multipart_threshold_mb`` it goes up in parts, through either S3
client (obstore, boto3).  The store itself says whether it was: an S3 multipart
object's ETag ends in ``-<number of parts>``.  Retention deletes up to 1000
objects per DeleteObjects call; the calls are counted by the store's own request
metrics, nothing is replaced.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pacs_ai.config import Settings
from pacs_ai.storage import open_storage
from pacs_ai.storage.keys import instance_key, result_key
from pacs_ai.storage.s3 import S3Storage
from pacs_ai.storage.s3_obstore import ObstoreS3Storage
from tests.object_store import SeaweedS3, storage_settings

MIB = 1024 * 1024


@pytest.fixture(params=["obstore", "boto3"])
def s3_client(request: pytest.FixtureRequest) -> str:
    """Each S3 client (``storage_s3_client``)."""
    return str(request.param)


def _s3(store: SeaweedS3, tmp_path: Path, client: str, **extra: Any) -> S3Storage | ObstoreS3Storage:
    storage = open_storage(
        Settings(data_dir=tmp_path / "data", **storage_settings(store, storage_s3_client=client, **extra))
    )
    assert isinstance(storage, ObstoreS3Storage if client == "obstore" else S3Storage)
    return storage


def _etag(store: SeaweedS3, storage: S3Storage | ObstoreS3Storage, key: str) -> str:
    """The object's ETag, as the store tells any client (the tests' own boto3 client)."""
    head = store.client().head_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}")
    return str(head["ETag"]).strip('"')


def test_an_object_above_the_threshold_is_uploaded_in_parts_and_reads_back_whole(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    storage = _s3(
        object_store, tmp_path, s3_client, storage_s3_multipart_threshold_mb=5, storage_s3_multipart_part_mb=5
    )
    big = tmp_path / "seg.dcm"
    big.write_bytes(os.urandom(12 * MIB + 123))  # three parts: 5 + 5 + 2 MiB
    key = result_key("1.2.3", "1.2.3.99")
    storage.put_file(key, big)
    assert _etag(object_store, storage, key).endswith("-3"), "uploaded as one PUT, not in parts"
    copy = tmp_path / "copy.dcm"
    storage.get_file(key, copy)
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()

    from_memory = os.urandom(6 * MIB)
    storage.put_bytes(key, from_memory)  # replaces the object, also in parts
    assert _etag(object_store, storage, key).endswith("-2")
    storage.get_file(key, copy)
    assert copy.read_bytes() == from_memory

    small = tmp_path / "instance.dcm"
    small.write_bytes(b"DICM" * 1000)
    storage.put_file(instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5"), small)
    assert "-" not in _etag(object_store, storage, instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")), (
        "a small one: one PUT"
    )


def test_a_multipart_part_below_s3s_minimum_is_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="storage_s3_multipart_part_mb"):
        Settings(data_dir=tmp_path, storage_s3_multipart_part_mb=4)


def test_many_objects_are_deleted_a_thousand_per_call(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    storage = _s3(object_store, tmp_path, s3_client)
    keys = [instance_key("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(1001)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: storage.put_bytes(key, b"x"), keys))
    assert len(list(storage.list("instances/1.2.3/"))) == 1001
    deletes = object_store.requests_served("DELETE")  # SeaweedFS counts a DeleteObjects call as one
    missing = instance_key("1.2.3", "1.2.3.4", "never.stored")
    assert storage.delete_many([*keys, missing, "/a/host/path.dcm"]) == {
        "/a/host/path.dcm": "'/a/host/path.dcm' is not a storage key (relative, '/'-separated, no '.' or "
        "'..' parts)"
    }
    assert object_store.requests_served("DELETE") - deletes == 2, "1002 keys in two DeleteObjects calls"
    assert list(storage.list("instances/1.2.3/")) == []


def test_deletes_the_store_refuses_are_returned_with_the_reason(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    storage = _s3(object_store, tmp_path, s3_client)
    key = result_key("1.2.3", "1.2.3.7")
    storage.put_bytes(key, b"kept")
    refused = _s3(
        object_store,
        tmp_path,
        s3_client,
        storage_url=storage.description.split(" at ")[0],
        storage_s3_secret_access_key="wrong-secret",
    )
    failed = refused.delete_many([key])
    assert list(failed) == [key] and "refused the credentials" in failed[key]
    assert storage.exists(key)


def test_a_local_folder_deletes_many_and_counts_missing_files_as_deleted(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    storage = open_storage(Settings(data_dir=tmp_path / "data", storage_url=f"file://{tmp_path / 'shared'}"))
    keys = [result_key("1.2.3", f"1.2.3.{n}") for n in range(3)]
    for key in keys[:2]:
        storage.put_bytes(key, b"x")
    assert storage.delete_many(keys) == {}
    assert not any(storage.exists(key) for key in keys)
