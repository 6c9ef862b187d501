"""Reprocessing on a real index (SQLite) and spool: lost files come back, series reopen as new versions.

The receive side is driven through :class:`StoreHandler`, the code every listener
process runs for each C-STORE; nothing is mocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.ingest import Sender
from pacs_ai.index.models import AuditEvent, Instance, Job, JobState
from pacs_ai.receive.headers import STATUS_SUCCESS
from pacs_ai.receive.store import StoreHandler
from pacs_ai.route.reprocess import (
    find_indexed_studies,
    last_job_id,
    missing_files,
    reopen_series,
    reprocess_progress,
)
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import spool_path
from tests.integration.synthetic_ct import make_ct_series, write_series

SENDER = Sender("ORTHANC", "127.0.0.1")


@pytest.fixture
def received(tmp_path: Path) -> tuple[Settings, StoreHandler, list[Path]]:
    """Settings on a fresh index, and a 4-slice CT series stored through the receive path."""
    settings = Settings(data_dir=tmp_path / "data", fsync=False, min_free_disk_mb=0)
    settings.data_dir.mkdir()
    upgrade_schema(settings.effective_database_url)
    handler = StoreHandler(settings)
    sources = write_series(make_ct_series(4, 16, 16), tmp_path / "sources")
    store_all(handler, sources, tmp_path / "incoming")
    return settings, handler, sources


def store_all(handler: StoreHandler, sources: list[Path], incoming: Path) -> None:
    """C-STORE each file as the listener does: a temporary copy handed to the handler."""
    incoming.mkdir(exist_ok=True)
    for source in sources:
        temp = incoming / source.name
        shutil.copyfile(source, temp)
        meta = dcmread(source, stop_before_pixels=True).file_meta
        status, comment = handler.store(
            temp,
            sender=SENDER,
            sop_class=str(meta.MediaStorageSOPClassUID),
            sop_instance=str(meta.MediaStorageSOPInstanceUID),
        )
        assert status == STATUS_SUCCESS, comment
        temp.unlink(missing_ok=True)


def test_a_lost_file_received_again_is_restored_not_counted_as_a_duplicate(
    received: tuple[Settings, StoreHandler, list[Path]], tmp_path: Path
) -> None:
    settings, handler, sources = received
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    with session_scope(sessions) as session:
        session.execute(Instance.__table__.update().values(routed=True))
        paths = [spool_path(settings.spool_dir, key) for key in session.scalars(select(Instance.path))]
    # An administrator deletes the study from the spool; the index keeps its rows.
    study_dirs = {path.parents[1] for path in paths}
    for directory in study_dirs:
        shutil.rmtree(directory)

    files = HostFiles(settings)
    with session_scope(sessions) as session:
        [study] = find_indexed_studies(session, accession_numbers=["ACC0001"], files=files)
        [series] = study.series
        assert (series.instances, series.missing_files) == (4, 4)
        assert find_indexed_studies(session, accession_numbers=["ACC0001"], modality="MR", files=files) == []
        assert find_indexed_studies(session, study_dates=("20000101", "20000102"), files=files) == []

    store_all(handler, sources, tmp_path / "again")  # what a C-MOVE from the PACS delivers

    with session_scope(sessions) as session:
        rows = list(session.scalars(select(Instance)))
        assert len(rows) == 4 and all(spool_path(settings.spool_dir, row.path).is_file() for row in rows)
        assert [row.duplicates_received for row in rows] == [0, 0, 0, 0]
        # Restoring files is not itself a reason to analyse again: the rows stay routed.
        assert all(row.routed for row in rows)
        assert missing_files(session, [series.series_id], files) == {}
        restored = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.restored")).all()
        assert len(restored) == 4 and {event.actor for event in restored} == {"dicom:ORTHANC"}

    # A true second copy (file present) is still a duplicate, kept first.
    store_all(handler, sources[:1], tmp_path / "third")
    with session_scope(sessions) as session:
        assert sorted(session.scalars(select(Instance.duplicates_received))) == [0, 0, 0, 1]


def test_reopened_series_are_routed_again_and_progress_is_followed(
    received: tuple[Settings, StoreHandler, list[Path]],
) -> None:
    settings, _, _ = received
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    with session_scope(sessions) as session:
        session.execute(Instance.__table__.update().values(routed=True))
        [study] = find_indexed_studies(session, accession_numbers=["ACC0001"], files=HostFiles(settings))
        after = last_job_id(session)
    with session_scope(sessions) as session:
        assert (
            reopen_series(
                session, study.study_instance_uid, [study.series[0].series_id], actor="cli:test", detail={}
            )
            == 4
        )
    with session_scope(sessions) as session:
        assert not any(session.scalars(select(Instance.routed)))
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.reprocess")).all()
        assert event.actor == "cli:test" and event.detail["reopened_series"] == [
            study.series[0].series_instance_uid
        ]
        progress = reprocess_progress(session, [study.series[0].series_id], after)
        assert progress.undecided_series == 1 and not progress.done

        # The router decides (routed again) and opens a job: not done until the job finishes.
        session.execute(Instance.__table__.update().values(routed=True))
        job = Job(
            idempotency_key="k|v2",
            series_fk=study.series[0].series_id,
            profile="p",
            analyzer="a",
            analyzer_version="1",
            version=2,
            state=JobState.QUEUED,
            instance_count=4,
        )
        session.add(job)
        session.flush()
        progress = reprocess_progress(session, [study.series[0].series_id], after)
        assert (progress.undecided_series, progress.jobs_total, progress.jobs_finished) == (0, 1, 0)
        assert not progress.done
        job.state = JobState.SUCCEEDED
        session.flush()
        assert reprocess_progress(session, [study.series[0].series_id], after).done
