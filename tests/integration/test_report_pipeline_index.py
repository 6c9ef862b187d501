"""The report pipeline on a real index: when a study is due, the draft it records, idempotence, versions.

A small phantom CT is indexed and analysed by the real job runner (as in the
worklist tests); :class:`~pacs_ai.report.pipeline.ReportPipeline` then decides
and drafts with the profiles of a temporary profiles directory.  No broker:
the Celery task is a thin wrapper around these calls (the e2e test runs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Delivery, Job, JobState, Result
from pacs_ai.index.reports import ReportDraft, ReportStatus
from pacs_ai.jobs.run import run_job
from pacs_ai.report.pipeline import TEMPLATE_MODEL_ID, ReportPipeline
from pacs_ai.route.assembly import job_key
from pacs_ai.route.scheduler import Scheduler
from pacs_ai.service import CeleryTaskQueue
from pacs_ai.storage.files import HostFiles
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.worklist_study import ANALYZER, DESTINATION, UID_PREFIX, _index_series, _open_job
from tests.peers import dciodvfy_errors, dsrdump
from workers.factory import create_app
from workers.tasks import DRAFT_TASK

PROFILE = """\
name: chest-ct
match: {modality: [CT]}
analyzers: [{name: ct-chest-lung}]
destinations: [pacs]
"""


def _profiles(directory: Path, report: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chest-ct.yaml").write_text(PROFILE + (f"report: {report}\n" if report else ""))
    return directory


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("phantom")
    write_chest_phantom(directory, slices=24, size=160, pixel_spacing_mm=1.5, slice_spacing_mm=8.0)
    return directory


def _setup(tmp_path: Path, phantom_dir: Path, report: str | None = None):  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        fsync=False,
        uid_prefix=UID_PREFIX,
        profiles_dir=_profiles(tmp_path / "profiles", report),
    )
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    series_id = _index_series(sessions, sorted(phantom_dir.glob("*.dcm")))
    job_id = _open_job(sessions, series_id)
    return settings, sessions, series_id, job_id


def _new_version(sessions: sessionmaker[Session], job_id: int) -> int:
    """A second version of the job, as reprocessing or late instances open it."""
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        again = Job(
            idempotency_key=job_key(job.series.series_instance_uid, job.profile, ANALYZER, "1.0.0", 2),
            series_fk=job.series_fk,
            profile=job.profile,
            analyzer=ANALYZER,
            analyzer_version="1.0.0",
            version=2,
            params={},
            destinations=[DESTINATION],
            priority_rules=[],
            state=JobState.QUEUED,
            attempts=0,
            instance_count=job.instance_count,
        )
        session.add(again)
        session.flush()
        return again.id


def test_last_job_drafts_once_and_a_new_version_supersedes(tmp_path: Path, phantom_dir: Path) -> None:
    settings, sessions, _, job_id = _setup(tmp_path, phantom_dir)
    pipeline = ReportPipeline(settings, sessions)

    # Nothing is due while the job waits.
    assert pipeline.study_to_draft(job_id) is None
    run_job(settings, sessions, job_id)
    study_id = pipeline.study_to_draft(job_id)
    assert study_id is not None

    outcome = pipeline.draft_study(study_id)
    assert outcome.status == "drafted", outcome.detail
    assert outcome.version == 1 and len(outcome.delivery_ids) == 1
    with session_scope(sessions) as session:
        draft = session.get(ReportDraft, outcome.draft_id)
        assert draft is not None
        assert (draft.backend, draft.model, draft.job_ids) == ("template", TEMPLATE_MODEL_ID, [job_id])
        assert draft.status == ReportStatus.DRAFT and draft.fallback_reason is None
        assert draft.guardrail is not None and draft.guardrail["passed"] is True
        assert "mL" in draft.findings_text and draft.impression_text.strip()
        assert "UNVERIFIED" not in draft.findings_text  # the SR's flags say it; the signed text must not
        result = session.scalar(select(Result).where(Result.sop_instance_uid == draft.draft_sr_uid))
        assert result is not None and result.kind == "SR-DRAFT"
        delivery = session.get(Delivery, outcome.delivery_ids[0])
        assert delivery is not None and delivery.destination == DESTINATION
        sr_path = HostFiles(settings).local_path(result.path)  # the index records the storage key
    sr = pydicom.dcmread(sr_path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert dciodvfy_errors(sr_path) == []
    assert dsrdump(sr_path).returncode == 0

    # A redelivered or duplicate message does nothing.
    assert pipeline.study_to_draft(job_id) is None
    again = pipeline.draft_study(study_id)
    assert again.status == "skipped" and "same jobs" in again.detail

    # A new version of the analysis makes a new draft version, which supersedes the open one.
    second = _new_version(sessions, job_id)
    assert pipeline.study_to_draft(job_id) is None  # v2 is still queued
    run_job(settings, sessions, second)
    newer = pipeline.draft_study(pipeline.study_to_draft(second) or -1)
    assert newer.status == "drafted" and newer.version == 2
    with session_scope(sessions) as session:
        drafts = {d.version: (d.status, d.job_ids) for d in session.scalars(select(ReportDraft))}
    assert drafts == {1: (ReportStatus.SUPERSEDED, [job_id]), 2: (ReportStatus.DRAFT, [second])}
    assert newer.sr_instance_uid != outcome.sr_instance_uid
    # The new draft SR names the one it supersedes as its predecessor.
    with session_scope(sessions) as session:
        newer_path = HostFiles(settings).local_path(
            session.scalars(select(Result.path).where(Result.sop_instance_uid == newer.sr_instance_uid)).one()
        )
    newer_sr = pydicom.dcmread(newer_path)
    [predecessor_study] = newer_sr.PredecessorDocumentsSequence
    [predecessor_series] = predecessor_study.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in predecessor_series.ReferencedSOPSequence] == [
        outcome.sr_instance_uid
    ]
    assert newer_sr.VerificationFlag == "UNVERIFIED"
    assert dciodvfy_errors(newer_path) == []
    assert dsrdump(newer_path).returncode == 0


def test_profile_without_drafting_drafts_nothing(tmp_path: Path, phantom_dir: Path) -> None:
    settings, sessions, _, job_id = _setup(tmp_path, phantom_dir, report="false")
    run_job(settings, sessions, job_id)
    pipeline = ReportPipeline(settings, sessions)
    assert pipeline.study_to_draft(job_id) is None
    with session_scope(sessions) as session:
        study_id = session.get(Job, job_id).series.study_fk  # type: ignore[union-attr]
    outcome = pipeline.draft_study(study_id)
    assert outcome.status == "skipped" and "drafts reports" in outcome.detail


def test_unreachable_llm_falls_back_to_the_template(tmp_path: Path, phantom_dir: Path) -> None:
    # Port 9 on loopback: nothing listens (connection refused at once); no retries to keep it fast.
    report = "{backend: openai, params: {base_url: 'http://127.0.0.1:9/v1', model: m, max_retries: 0}}"
    settings, sessions, _, job_id = _setup(tmp_path, phantom_dir, report=report)
    run_job(settings, sessions, job_id)
    pipeline = ReportPipeline(settings, sessions)
    outcome = pipeline.draft_study(pipeline.study_to_draft(job_id) or -1)
    assert outcome.status == "drafted"
    with session_scope(sessions) as session:
        draft = session.get(ReportDraft, outcome.draft_id)
        assert draft is not None and draft.backend == "template"
        assert draft.fallback_reason and "openai backend failed" in draft.fallback_reason
        assert draft.guardrail and draft.guardrail["requested_backend"] == "openai"


def test_a_trained_models_whole_report_is_kept_in_the_draft_sr(tmp_path: Path, phantom_dir: Path) -> None:
    """A Llama trained here (seconds) on this study's report prompt drafts the whole report; the pipeline
    keeps it: the draft SR (TID 2000, unverified, the model as its device observer) carries the model's
    text, which is not the template's, with the guardrails passed; dciodvfy and dsrdump find it clean."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from pacs_ai.report.drafters.template import TemplateDrafter
    from pacs_ai.report.evidence import evidence_from_findings
    from pacs_ai.report.prompts import parse_report
    from tests.drafter_models import model_report, train_report_model

    model_dir = tmp_path / "report-llama"
    # One thread: two of a busy 2-core machine make a model this small many times slower.
    params = f"model_dir: '{model_dir}', max_new_tokens: 320, threads: 1"
    report = f"{{backend: transformers, params: {{{params}}}}}"
    settings, sessions, _, job_id = _setup(tmp_path, phantom_dir, report=report)
    run_job(settings, sessions, job_id)
    # The evidence the pipeline drafts from: this series' header and the job's findings.
    with session_scope(sessions) as session:
        findings = [dict(session.get(Job, job_id).findings or {})]  # type: ignore[union-attr]
    header = pydicom.dcmread(sorted(phantom_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    evidence = evidence_from_findings(header, findings, header_fields=settings.report_header_fields)
    train_report_model(model_dir, evidence)
    taught = parse_report(model_report(evidence))
    assert taught.findings != TemplateDrafter().draft_report(evidence).findings

    pipeline = ReportPipeline(settings, sessions)
    threads = torch.get_num_threads()
    outcome = pipeline.draft_study(pipeline.study_to_draft(job_id) or -1)
    assert outcome.status == "drafted", outcome.detail
    assert torch.get_num_threads() == threads  # the profile's thread count held while generating only
    with session_scope(sessions) as session:
        draft = session.get(ReportDraft, outcome.draft_id)
        assert draft is not None
        assert (draft.backend, draft.model, draft.fallback_reason) == ("transformers", model_dir.name, None)
        assert draft.guardrail is not None and draft.guardrail["passed"] is True
        assert (draft.findings_text, draft.impression_text) == (taught.findings, taught.impression)
        sr_path = HostFiles(settings).local_path(
            session.scalars(select(Result.path).where(Result.sop_instance_uid == draft.draft_sr_uid)).one()
        )
    sr = pydicom.dcmread(sr_path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert dciodvfy_errors(sr_path) == []
    dumped = dsrdump(sr_path, "+Pl")  # long texts in full
    assert dumped.returncode == 0 and dumped.stderr == ""
    assert f'="transformers {model_dir.name}"' in dumped.stdout  # the device observer: backend and model
    assert '="AI draft, not verified' in dumped.stdout
    # The model's lines, in the model's order.
    first, last = taught.findings.splitlines()[0], taught.findings.splitlines()[-1]
    assert dumped.stdout.index(first) < dumped.stdout.index(last)


@pytest.mark.parametrize(
    ("report", "problem"),
    [
        (
            "{backend: nope}",
            "unknown drafter backend 'nope'; known backends: openai, retrieval, template, transformers",
        ),
        ("{backend: template, params: {x: 1}}", "template drafter parameters: x: Extra inputs"),
        ("{backend: transformers, params: {model_dir: /no/such/model}}", "/no/such/model is not a directory"),
        ("{backend: openai, params: {model: m}}", "set report.params.base_url"),
    ],
)
def test_profile_report_section_is_checked_when_loaded(tmp_path: Path, report: str, problem: str) -> None:
    from pacs_ai.route.profiles import ProfileError, load_profiles

    with pytest.raises(ProfileError) as raised:
        load_profiles(_profiles(tmp_path, report))
    assert "chest-ct.yaml" in str(raised.value) and "report" in str(raised.value)
    assert problem in str(raised.value)


def test_profile_report_defaults_to_the_template_and_can_be_switched_off(tmp_path: Path) -> None:
    from pacs_ai.route.profiles import load_profiles

    (default,) = load_profiles(_profiles(tmp_path / "a", None))
    assert default.report is not None and default.report.backend == "template" and default.drafts_reports
    (off,) = load_profiles(_profiles(tmp_path / "b", "false"))
    assert off.report is None and not off.drafts_reports


def test_installation_switch_turns_drafting_off(tmp_path: Path, phantom_dir: Path) -> None:
    settings, sessions, _, job_id = _setup(tmp_path, phantom_dir)
    run_job(settings, sessions, job_id)
    off = settings.model_copy(update={"report_drafts_enabled": False})
    assert ReportPipeline(off, sessions).study_to_draft(job_id) is None
    assert ReportPipeline(settings, sessions).study_to_draft(job_id) is not None


def _recovered_messages(settings: Settings, sessions: sessionmaker[Session]) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message ``Scheduler.recover`` sends to the ``cpu`` queue."""
    app = create_app(settings.model_copy(update={"broker_url": "memory://"}))
    Scheduler(app.settings, sessions, CeleryTaskQueue(app)).recover()
    sent: list[tuple[str, list[Any]]] = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("cpu")
        try:
            while True:
                message = queue.get(timeout=0.5)
                sent.append((message.headers["task"], list(message.payload[0])))
                message.ack()
        except queue.Empty:
            pass
        finally:
            queue.close()
    return sent


def test_start_up_queues_drafts_that_were_due_but_never_queued(tmp_path: Path, phantom_dir: Path) -> None:
    settings, sessions, _, job_id = _setup(tmp_path, phantom_dir)
    run_job(settings, sessions, job_id)  # finished, but (as if the worker died) no draft was queued
    pipeline = ReportPipeline(settings, sessions)
    study_id = pipeline.study_to_draft(job_id)
    assert study_id is not None

    assert _recovered_messages(settings, sessions) == [(DRAFT_TASK, [study_id])]
    assert pipeline.draft_study(study_id).status == "drafted"
    assert _recovered_messages(settings, sessions) == []
