"""The storage backends against a real local folder and a real S3 server (SeaweedFS), and the worker cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_ai.config import Settings
from pacs_ai.storage import (
    Storage,
    StorageBucketMissing,
    StorageCredentialsRefused,
    StorageKeyMissing,
    StorageUnavailable,
    open_storage,
)
from pacs_ai.storage.cache import LocalCache
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import instance_key, result_key
from tests.object_store import ACCESS_KEY, SeaweedS3, storage_settings
from tests.peers import free_port


@pytest.fixture(params=["embedded", "folder", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Each backend: the embedded data directory, a ``file://`` folder, and an S3 bucket prefix."""
    if request.param == "embedded":
        yield open_storage(Settings(data_dir=tmp_path / "data", fsync=False))
    elif request.param == "folder":
        (tmp_path / "shared").mkdir()
        yield open_storage(Settings(data_dir=tmp_path / "data", storage_url=f"file://{tmp_path / 'shared'}"))
    else:
        store: SeaweedS3 = request.getfixturevalue("object_store")
        yield open_storage(Settings(data_dir=tmp_path / "data", **storage_settings(store)))


def test_objects_are_put_listed_read_and_deleted(storage: Storage, tmp_path: Path) -> None:
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    source = tmp_path / "source.dcm"
    source.write_bytes(b"DICM" * 1000)
    storage.put_file(key, source)
    storage.put_bytes(result_key("1.2.3", "9.8.7"), b"result")
    assert storage.exists(key) and not storage.exists(instance_key("1.2.3", "1.2.3.4", "6.6.6"))
    assert sorted(storage.list("instances/1.2.3/")) == [key]
    assert sorted(storage.list("results/")) == [result_key("1.2.3", "9.8.7")]

    copy = tmp_path / "copy" / "x.dcm"
    copy.parent.mkdir()
    storage.get_file(key, copy)
    assert copy.read_bytes() == source.read_bytes()
    storage.put_bytes(key, b"replaced")  # a put replaces, whole
    storage.get_file(key, copy)
    assert copy.read_bytes() == b"replaced"
    assert [p.name for p in copy.parent.iterdir()] == ["x.dcm"], "no temporary file left behind"

    storage.delete(key)
    storage.delete(key)  # deleting what is not there is no error
    assert not storage.exists(key)
    with pytest.raises(StorageKeyMissing, match="1.2.3.4.5"):
        storage.get_file(key, copy)
    storage.check()


@pytest.mark.parametrize("bad", ["../escape", "/absolute", "a//b", ""])
def test_keys_cannot_leave_the_storage(tmp_path: Path, bad: str) -> None:
    storage = open_storage(Settings(data_dir=tmp_path, fsync=False))
    with pytest.raises(ValueError, match="not a storage key"):
        storage.put_bytes(bad, b"x")


def test_the_embedded_storage_is_the_spool_and_the_results_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, fsync=False)
    storage = open_storage(settings)
    assert storage.local_path(instance_key("1.2", "1.3", "1.4")) == settings.spool_dir / "1.2/1.3/1.4.dcm"
    assert storage.local_path(result_key("1.2", "1.5")) == settings.results_dir / "1.2/1.5.dcm"


def test_wrong_credentials_are_named_as_such(object_store: SeaweedS3, tmp_path: Path) -> None:
    wrong = storage_settings(object_store, storage_s3_secret_access_key="not-the-secret")
    with pytest.raises(StorageCredentialsRefused, match="refused the credentials") as refused:
        open_storage(Settings(data_dir=tmp_path, **wrong)).check()
    assert "not-the-secret" not in str(refused.value)
    unknown = storage_settings(object_store, storage_s3_access_key_id="nobody")
    with pytest.raises(StorageCredentialsRefused):
        open_storage(Settings(data_dir=tmp_path, **unknown)).put_bytes("results/x/y.dcm", b"x")
    assert ACCESS_KEY  # the right identity still works:
    open_storage(Settings(data_dir=tmp_path, **storage_settings(object_store))).check()


def test_a_missing_bucket_and_an_unreachable_store_are_named(object_store: SeaweedS3, tmp_path: Path) -> None:
    missing = storage_settings(object_store, "s3://no-such-bucket/x")
    with pytest.raises(StorageBucketMissing, match="no-such-bucket"):
        open_storage(Settings(data_dir=tmp_path, **missing)).check()
    nowhere = storage_settings(
        object_store, storage_s3_endpoint_url=f"http://127.0.0.1:{free_port()}", storage_timeout_seconds=2
    )
    with pytest.raises(StorageUnavailable, match="cannot reach the bucket"):
        open_storage(Settings(data_dir=tmp_path, **nowhere)).check()


def test_a_series_is_fetched_once_into_a_bounded_cache(object_store: SeaweedS3, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "worker", worker_cache_max_mb=1, fsync=False, **storage_settings(object_store)
    )
    storage = open_storage(settings)
    keys = [instance_key("1.2", "1.3", f"1.4.{n}") for n in range(4)]
    for n, key in enumerate(keys):
        storage.put_bytes(key, bytes([n]) * 300_000)
    files = HostFiles(settings, storage)
    first = files.local_paths(keys[:2])
    assert [p.read_bytes()[:1] for p in first] == [b"\x00", b"\x01"]
    assert all(p.is_relative_to(settings.effective_worker_cache_dir) for p in first)

    # A second model on the same study reads the copies: nothing is downloaded (the store has none now).
    storage.delete(keys[0])
    assert files.local_paths(keys[:2]) == first

    # Past 1 MB the least recently used copy goes; the copies of the current fetch stay.
    storage.put_bytes(keys[0], b"\x00" * 300_000)
    files.local_paths(keys[:1])  # keys[0] used last, keys[1] least recently
    files.local_paths(keys[2:])
    cached = {p.name for p in settings.effective_worker_cache_dir.rglob("*.dcm")}
    assert cached == {"1.4.0.dcm", "1.4.2.dcm", "1.4.3.dcm"}

    # Deleting the cache at any time only costs a new download.
    for path in settings.effective_worker_cache_dir.rglob("*.dcm"):
        path.unlink()
    assert files.local_path(keys[3]).read_bytes() == b"\x03" * 300_000


def test_the_cache_fetch_raises_the_storage_error(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        storage_url="s3://pacs-ai/x",
        storage_s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        storage_s3_access_key_id="a",
        storage_s3_secret_access_key="b",
        storage_timeout_seconds=1,
    )
    cache = LocalCache(open_storage(settings), tmp_path / "cache", 2**20)
    with pytest.raises(StorageUnavailable):
        cache.fetch([instance_key("1.2", "1.3", "1.4")])
    assert not list((tmp_path / "cache").rglob("*.dcm")), "nothing half-fetched is left"
