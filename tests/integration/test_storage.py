"""The storage backends against a real local folder and a real S3 server (SeaweedFS) through each S3 client
(obstore, boto3), and the worker cache."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacs_ai.cli.main import app
from pacs_ai.config import Settings
from pacs_ai.index.db import upgrade_schema
from pacs_ai.storage import (
    Storage,
    StorageBucketMissing,
    StorageCredentialsRefused,
    StorageError,
    StorageKeyMissing,
    StorageUnavailable,
    open_storage,
)
from pacs_ai.storage.cache import LocalCache
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import instance_key, result_key
from pacs_ai.storage.s3 import S3Storage
from pacs_ai.storage.s3_obstore import ObstoreS3Storage
from tests.object_store import ACCESS_KEY, SECRET_KEY, SeaweedS3, storage_settings
from tests.peers import free_port
from tests.tls_certificates import certificate_authority, issue


@pytest.fixture(params=["embedded", "folder", "s3-obstore", "s3-boto3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Each backend: the embedded data directory, a ``file://`` folder, and an S3 bucket prefix through
    each S3 client."""
    if request.param == "embedded":
        yield open_storage(Settings(data_dir=tmp_path / "data", fsync=False))
    elif request.param == "folder":
        (tmp_path / "shared").mkdir()
        yield open_storage(Settings(data_dir=tmp_path / "data", storage_url=f"file://{tmp_path / 'shared'}"))
    else:
        store: SeaweedS3 = request.getfixturevalue("object_store")
        client = request.param.removeprefix("s3-")
        storage = open_storage(
            Settings(data_dir=tmp_path / "data", **storage_settings(store, storage_s3_client=client))
        )
        assert isinstance(storage, ObstoreS3Storage if client == "obstore" else S3Storage)
        yield storage


@pytest.fixture(params=["obstore", "boto3"])
def s3_client(request: pytest.FixtureRequest) -> str:
    """Each S3 client (``storage_s3_client``), for the tests of what each does on its own."""
    return str(request.param)


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


def test_wrong_credentials_are_named_as_such(object_store: SeaweedS3, s3_client: str, tmp_path: Path) -> None:
    wrong = storage_settings(
        object_store, storage_s3_secret_access_key="not-the-secret", storage_s3_client=s3_client
    )
    with pytest.raises(StorageCredentialsRefused, match="refused the credentials") as refused:
        open_storage(Settings(data_dir=tmp_path, **wrong)).check()
    assert "not-the-secret" not in str(refused.value)
    unknown = storage_settings(object_store, storage_s3_access_key_id="nobody", storage_s3_client=s3_client)
    with pytest.raises(StorageCredentialsRefused):
        open_storage(Settings(data_dir=tmp_path, **unknown)).put_bytes("results/x/y.dcm", b"x")
    with pytest.raises(StorageCredentialsRefused):
        open_storage(Settings(data_dir=tmp_path, **unknown)).get_file("results/x/y.dcm", tmp_path / "y.dcm")
    assert ACCESS_KEY  # the right identity still works:
    open_storage(
        Settings(data_dir=tmp_path, **storage_settings(object_store, storage_s3_client=s3_client))
    ).check()


