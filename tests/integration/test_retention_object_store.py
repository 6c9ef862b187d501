"""Retention with an object store: the purged studies' objects leave the bucket (SeaweedFS, real S3).

The index is a real SQLite index whose rows are what the listener, the
uploader, a worker and the dispatch write; the store is ``weed server -s3``.
Checked: a purged study's instance and result objects are deleted from the
bucket, a study still needed keeps its objects, an object an index row still
names (the study received again under the same keys) is never deleted, and
deletions the store refuses are recorded, reported and done at a later pass.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from pacs_ai.cli.main import app
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    utcnow,
)
from pacs_ai.index.purge import policy_of, run_retention
from pacs_ai.index.storage_deletions import StorageDeletion
from pacs_ai.storage import open_storage, storage_for
from pacs_ai.storage.keys import instance_key, result_key, spool_path
from pacs_ai.storage.s3 import S3Storage
from tests.object_store import SeaweedS3, storage_settings

SLICES = 3


def _settings(store: SeaweedS3, tmp_path: Path, storage_url: str, **extra: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        fsync=False,
        retention_days=1,
        retention_purge_results=True,
        **storage_settings(store, storage_url, **extra),
    )


def _study(session: Session, settings: Settings, uid: str, *, delivered: bool) -> list[str]:
    """A study received 3 days ago, uploaded, analysed, its SEG sent (or not): its rows, files, objects."""
    storage = open_storage(settings)
    long_ago = utcnow() - timedelta(days=3)
    study = Study(study_instance_uid=uid, first_received_at=long_ago)
    session.add(study)
    session.flush()
    series = Series(
        series_instance_uid=f"{uid}.1", study_fk=study.id, modality="CT", last_received_at=long_ago
    )
    session.add(series)
    session.flush()
    keys = []
    for n in range(SLICES):
        key = instance_key(uid, series.series_instance_uid, f"{uid}.1.{n}")
        spooled = spool_path(settings.spool_dir, key)
        spooled.parent.mkdir(parents=True, exist_ok=True)
        spooled.write_bytes(b"DICM" * 100)
        storage.put_file(key, spooled)
        session.add(
            Instance(
                sop_instance_uid=f"{uid}.1.{n}",
                series_fk=series.id,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=key,
                size_bytes=400,
                received_at=long_ago,
                routed=True,
                uploaded_at=long_ago,
            )
        )
        keys.append(key)
    job = Job(
        idempotency_key=uid,
        series_fk=series.id,
        profile="p",
        analyzer="a",
        analyzer_version="1",
        version=1,
        instance_count=SLICES,
        state=JobState.SUCCEEDED,
    )
    session.add(job)
    session.flush()
    seg = result_key(uid, f"{uid}.9")
    storage.put_bytes(seg, b"SEG")
    result = Result(
        job_fk=job.id,
        kind="SEG",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        sop_instance_uid=f"{uid}.9",
        series_instance_uid=f"{uid}.9.1",
        path=seg,
    )
    session.add(result)
    session.flush()
    state = DeliveryState.SENT if delivered else DeliveryState.FAILED
    session.add(Delivery(result_fk=result.id, destination="pacs", state=state))
    return [*keys, seg]


@pytest.fixture(autouse=True)
def _no_other_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PACS_AI_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def index(tmp_path: Path) -> sessionmaker[Session]:
    (tmp_path / "data").mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'index.sqlite3'}"
    upgrade_schema(url)
    return make_session_factory(make_engine(url))


@pytest.mark.parametrize("s3_client", ["obstore", "boto3"])
def test_purged_studies_leave_the_bucket_and_refused_deletions_are_done_at_a_later_pass(
    object_store: SeaweedS3, s3_client: str, tmp_path: Path, index: sessionmaker[Session]
) -> None:
    url = object_store.new_prefix()
    settings = _settings(object_store, tmp_path, url, storage_s3_client=s3_client)
    storage = open_storage(settings)
    # A first pass with credentials the store refuses: the study is purged from the spool and the
    # index, its objects are recorded as still to delete.
    with session_scope(index) as session:
        refused = _study(session, settings, "1.2.826.3", delivered=True)
    wrong = _settings(
        object_store,
        tmp_path,
        url,
        storage_s3_secret_access_key="not-the-secret",
        storage_s3_client=s3_client,
    )
    run = run_retention(index, wrong, policy_of(wrong), actor="retention")
    (outcome,) = run.purged
    assert outcome.instances == SLICES and outcome.results == 1 and outcome.objects_deleted == 0
    assert any("refused the credentials" in p and "next retention pass" in p for p in run.problems)
    assert all(storage.exists(key) for key in refused), "nothing deleted with refused credentials"
    with session_scope(index) as session:
        pending = list(session.scalars(select(StorageDeletion)))
    assert sorted(row.key for row in pending) == sorted(refused) and {row.attempts for row in pending} == {1}
    assert "refused the credentials" in pending[0].last_error

    # pacs-ai status names them as a problem.
    status = CliRunner().invoke(app, ["status", "--json"], env=_environment(settings))
    report = json.loads(status.output)
    assert report["storage"]["objects_not_deleted"]["count"] == SLICES + 1
    assert any(f"could not delete {SLICES + 1} object(s)" in p for p in report["problems"])

    # The next pass, with the right credentials: the refused objects are deleted first (one call),
    # then a newly purgeable study with all its objects (one call); a study still needed (a failed
    # delivery) keeps its objects.
    with session_scope(index) as session:
        purged = _study(session, settings, "1.2.826.1", delivered=True)
        needed = _study(session, settings, "1.2.826.2", delivered=False)
    calls = _count_delete_calls(settings) if s3_client == "boto3" else None
    deletes = object_store.requests_served("DELETE")
    run = run_retention(index, settings, policy_of(settings), actor="retention")
    assert [o.study_instance_uid for o in run.purged] == ["1.2.826.1"]
    assert run.purged[0].objects_deleted == SLICES + 1 and run.deletions.deleted == SLICES + 1
    assert run.problems == [] and run.deletions.pending is not None and run.deletions.pending.count == 0
    assert object_store.requests_served("DELETE") - deletes == 2, "one DeleteObjects call for each"
    assert calls is None or calls == [SLICES + 1, SLICES + 1]
    assert not any(storage.exists(key) for key in purged + refused)
    assert all(storage.exists(key) for key in needed)
    assert not any(spool_path(settings.spool_dir, key).exists() for key in purged[:-1])
    with session_scope(index) as session:
        assert session.scalars(select(StorageDeletion)).all() == []


def test_an_object_the_index_names_again_is_never_deleted(
    object_store: SeaweedS3, tmp_path: Path, index: sessionmaker[Session]
) -> None:
    settings = _settings(object_store, tmp_path, object_store.new_prefix())
    storage = open_storage(settings)
    with session_scope(index) as session:
        keys = _study(session, settings, "1.2.826.4", delivered=True)
        # An earlier pass could not delete the first slice; the study was then received again
        # (pulled back for reprocessing): its row is not purged and names the key once more.
        now = utcnow()
        session.add(
            StorageDeletion(key=keys[0], first_failed_at=now, last_tried_at=now, attempts=1, last_error="x")
        )
        session.add(
            StorageDeletion(
                key="results/9.9/9.9.9.dcm",
                first_failed_at=now,
                last_tried_at=now,
                attempts=2,
                last_error="x",
            )
        )
        # ... and a job of it runs again, so the study itself stays.
        job = session.scalars(select(Job)).one()
        job.state = JobState.RUNNING
    run = run_retention(index, settings, policy_of(settings), actor="retention")
    assert run.purged == [] and run.deletions.in_use_again == 1 and run.deletions.deleted == 1
    assert all(storage.exists(key) for key in keys), "the index still names them"
    with session_scope(index) as session:
        assert session.scalars(select(StorageDeletion)).all() == []


def _environment(settings: Settings) -> dict[str, str]:
    values = {
        "PACS_AI_DATA_DIR": str(settings.data_dir),
        "PACS_AI_BROKER_URL": "redis://127.0.0.1:1/0",
        "PACS_AI_STORAGE_URL": str(settings.storage_url),
        "PACS_AI_STORAGE_S3_CLIENT": settings.storage_s3_client,
        "PACS_AI_STORAGE_S3_ENDPOINT_URL": str(settings.storage_s3_endpoint_url),
        "PACS_AI_STORAGE_S3_REGION": "us-east-1",
        "PACS_AI_STORAGE_S3_ACCESS_KEY_ID": str(settings.storage_s3_access_key_id),
    }
    secret = settings.storage_s3_secret_access_key
    assert secret is not None
    values["PACS_AI_STORAGE_S3_SECRET_ACCESS_KEY"] = secret.get_secret_value()
    return values


def _count_delete_calls(settings: Settings) -> list[int]:
    """The keys of each DeleteObjects call retention's boto3 storage makes (botocore's event hooks)."""
    calls: list[int] = []
    storage = storage_for(settings)
    assert isinstance(storage, S3Storage)
    storage.client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: calls.append(params["body"].count(b"<Key>"))
    )
    return calls
