"""Large objects and batched deletes against a real S3 server (SeaweedFS) and a real local folder.

A whole-body SEG (a hundred segments) can be hundreds of MiB: at or above
``storage_s3_multipart_threshold_mb`` it goes up in parts through boto3's
managed transfer.  The store itself says whether it was: an S3 multipart
object's ETag ends in ``-<number of parts>``.  Retention deletes up to 1000
objects per DeleteObjects call; the calls are counted with botocore's own event
hooks, nothing is replaced.
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
from tests.object_store import SeaweedS3, storage_settings

MIB = 1024 * 1024


def _s3(store: SeaweedS3, tmp_path: Path, **extra: Any) -> S3Storage:
    storage = open_storage(Settings(data_dir=tmp_path / "data", **storage_settings(store, **extra)))
    assert isinstance(storage, S3Storage)
    return storage


def _etag(storage: S3Storage, key: str) -> str:
    head = storage.client.head_object(Bucket=storage.bucket, Key=storage._object(key))
    return str(head["ETag"]).strip('"')


def test_an_object_above_the_threshold_is_uploaded_in_parts_and_reads_back_whole(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    storage = _s3(object_store, tmp_path, storage_s3_multipart_threshold_mb=5, storage_s3_multipart_part_mb=5)
    big = tmp_path / "seg.dcm"
    big.write_bytes(os.urandom(12 * MIB + 123))  # three parts: 5 + 5 + 2 MiB
    key = result_key("1.2.3", "1.2.3.99")
    storage.put_file(key, big)
    assert _etag(storage, key).endswith("-3"), "uploaded as one PUT, not in parts"
    copy = tmp_path / "copy.dcm"
    storage.get_file(key, copy)
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()

    from_memory = os.urandom(6 * MIB)
    storage.put_bytes(key, from_memory)  # replaces the object, also in parts
    assert _etag(storage, key).endswith("-2")
    storage.get_file(key, copy)
    assert copy.read_bytes() == from_memory

    small = tmp_path / "instance.dcm"
    small.write_bytes(b"DICM" * 1000)
    storage.put_file(instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5"), small)
    assert "-" not in _etag(storage, instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")), "a small one: one PUT"


def test_a_multipart_part_below_s3s_minimum_is_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="storage_s3_multipart_part_mb"):
        Settings(data_dir=tmp_path, storage_s3_multipart_part_mb=4)


def test_many_objects_are_deleted_a_thousand_per_call(object_store: SeaweedS3, tmp_path: Path) -> None:
    storage = _s3(object_store, tmp_path)
    keys = [instance_key("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(1001)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: storage.put_bytes(key, b"x"), keys))
    calls: list[int] = []
    storage.client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: calls.append(len(params["body"]))
    )
    missing = instance_key("1.2.3", "1.2.3.4", "never.stored")
    assert storage.delete_many([*keys, missing, "/a/host/path.dcm"]) == {
        "/a/host/path.dcm": "'/a/host/path.dcm' is not a storage key (relative, '/'-separated, no '.' or "
        "'..' parts)"
    }
    assert len(calls) == 2, "1002 keys in two DeleteObjects calls"
    assert list(storage.list("instances/1.2.3/")) == []


def test_deletes_the_store_refuses_are_returned_with_the_reason(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    storage = _s3(object_store, tmp_path)
    key = result_key("1.2.3", "1.2.3.7")
    storage.put_bytes(key, b"kept")
    refused = _s3(
        object_store,
        tmp_path,
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