def test_status_says_the_store_refused_the_credentials(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    """``pacs-ai status`` exits 1 and names refused credentials as the storage's problem."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    upgrade_schema(f"sqlite:///{data_dir / 'index.sqlite3'}")
    wrong = storage_settings(object_store, storage_s3_secret_access_key="not-the-secret")
    environment = {f"PACS_AI_{name.upper()}": str(value) for name, value in wrong.items()}
    environment |= {
        "PACS_AI_DATA_DIR": str(data_dir),
        "PACS_AI_BROKER_URL": "redis://127.0.0.1:1/0",
        "PACS_AI_STORAGE_S3_CLIENT": s3_client,
    }
    status = CliRunner().invoke(app, ["status", "--json"], env=environment)
    assert status.exit_code == 1
    report = json.loads(status.output)
    assert "refused the credentials" in report["storage"]["error"]
    assert any("fails its check" in p and "refused the credentials" in p for p in report["problems"])
    assert "not-the-secret" not in status.output


def test_credentials_come_from_a_file_or_the_environment(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left out of the settings, the credentials come from botocore's chain, for either client."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for here
    settings = storage_settings(object_store, storage_s3_client=s3_client)
    settings.pop("storage_s3_access_key_id")
    settings.pop("storage_s3_secret_access_key")

    with pytest.raises(StorageCredentialsRefused, match="no credentials"):
        open_storage(Settings(data_dir=tmp_path, **settings)).check()

    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    open_storage(Settings(data_dir=tmp_path, storage_s3_credentials_file=credentials, **settings)).check()
    credentials.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = wrong\n")
    with pytest.raises(StorageCredentialsRefused, match="refused the credentials"):
        open_storage(Settings(data_dir=tmp_path, storage_s3_credentials_file=credentials, **settings)).check()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    open_storage(Settings(data_dir=tmp_path, **settings)).check()


@pytest.fixture(scope="module")
def tls_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedS3, Path]]:
    """SeaweedFS serving S3 over HTTPS only, its certificate signed by a throwaway CA; the store, the CA."""
    directory = tmp_path_factory.mktemp("s3-tls")
    ca = certificate_authority(directory)
    (directory / "server").mkdir()
    server = issue(ca, directory / "server", "127.0.0.1", server=True)
    with SeaweedS3(tls=(ca.certificate, server.certificate, server.key)) as store:
        yield store, ca.certificate


def test_the_endpoints_certificate_is_verified_with_the_ca_bundle(
    tls_store: tuple[SeaweedS3, Path], s3_client: str, tmp_path: Path
) -> None:
    store, ca = tls_store
    settings = storage_settings(store, storage_s3_client=s3_client, storage_timeout_seconds=2)
    assert settings["storage_s3_endpoint_url"].startswith("https://")
    storage = open_storage(Settings(data_dir=tmp_path, storage_s3_ca_bundle=ca, **settings))
    storage.check()
    storage.put_bytes("results/1.2/1.3.dcm", b"over TLS")
    storage.get_file("results/1.2/1.3.dcm", tmp_path / "copy.dcm")
    assert (tmp_path / "copy.dcm").read_bytes() == b"over TLS"
    # Without the hospital's CA the certificate is not trusted: the store counts as unreachable.
    with pytest.raises(StorageUnavailable, match="cannot reach the bucket"):
        open_storage(Settings(data_dir=tmp_path, **settings)).check()


def test_a_missing_bucket_and_an_unreachable_store_are_named(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    missing = storage_settings(object_store, "s3://no-such-bucket/x", storage_s3_client=s3_client)
    with pytest.raises(StorageBucketMissing, match="no-such-bucket"):
        open_storage(Settings(data_dir=tmp_path, **missing)).check()
    nowhere = storage_settings(
        object_store,
        storage_s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        storage_timeout_seconds=2,
        storage_s3_client=s3_client,
    )
    with pytest.raises(StorageUnavailable, match="cannot reach the bucket"):
        open_storage(Settings(data_dir=tmp_path, **nowhere)).check()
    with pytest.raises(StorageUnavailable):
        open_storage(Settings(data_dir=tmp_path, **nowhere)).put_bytes("results/x/y.dcm", b"x")


def test_a_series_is_fetched_concurrently_whole_or_not_at_all(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        storage_fetch_concurrency=4,
        **storage_settings(object_store, storage_s3_client=s3_client),
    )
    storage = open_storage(settings)
    keys = [instance_key("1.2", "1.3", f"1.4.{n}") for n in range(24)]
    for n, key in enumerate(keys):
        storage.put_bytes(key, bytes([n]) * (1000 + n))
    target = tmp_path / "fetched"
    target.mkdir()
    items = [(key, target / f"{n}.dcm") for n, key in enumerate(keys)]
    gets = object_store.requests_served("GET")
    storage.get_files(items)
    assert object_store.requests_served("GET") - gets == len(keys)
    assert [path.read_bytes() for _, path in items] == [bytes([n]) * (1000 + n) for n in range(len(keys))]

    # One object missing: the fetch fails naming it, and nothing half-written is left.
    storage.delete(keys[7])
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(StorageKeyMissing, match="1.4.7"):
        storage.get_files([(key, again / f"{n}.dcm") for n, key in enumerate(keys)])
    assert not [p for p in again.iterdir() if p.name.startswith(".")], "a temporary file was left"
    assert not (again / "7.dcm").exists()


def test_obstore_refuses_a_forked_childs_requests_instead_of_hanging(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    """obstore's runtime does not survive a fork: a child of a process that used it gets an error."""
    storage = open_storage(
        Settings(data_dir=tmp_path, **storage_settings(object_store, storage_s3_client="obstore"))
    )
    storage.put_bytes("results/1.2/1.3.dcm", b"x")
    pid = os.fork()
    if pid == 0:  # the child: exit 3 on the expected error, 1 on anything else
        code = 1
        try:
            storage.exists("results/1.2/1.3.dcm")
        except StorageError as exc:
            code = 3 if "forked" in str(exc) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert storage.exists("results/1.2/1.3.dcm"), "the parent still works"


_UPLOADER_THREADS = """
import json, os, sys
from pathlib import Path
from pacs_ai.config import Settings
from pacs_ai.receive.uploader import Uploader
settings = Settings.model_validate_json(sys.argv[1])
uploader = Uploader(settings, sessions=None)
uploader.storage.put_bytes("results/1.2/1.4.dcm", b"x")  # from this (main) thread, at priority 0
uploader.storage.get_files([("results/1.2/1.4.dcm", Path(sys.argv[2]))])
threads = {}
for tid in os.listdir("/proc/self/task"):
    try:  # a thread that ended since the listing (a fetch thread) has no entry any more
        name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        threads.setdefault(name, set()).add(os.getpriority(os.PRIO_PROCESS, int(tid)))
    except (FileNotFoundError, ProcessLookupError):
        pass
print(json.dumps({name: sorted(values) for name, values in threads.items()}))
"""


def test_obstores_threads_upload_at_the_uploaders_lower_priority(
    object_store: SeaweedS3, tmp_path: Path
) -> None:
    """obstore signs and sends on its runtime's threads: the receiver's uploader starts them niced."""
    settings = {
        "data_dir": str(tmp_path),
        "storage_upload_nice": 7,
        **storage_settings(object_store, storage_s3_client="obstore"),
    }
    answer = subprocess.run(
        [sys.executable, "-c", _UPLOADER_THREADS, json.dumps(settings), str(tmp_path / "copy.dcm")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert answer.returncode == 0, answer.stderr
    threads = json.loads(answer.stdout)
    assert threads["tokio-rt-worker"] == [7], threads
    assert threads["python"][0] == 0, "the process itself keeps its priority"
    assert (tmp_path / "copy.dcm").read_bytes() == b"x"


def test_a_series_is_fetched_once_into_a_bounded_cache(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "worker",
        worker_cache_max_mb=1,
        fsync=False,
        **storage_settings(object_store, storage_s3_client=s3_client),
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


def test_the_cache_fetch_raises_the_storage_error(s3_client: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        storage_s3_client=s3_client,
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


def test_no_garbage_collection_runs_on_the_fetch_threads(
    s3_client: str, object_store: SeaweedS3, tmp_path: Path
) -> None:
    """A worker's series fetch pauses Python's cyclic collector (see ``pacs_ai.storage.cache``) and
    turns it back on after, also when the fetch fails; with the threshold at 1 every allocation of a
    fetch thread would otherwise start a collection."""
    settings = Settings(
        data_dir=tmp_path / "data", **storage_settings(object_store, storage_s3_client=s3_client)
    )
    storage = open_storage(settings)
    keys = [instance_key("1.2", "1.3", f"1.4.{index}") for index in range(40)]
    source = tmp_path / "object.dcm"
    source.write_bytes(b"\x01" * 50_000)
    for key in keys:
        storage.put_file(key, source)
    on_fetch_threads: list[str] = []

    def watch(phase: str, _info: dict[str, int]) -> None:
        name = threading.current_thread().name
        if phase == "start" and name.startswith("fetch"):
            on_fetch_threads.append(name)

    cache = LocalCache(storage, tmp_path / "cache", 2**30)
    threshold = gc.get_threshold()
    gc.callbacks.append(watch)
    gc.set_threshold(1)
    try:
        assert [path.read_bytes() for path in cache.fetch(keys)] == [source.read_bytes()] * len(keys)
        assert gc.isenabled()
        with pytest.raises(StorageError):
            cache.fetch([instance_key("1.2", "1.3", "1.5")])  # not in the store
        assert gc.isenabled()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(watch)
    assert on_fetch_threads == []
