"""Report drafts in the index: recording a new draft, signing it, rejecting it, reading them back.

This is the report layer's record keeping: the drafting worker (through
:mod:`pacs_ai.report.pipeline`) and the worklist web app both call it, and it
calls only the encode, index and storage layers, so a worker never needs the
web package.

The pipeline calls :func:`create_draft_record` once the drafter has written a
study's report: it encodes the draft SR, stores it next to the analysis
results, records it as a :class:`~pacs_ai.index.models.Result` of the study's
job with a delivery to each of that job's destinations (so the dispatcher
sends it to the PACS like the SEG and measurement SR), and adds the
:class:`~pacs_ai.index.reports.ReportDraft` row the worklist shows.

The worklist calls :func:`accept_draft` and :func:`reject_draft`.  Accepting
writes the signed SR (COMPLETE / VERIFIED / FINAL, the draft as predecessor)
and queues its deliveries the same way.  Every step writes an audit event.

Deliveries are created due now (``next_attempt_at`` = now): the scheduler
hands due deliveries to the dispatch queue on its next tick, so neither the
worklist process nor the pipeline needs a broker connection of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_ai.config import Settings
from pacs_ai.encode.equipment import EquipmentInfo
from pacs_ai.encode.fhir_report import ReportFacts, build_diagnostic_report
from pacs_ai.encode.io import write_dataset
from pacs_ai.encode.report_sr import (
    DraftingModel,
    ReportText,
    Verifier,
    build_draft_sr,
    build_signed_sr,
    draft_sr_uids,
    signed_sr_uids,
)
from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Patient,
    Result,
    Study,
    utcnow,
)
from pacs_ai.index.reports import ReportDraft, ReportStatus, Role, User
from pacs_ai.index.results import record_result
from pacs_ai.storage.base import StorageError
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import result_key

__all__ = [
    "RecordedReport",
    "ReportConflict",
    "ReportNotFound",
    "accept_draft",
    "create_draft_record",
    "diagnostic_report_for",
    "equipment_for",
    "latest_draft",
    "reject_draft",
]

log = logging.getLogger(__name__)

#: Result.kind of the report SRs (the analysis SR is "SR").
DRAFT_RESULT_KIND = "SR-DRAFT"
SIGNED_RESULT_KIND = "SR-SIGNED"


class ReportNotFound(LookupError):
    """No such draft (or study)."""


class ReportConflict(RuntimeError):
    """The draft is not open any more (already signed, rejected or superseded)."""


@dataclass(frozen=True)
class RecordedReport:
    """What :func:`create_draft_record`, :func:`accept_draft` and :func:`reject_draft` did."""

    draft_id: int
    status: ReportStatus
    #: SOP Instance UID of the SR written by this step (None for a rejection).
    sr_instance_uid: str | None
    sr_path: Path | None
    #: Deliveries of that SR, due now.
    delivery_ids: list[int]


def equipment_for(settings: Settings) -> EquipmentInfo:
    """The pacs-ai identity for report SRs, as ``jobs/run.py`` builds it for the analysis results."""
    return EquipmentInfo(
        institution_name=settings.institution_name,
        station_name=settings.station_name,
        device_serial_number=settings.ae_title,
    )


def _read_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _store_sr(settings: Settings, files: HostFiles, study_uid: str, sr: Dataset) -> tuple[Path, str]:
    """Write a report SR and put it into the storage (any host's dispatch reads it there): (file, key)."""
    sop_uid = str(sr.SOPInstanceUID)
    directory = files.staging_dir(study_uid)
    directory.mkdir(parents=True, exist_ok=True)
    path = write_dataset(sr, directory / f"{sop_uid}.dcm", fsync=settings.fsync)
    key = result_key(study_uid, sop_uid)
    files.put_result(key, path)
    return path, key


def _record_sr_result(
    session: Session, job: Job, kind: str, sr: Dataset, key: str, destinations: Sequence[str]
) -> list[int]:
    """Record a report SR as a result of ``job``; return the ids of its pending deliveries.

    They are due at once: the scheduler sends them at its next pass, unless the
    caller queues them first (the draft task does).
    """
    result = record_result(
        session,
        job.id,
        kind=kind,
        sop_class_uid=str(sr.SOPClassUID),
        sop_instance_uid=str(sr.SOPInstanceUID),
        series_instance_uid=str(sr.SeriesInstanceUID),
        path=key,
        destinations=destinations,
        next_attempt_at=utcnow(),
    )
    return list(
        session.scalars(
            select(Delivery.id).where(
                Delivery.result_fk == result.id, Delivery.state == DeliveryState.PENDING
            )
        )
    )


def _destinations(jobs: Sequence[Job]) -> list[str]:
    """Every destination of the jobs, first-seen order."""
    seen: list[str] = []
    for job in jobs:
        for destination in job.destinations or []:
            if destination not in seen:
                seen.append(destination)
    return seen


def create_draft_record(
    session: Session,
    settings: Settings,
    *,
    job_ids: Sequence[int],
    text: ReportText,
    drafter: DraftingModel,
    guardrail: dict[str, Any] | None = None,
    fallback_reason: str | None = None,
) -> RecordedReport:
    """Record a new AI draft of the study the jobs belong to, with its draft SR (written and queued).

    The jobs must be finished (SUCCEEDED) jobs of one study; their source
    series and result objects (SEG, measurement SR) are the draft SR's
    evidence, and their destinations receive it.  An open draft of the same
    study from earlier is marked ``superseded``.  Runs in the caller's
    transaction (the SR file is written before commit; a rollback leaves an
    unreferenced file that a re-run overwrites).

    Raises
    ------
    ValueError
        If no job is given, a job is missing or unfinished, or the jobs span studies.
    """
    if not job_ids:
        raise ValueError("a report draft needs at least one finished job")
    jobs = [session.get(Job, job_id) for job_id in job_ids]
    missing = [job_id for job_id, job in zip(job_ids, jobs, strict=True) if job is None]
    if missing:
        raise ValueError(f"jobs {missing} do not exist")
    found = [job for job in jobs if job is not None]
    unfinished = [job.id for job in found if job.state != JobState.SUCCEEDED]
    if unfinished:
        raise ValueError(f"jobs {unfinished} have not succeeded; a draft is written from finished jobs only")
    studies = {job.series.study_fk for job in found}
    if len(studies) != 1:
        raise ValueError(f"jobs {list(job_ids)} belong to {len(studies)} studies; one draft covers one study")
    study = session.get(Study, studies.pop())
    assert study is not None

    files = HostFiles(settings)
    evidence: list[Dataset] = []
    for job in found:
        keys = session.scalars(
            select(Instance.path)
            .where(Instance.series_fk == job.series_fk)
            .order_by(Instance.instance_number)
        )
        evidence.extend(_read_header(p) for p in files.local_paths(list(keys)))
    for job in found:
        results = session.scalars(
            select(Result).where(Result.job_fk == job.id, Result.kind.in_(("SEG", "SR"))).order_by(Result.id)
        )
        evidence.extend(_read_header(p) for p in files.local_paths([r.path for r in results]))
    if not evidence:
        raise ValueError(f"jobs {list(job_ids)} have no source instances left in the index")

    version = (
        session.scalar(select(func.max(ReportDraft.version)).where(ReportDraft.study_fk == study.id)) or 0
    ) + 1
    key = "|".join([study.study_instance_uid, "report", *sorted(job.idempotency_key for job in found)])
    series_uid, sop_uid = draft_sr_uids(key, version, settings.uid_prefix)
    superseded = list(
        session.scalars(
            select(ReportDraft).where(
                ReportDraft.study_fk == study.id, ReportDraft.status == ReportStatus.DRAFT
            )
        )
    )
    sr = build_draft_sr(
        evidence=evidence,
        text=text,
        drafter=drafter,
        equipment=equipment_for(settings),
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        instance_number=version,
        uid_prefix=settings.uid_prefix,
        previous_versions=_draft_srs(session, files, superseded),
    )
    path, sr_key = _store_sr(settings, files, study.study_instance_uid, sr)

    for older in superseded:
        older.status = ReportStatus.SUPERSEDED
    draft = ReportDraft(
        study_fk=study.id,
        job_fk=found[0].id,
        job_ids=[job.id for job in found],
        version=version,
        status=ReportStatus.DRAFT,
        findings_text=text.findings,
        impression_text=text.impression,
        backend=drafter.backend,
        model=drafter.model_id,
        guardrail=guardrail,
        fallback_reason=fallback_reason,
        draft_sr_uid=sop_uid,
        edited=False,
    )
    session.add(draft)
    session.flush()
    delivery_ids = _record_sr_result(session, found[0], DRAFT_RESULT_KIND, sr, sr_key, _destinations(found))
    record_audit(
        session,
        actor="drafter",
        action="report.drafted",
        object_type="study",
        object_uid=study.study_instance_uid,
        detail={
            "draft": draft.id,
            "version": version,
            "sr": sop_uid,
            "backend": drafter.backend,
            "model": drafter.model_id,
            "fallback_reason": fallback_reason,
            "jobs": [job.id for job in found],
        },
    )
    log.info("report draft %d (version %d) of study %s recorded", draft.id, version, study.study_instance_uid)
    return RecordedReport(draft.id, ReportStatus.DRAFT, sop_uid, path, delivery_ids)


def _draft_srs(session: Session, files: HostFiles, drafts: Sequence[ReportDraft]) -> list[Dataset]:
    """The headers of these drafts' SRs still in the storage (a purged one is left out)."""
    headers = []
    for draft in drafts:
        key = session.scalar(select(Result.path).where(Result.sop_instance_uid == draft.draft_sr_uid))
        if key is None:
            continue
        try:
            headers.append(_read_header(files.local_path(key)))
        except (StorageError, OSError):
            continue
    return headers


def latest_draft(session: Session, study: Study) -> ReportDraft | None:
    """The newest draft of a study (any status)."""
    return session.scalar(
        select(ReportDraft)
        .where(ReportDraft.study_fk == study.id)
        .order_by(ReportDraft.version.desc())
        .limit(1)
    )


def _open_draft(session: Session, draft_id: int) -> ReportDraft:
    draft = session.scalar(select(ReportDraft).where(ReportDraft.id == draft_id).with_for_update())
    if draft is None:
        raise ReportNotFound(f"report draft {draft_id} does not exist")
    if draft.status != ReportStatus.DRAFT:
        raise ReportConflict(
            f"report draft {draft_id} is {draft.status.value}; only an open draft can be decided"
        )
    return draft


def _check_signer(user: User) -> None:
    if user.role != Role.RADIOLOGIST or not user.active:
        raise PermissionError(f"user {user.username} ({user.role.value}) may not sign or reject reports")


def accept_draft(
    session: Session,
    settings: Settings,
    *,
    draft_id: int,
    user: User,
    text: ReportText,
    organization: str,
) -> RecordedReport:
    """Sign a draft as ``user`` with ``text`` (the draft's or an edit): signed SR written and queued.

    Raises :class:`ReportNotFound`, :class:`ReportConflict` (already decided)
    or :class:`PermissionError` (not an active radiologist).
    """
    _check_signer(user)
    draft = _open_draft(session, draft_id)
    draft_result = session.scalar(select(Result).where(Result.sop_instance_uid == draft.draft_sr_uid))
    if draft_result is None:
        raise ReportNotFound(
            f"the draft SR {draft.draft_sr_uid} of report draft {draft_id} is not in the index"
        )
    files = HostFiles(settings)
    draft_sr = pydicom.dcmread(files.local_path(draft_result.path))
    now = utcnow()
    series_uid, sop_uid = signed_sr_uids(draft.draft_sr_uid or "", settings.uid_prefix)
    signed = build_signed_sr(
        draft_sr,
        text=text,
        drafter=DraftingModel(draft.backend, draft.model),
        verifier=Verifier(
            name=user.display_name, login=user.username, organization=organization, verified_at=now
        ),
        equipment=equipment_for(settings),
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        instance_number=draft.version,
        uid_prefix=settings.uid_prefix,
    )
    path, signed_key = _store_sr(settings, files, draft.study.study_instance_uid, signed)
    edited = (text.findings.strip(), text.impression.strip()) != (
        draft.findings_text.strip(),
        draft.impression_text.strip(),
    )
    draft.status = ReportStatus.ACCEPTED
    draft.signed_findings_text = text.findings
    draft.signed_impression_text = text.impression
    draft.edited = edited
    draft.signed_sr_uid = sop_uid
    draft.decided_by_fk = user.id
    draft.decided_at = now
    jobs = [job for job in (session.get(Job, job_id) for job_id in draft.job_ids or [draft.job_fk]) if job]
    delivery_ids = _record_sr_result(
        session, draft.job, SIGNED_RESULT_KIND, signed, signed_key, _destinations(jobs)
    )
    study_uid = draft.study.study_instance_uid
    if edited:
        record_audit(
            session,
            actor=user.username,
            action="report.edited",
            object_type="study",
            object_uid=study_uid,
            detail={
                "draft": draft.id,
                "findings_changed": text.findings.strip() != draft.findings_text.strip(),
                "impression_changed": text.impression.strip() != draft.impression_text.strip(),
            },
        )
    record_audit(
        session,
        actor=user.username,
        action="report.signed",
        object_type="study",
        object_uid=study_uid,
        detail={
            "draft": draft.id,
            "version": draft.version,
            "sr": sop_uid,
            "predecessor": draft.draft_sr_uid,
            "edited": edited,
        },
    )
    return RecordedReport(draft.id, ReportStatus.ACCEPTED, sop_uid, path, delivery_ids)


def reject_draft(session: Session, *, draft_id: int, user: User, reason: str) -> RecordedReport:
    """Turn a draft down with a reason (required); nothing is sent."""
    _check_signer(user)
    reason = reason.strip()
    if not reason:
        raise ValueError("a rejection needs a reason")
    draft = _open_draft(session, draft_id)
    draft.status = ReportStatus.REJECTED
    draft.reject_reason = reason
    draft.decided_by_fk = user.id
    draft.decided_at = utcnow()
    record_audit(
        session,
        actor=user.username,
        action="report.rejected",
        object_type="study",
        object_uid=draft.study.study_instance_uid,
        detail={"draft": draft.id, "version": draft.version, "reason": reason},
    )
    return RecordedReport(draft.id, ReportStatus.REJECTED, None, None, [])


def diagnostic_report_for(session: Session, draft: ReportDraft) -> dict[str, Any]:
    """The FHIR R4 DiagnosticReport of a draft: ``partial`` while open or rejected, ``final`` once signed."""
    study = draft.study
    patient = session.get(Patient, study.patient_fk) if study.patient_fk is not None else None
    accepted = draft.status == ReportStatus.ACCEPTED
    text = (
        ReportText(draft.signed_findings_text or "", draft.signed_impression_text or "")
        if accepted
        else ReportText(draft.findings_text, draft.impression_text)
    )
    signer = draft.decided_by if accepted else None
    facts = ReportFacts(
        resource_id=f"pacs-ai-report-{draft.id}",
        status="final" if accepted else "partial",
        study_instance_uid=study.study_instance_uid,
        sr_instance_uid=draft.signed_sr_uid if accepted else draft.draft_sr_uid,
        patient_id=patient.patient_id if patient else None,
        patient_id_issuer=(patient.issuer or None) if patient else None,
        accession_number=study.accession_number,
        study_date=study.study_date,
        text=text,
        drafted_by=DraftingModel(draft.backend, draft.model).label,
        issued=(draft.decided_at if accepted and draft.decided_at else draft.created_at),
        signed_by=signer.display_name if signer else None,
        signed_by_login=signer.username if signer else None,
    )
    return build_diagnostic_report(facts)
