"""AI study priority end to end in one process: route, run, raise, list.

A real chest radiograph (the SIIM CR sample) is indexed, routed by a profile
with priority rules and a time limit, and run by ``run_job`` with a small
stand-in classifier (registered here: it loads the image with the real
``load_radiograph`` and reports the probabilities its parameters give, so the
outcome is known).  The index (SQLite, migrated by Alembic), the encoders and
the ``pacs-ai studies list`` command are the real ones.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.analyze.base import AlgorithmInfo, AnalysisResult, Code, FindingSpec
from pacs_ai.analyze.radiograph import load_radiograph
from pacs_ai.analyze.registry import register_analyzer
from pacs_ai.analyze.volume import Volume
from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Instance, Job, JobState, Result, Series, Study, utcnow
from pacs_ai.jobs.run import run_job
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.route.profiles import Profile
from pacs_ai.route.scheduler import Scheduler
from pacs_ai.service import CeleryTaskQueue
from tests.integration.test_cli import pacs_ai_in_process
from tests.peers import require_shared_data
from workers.factory import create_app

REPO_ROOT = Path(__file__).resolve().parents[2]
ANALYZER = "test-cxr-classifier"
FINDINGS = {
    "36118008": Code("36118008", "SCT", "Pneumothorax"),
    "60046008": Code("60046008", "SCT", "Pleural effusion"),
}


class StandInClassifier:
    """A deterministic classifier for a radiograph: the probabilities come from ``params``."""

    name = ANALYZER
    version = "1.0.0"

    def load(self, paths: Sequence[Path], params: dict[str, Any]) -> Volume:
        return load_radiograph(paths)

    def analyze(self, volume: Volume, params: dict[str, Any]) -> AnalysisResult:
        assert volume.voxels.shape == (1, 1024, 1024)  # the real radiograph, as load_radiograph gives it
        return AnalysisResult(
            algorithm=AlgorithmInfo(
                self.name, self.version, Code("123109", "DCM", "Artificial Intelligence")
            ),
            labels=None,
            segments=[],
            measurements=[],
            findings=[
                FindingSpec(FINDINGS[code], probability=p, threshold=0.5)
                for code, p in params["probabilities"].items()
            ],
        )


register_analyzer(ANALYZER, StandInClassifier, replace=True)

PROFILE = Profile.model_validate(
    {
        "name": "cxr",
        "match": {"modality": ["CR", "DX"]},
        "analyzers": [
            {
                "name": ANALYZER,
                "params": {"probabilities": {"36118008": 0.93, "60046008": 0.3}},
                "timeout_seconds": 120,
                "priority": [
                    {"finding": "Pleural effusion", "above": 0.2, "set": "URGENT"},
                    {"finding": "36118008", "above": 0.8, "set": "STAT"},
                ],
            }
        ],
    }
)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", fsync=False, uid_prefix="1.2.826.0.1.3680043.8.498.77.")
    upgrade_schema(settings.effective_database_url)
    return settings


@pytest.fixture()
def sessions(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.effective_database_url))


def _index(sessions: sessionmaker[Session], radiograph: Path) -> dict[str, str]:
    """Three studies: an old one, the radiograph's (middle), and a newest one already URGENT."""
    header = pydicom.dcmread(radiograph, stop_before_pixels=True)
    now = utcnow()
    with session_scope(sessions) as session:
        old = Study(
            study_instance_uid="1.2.826.0.1.3680043.8.498.77.1", first_received_at=now - timedelta(hours=2)
        )
        cxr = Study(
            study_instance_uid=str(header.StudyInstanceUID), first_received_at=now - timedelta(hours=1)
        )
        newest = Study(
            study_instance_uid="1.2.826.0.1.3680043.8.498.77.3",
            first_received_at=now,
            ai_priority="URGENT",
            ai_priority_reason="earlier result",
        )
        session.add_all([old, cxr, newest])
        session.flush()
        series = Series(
            series_instance_uid=str(header.SeriesInstanceUID),
            study_fk=cxr.id,
            modality=str(header.Modality),
            sop_class_uid=str(header.SOPClassUID),
        )
        session.add(series)
        session.flush()
        session.add(
            Instance(
                sop_instance_uid=str(header.SOPInstanceUID),
                series_fk=series.id,
                sop_class_uid=str(header.SOPClassUID),
                transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
                path=str(radiograph),
                size_bytes=radiograph.stat().st_size,
                received_at=now - timedelta(seconds=10),
            )
        )
    return {"old": old.study_instance_uid, "cxr": cxr.study_instance_uid, "newest": newest.study_instance_uid}


def _recovered_time_limits(settings: Settings, sessions: sessionmaker[Session]) -> dict[int, list[float]]:
    """Job id -> Celery (hard, soft) time limits of the analysis messages ``Scheduler.recover`` sends."""
    app = create_app(settings.model_copy(update={"broker_url": "memory://"}))
    Scheduler(app.settings, sessions, CeleryTaskQueue(app)).recover()
    limits: dict[int, list[float]] = {}
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("cpu")
        try:
            while True:
                message = queue.get(timeout=0.5)
                limits[message.payload[0][0]] = list(message.headers["timelimit"])
                message.ack()
        except queue.Empty:
            pass
        finally:
            queue.close()
    return limits


