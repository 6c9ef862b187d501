"""An indexed phantom study with a finished lung analysis and an AI report draft, for the worklist tests.

The phantom CT is written by :func:`pacs_ai.synthetic.phantom.write_chest_phantom`
(small: 24 slices of 160x160), indexed as the listener would (patient, study,
series, instance rows), analysed by the real job runner with the built-in
``ct-chest-lung`` analyzer (real SEG and measurement SR in the results
directory), and given a report draft through the pipeline's entry point
:func:`pacs_ai.report.records.create_draft_record`.  The draft text is a
fixed template over the job's measurements: the drafter's own text is not
what these tests are about.

Importable (no pytest at module level) so the API and browser tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.encode.report_sr import DraftingModel, ReportText
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Instance, Job, JobState, Patient, Series, Study, utcnow
from pacs_ai.index.reports import Role
from pacs_ai.jobs.run import run_job
from pacs_ai.report.records import RecordedReport, create_draft_record
from pacs_ai.route.assembly import job_key
from pacs_ai.synthetic.phantom import write_chest_phantom
from pacs_ai.worklist.users import add_user

UID_PREFIX = "1.2.826.0.1.3680043.8.498.77."
ANALYZER = "ct-chest-lung"
DESTINATION = "pacs"
DRAFTER = DraftingModel("template", "pacs-ai-test-template-1")
RADIOLOGIST = ("rad1", "Radiologist^Rita", "correct horse battery")
ADMIN = ("admin1", "Admin^Adam", "staple battery horse")


@dataclass(frozen=True)
class IndexedStudy:
    study_uid: str
    job_id: int
    draft: RecordedReport
    source_dir: Path


def make_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, fsync=False, uid_prefix=UID_PREFIX)


def _index_series(sessions: sessionmaker[Session], paths: list[Path]) -> int:
    """Patient, study, series and instance rows for the files, as the listener records them; the series id."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    first = headers[0]
    now = utcnow()
    with session_scope(sessions) as session:
        patient = Patient(patient_id=str(first.PatientID), issuer="", patient_name=str(first.PatientName))
        session.add(patient)
        session.flush()
        study = Study(
            study_instance_uid=str(first.StudyInstanceUID),
            patient_fk=patient.id,
            accession_number=str(first.get("AccessionNumber") or "") or None,
            study_date=str(first.get("StudyDate") or "") or None,
            study_description=str(first.get("StudyDescription") or "") or None,
            first_received_at=now,
        )
        session.add(study)
        session.flush()
        series = Series(
            series_instance_uid=str(first.SeriesInstanceUID),
            study_fk=study.id,
            modality=str(first.Modality),
            sop_class_uid=str(first.SOPClassUID),
            instance_count=len(paths),
        )
        session.add(series)
        session.flush()
        for header, path in zip(headers, paths, strict=True):
            session.add(
                Instance(
                    sop_instance_uid=str(header.SOPInstanceUID),
                    series_fk=series.id,
                    sop_class_uid=str(header.SOPClassUID),
                    transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
                    instance_number=int(header.InstanceNumber),
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    routed=True,
                )
            )
        return series.id


def _open_job(sessions: sessionmaker[Session], series_id: int) -> int:
    with session_scope(sessions) as session:
        series = session.get(Series, series_id)
        assert series is not None
        job = Job(
            idempotency_key=job_key(series.series_instance_uid, "chest-ct", ANALYZER, "1.0.0", 1),
            series_fk=series.id,
            profile="chest-ct",
            analyzer=ANALYZER,
            analyzer_version="1.0.0",
            version=1,
            params={},
            destinations=[DESTINATION],
            priority_rules=[],
            state=JobState.QUEUED,
            attempts=0,
            instance_count=series.instance_count,
        )
        session.add(job)
        session.flush()
        return job.id


def template_text(findings: dict) -> ReportText:
    """A fixed-form draft over the recorded measurements (what a template drafter would write)."""
    lines = [
        f"{m['finding_site']}: {m['name']}{' (' + m['derivation'] + ')' if m['derivation'] else ''} "
        f"{m['value']:.1f} {m['unit']}."
        for m in findings.get("measurements", [])
    ]
    return ReportText(
        findings="Automated lung analysis of the chest CT.\n\n" + "\n".join(lines),
        impression="No acute abnormality identified by the automated analysis.",
    )


def add_users(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        add_user(session, RADIOLOGIST[0], RADIOLOGIST[2], Role.RADIOLOGIST, RADIOLOGIST[1])
        add_user(session, ADMIN[0], ADMIN[2], Role.ADMIN, ADMIN[1])


def index_analysed_study(
    settings: Settings, sessions: sessionmaker[Session], source_dir: Path, *, patient_id: str = "PHANTOM-WL"
) -> IndexedStudy:
    """Write, index and analyse a phantom CT, then record its report draft."""
    truth = write_chest_phantom(
        source_dir, slices=24, size=160, pixel_spacing_mm=1.5, slice_spacing_mm=8.0, patient_id=patient_id
    )
    del truth
    paths = sorted(source_dir.glob("*.dcm"))
    series_id = _index_series(sessions, paths)
    job_id = _open_job(sessions, series_id)
    run_job(settings, sessions, job_id)
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.SUCCEEDED, job.error if job else "no job"
        study_uid = job.series.study.study_instance_uid
        recorded = create_draft_record(
            session,
            settings,
            job_ids=[job_id],
            text=template_text(job.findings or {}),
            drafter=DRAFTER,
            guardrail={"passed": True, "checks": ["numbers-match-measurements"]},
        )
    return IndexedStudy(study_uid=study_uid, job_id=job_id, draft=recorded, source_dir=source_dir)