def _pacs_ai(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs-ai ARGS`` in a shell that knows only this index's data directory (in this process)."""
    return pacs_ai_in_process(*args, PACS_AI_DATA_DIR=str(settings.data_dir))


def test_findings_raise_the_study_priority_and_the_worklist_shows_it_first(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    radiograph = require_shared_data("cxr-cr") / "siim_cr.dcm"
    studies = _index(sessions, radiograph)

    # Routing copies the step's rules and time limit into the job.
    with session_scope(sessions) as session:
        routing = route_ready_series(session, [PROFILE], now=utcnow(), default_quiet_seconds=0)
    (ticket,) = routing.new_jobs
    job_id = ticket.job_id
    assert (ticket.queue, ticket.timeout_seconds) == ("cpu", 120.0)
    with session_scope(sessions) as session:
        job = session.get_one(Job, job_id)
        assert job.priority_rules == [
            {"finding": "Pleural effusion", "above": 0.2, "set": "URGENT"},
            {"finding": "36118008", "above": 0.8, "set": "STAT"},
        ]

    # The scheduler's recovery re-sends it with that limit (a real Celery app on kombu's memory transport).
    assert _recovered_time_limits(settings, sessions) == {job_id: [180.0, 120.0]}

    assert run_job(settings, sessions, job_id) == []

    reason = "Pneumothorax p=0.93 > 0.8 (profile cxr, model test-cxr-classifier 1.0.0)"
    with session_scope(sessions) as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        assert job.findings is not None
        assert [
            (f["finding"], f["probability"], f["threshold"], f["present"]) for f in job.findings["findings"]
        ] == [
            ("Pneumothorax", 0.93, 0.5, True),
            ("Pleural effusion", 0.3, 0.5, False),
        ]
        assert job.findings["priority"] == {"level": "STAT", "reason": reason}
        kinds = session.scalars(select(Result.kind).where(Result.job_fk == job_id)).all()
        assert kinds == ["SR"]  # a classifier: no SEG
        study = session.scalars(select(Study).where(Study.study_instance_uid == studies["cxr"])).one()
        assert (study.ai_priority, study.ai_priority_reason) == ("STAT", reason)
        assert study.ai_priority_at is not None
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.priority")).all()
        assert [(e.object_type, e.object_uid, e.detail["priority"]) for e in events] == [
            ("study", studies["cxr"], "STAT")
        ]

        # A later job whose rules only ask for URGENT must not lower STAT.
        series_fk = session.get_one(Job, job_id).series_fk
        calmer = Job(
            idempotency_key="calmer|v2",
            series_fk=series_fk,
            profile="cxr",
            analyzer=ANALYZER,
            analyzer_version="1.0.0",
            version=2,
            params={"probabilities": {"36118008": 0.99}},
            destinations=[],
            priority_rules=[{"finding": "pneumothorax", "above": 0.5, "set": "URGENT"}],
            instance_count=1,
        )
        session.add(calmer)
        session.flush()
        calmer_id = calmer.id
    run_job(settings, sessions, calmer_id)
    with session_scope(sessions) as session:
        assert session.get_one(Job, calmer_id).state == JobState.SUCCEEDED
        study = session.scalars(select(Study).where(Study.study_instance_uid == studies["cxr"])).one()
        assert (study.ai_priority, study.ai_priority_reason) == ("STAT", reason)
        assert (
            len(session.scalars(select(AuditEvent).where(AuditEvent.action == "study.priority")).all()) == 1
        )

    listed = _pacs_ai(settings, "studies", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["study_instance_uid"], row["ai_priority"]) for row in rows] == [
        (studies["cxr"], "STAT"),
        (studies["newest"], "URGENT"),
        (studies["old"], None),
    ]
    assert rows[0]["ai_priority_reason"] == reason
    table = _pacs_ai(settings, "studies", "list")
    assert table.returncode == 0, table.stderr
    assert "STAT" in table.stdout and "URGENT" in table.stdout


def test_job_with_unreadable_rules_fails_with_the_profile_named(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    radiograph = require_shared_data("cxr-cr") / "siim_cr.dcm"
    _index(sessions, radiograph)
    with session_scope(sessions) as session:
        series = session.scalars(select(Series)).one()
        job = Job(
            idempotency_key="broken|v1",
            series_fk=series.id,
            profile="cxr",
            analyzer=ANALYZER,
            analyzer_version="1.0.0",
            version=1,
            params={"probabilities": {"36118008": 0.9}},
            destinations=[],
            priority_rules=[{"finding": "36118008", "above": 0.5, "set": "EMERGENCY"}],
            instance_count=1,
        )
        session.add(job)
        session.flush()
        job_id = job.id
    assert run_job(settings, sessions, job_id) == []
    with session_scope(sessions) as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.FAILED
        assert job.error is not None and job.error.startswith("profile cxr: priority rules cannot be read")
