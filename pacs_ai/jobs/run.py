"""Running one job: load the series, analyze it, encode SEG and SR, record the results.

A job that succeeds also checks its findings against the priority rules it was
opened with (see :mod:`pacs_ai.route.priority`) and raises the study's AI
reading priority when one fires, with the reason and an audit event.

The function is safe to run again for the same job, which is what happens when
a worker dies mid-task and the broker hands the message to another worker:

* a job already finished is not run again;
* result UIDs derive from the job's idempotency key, so a re-run produces the
  same SEG/SR identities and a PACS that received the first attempt's objects
  overwrites them instead of holding two sets;
* result and delivery rows are keyed on those UIDs, so they are never doubled.

A later version of the same analysis (``pacs-ai reprocess``) has a new key and
so new UIDs; its results reference the latest earlier version's (see
:mod:`pacs_ai.encode.results`) and each replacement is recorded in the audit
table as ``result.replaces``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, cast

import psutil
from pydantic import ValidationError
from sqlalchemy import or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.analyze.base import AnalysisFailed, AnalysisRefused, AnalysisResult, InvalidParameters
from pacs_ai.analyze.registry import get_analyzer
from pacs_ai.analyze.volume import Volume
from pacs_ai.analyze.volume_memory import process_volume_memory
from pacs_ai.config import Settings
from pacs_ai.dispatch.delivery import lease_expiry
from pacs_ai.encode import EquipmentInfo
from pacs_ai.encode.results import PreviousResult
from pacs_ai.encode.writing import WrittenResult, write_results
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
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
from pacs_ai.index.results import record_result
from pacs_ai.peak_memory import peak_rss_mb, reset_peak
from pacs_ai.route.priority import PriorityDecision, decide_priority, less_urgent_than, parse_rules
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import result_key

log = logging.getLogger(__name__)


class JobNotRunnable(Exception):
    """The job is finished, cancelled or unknown; the message carrying it is spent."""


def run_job(
    settings: Settings, sessions: sessionmaker[Session], job_id: int, *, worker: str = ""
) -> list[int]:
    """Run a job to completion; returns the ids of deliveries still to send.

    Input problems (:class:`AnalysisRefused`) finish the job as FAILED with the
    reason.  Other exceptions propagate after being recorded on the job so the
    caller (a Celery task) can retry.
    """
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotRunnable(f"job {job_id} does not exist")
        if job.state == JobState.SUCCEEDED:
            return _pending_deliveries(session, job)
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            raise JobNotRunnable(f"job {job_id} is {job.state.value}")
        job.state = JobState.RUNNING
        job.claimed_by = worker or None
        job.attempts += 1
        job.started_at = utcnow()
        job_key, analyzer_name, profile_name = job.idempotency_key, job.analyzer, job.profile
        params, destinations = dict(job.params or {}), list(job.destinations or [])
        stored_rules = list(job.priority_rules or [])
        series = session.get(Series, job.series_fk)
        assert series is not None
        series_uid, study_fk = series.series_instance_uid, series.study_fk
        version, previous = job.version, _previous_results(session, job)
        keys = list(session.scalars(select(Instance.path).where(Instance.series_fk == series.id)))
    log.info("job %d (%s) started: %d instances of series %s", job_id, analyzer_name, len(keys), series_uid)
    files = HostFiles(settings)

    per_job_peak = reset_peak()  # the job's own high-water mark from here (pacs_ai.peak_memory)
    timings: dict[str, float] = {
        "rss_start_mb": _current_rss_mb(),
        # Held from one study to the next: part of the process's memory at the start of this job.
        "volume_memory_mb": process_volume_memory().reserved_bytes / 2**20,
    }
    try:
        try:
            rules = parse_rules(stored_rules)
        except ValidationError as exc:
            raise InvalidParameters(f"priority rules cannot be read: {exc}") from exc
        analyzer = get_analyzer(analyzer_name)
        # The series from the storage into this host's cache (nothing to fetch where the spool or a
        # local storage folder has it); a storage that cannot be reached raises StorageError, retried.
        started = time.perf_counter()
        paths = files.local_paths(keys)
        timings["fetch_seconds"] = time.perf_counter() - started
        # Objects the job fetched itself: 0 where the spool or a local folder has the series, or where
        # prefetch hints brought it into this host's cache during the quiet period.
        timings["fetched_objects"] = files.fetched_objects
        metrics.objects_fetched("job", files.fetched_objects)
        started = time.perf_counter()
        volume = analyzer.load(paths, params)
        timings["load_seconds"] = time.perf_counter() - started
        timings["volume_mb"] = volume.voxels.nbytes / 2**20

        started = time.perf_counter()
        result = analyzer.analyze(volume, params)
        timings["analyze_seconds"] = time.perf_counter() - started

        started = time.perf_counter()
        written = _encode_and_write(settings, files, volume, result, job_key, version, previous)
        timings["encode_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        stored = _store_results(files, str(volume.headers[0].StudyInstanceUID), written)
        timings["store_seconds"] = time.perf_counter() - started
        # Peak resident memory during this job (the process's lifetime high where Linux cannot reset it).
        timings["peak_rss_mb"] = peak_rss_mb()
        timings["peak_rss_is_per_job"] = float(per_job_peak)
    except AnalysisRefused as refused:
        _finish_failed(sessions, job_id, f"input: {refused}", series_uid)
        metrics.job_finished(analyzer_name, "failed", "input")
        return []
    except InvalidParameters as invalid:
        _finish_failed(sessions, job_id, f"profile {profile_name}: {invalid}", series_uid)
        metrics.job_finished(analyzer_name, "failed", "profile")
        return []
    except AnalysisFailed as failed:
        _finish_failed(sessions, job_id, f"analyzer {analyzer_name}: {failed}", series_uid)
        metrics.job_finished(analyzer_name, "failed", "analyzer")
        return []
    except Exception as exc:
        _record_error(sessions, job_id, f"error: {type(exc).__name__}: {exc}")
        metrics.job_finished(analyzer_name, "error", metrics.error_class(exc))
        raise

    recording = time.perf_counter()
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for item, key in zip(written, stored, strict=True):
            # The worker enqueues the deliveries right away; the lease lets the scheduler
            # re-enqueue one should that message be lost.
            record_result(
                session,
                job.id,
                kind=item.kind,
                sop_class_uid=item.sop_class_uid,
                sop_instance_uid=item.sop_instance_uid,
                series_instance_uid=item.series_instance_uid,
                path=key,
                destinations=destinations,
                next_attempt_at=lease_expiry(),
            )
        _record_replacements(session, job, written, previous)
        job.state = JobState.SUCCEEDED
        job.error = None
        job.finished_at = utcnow()
        job.timings = timings
        algorithm = result.algorithm
        decision = decide_priority(
            rules,
            result.findings,
            source=f"profile {profile_name}, model {algorithm.name} {algorithm.version}",
        )
        job.findings = _findings(result, decision)
        if decision is not None:
            _raise_study_priority(session, study_fk, decision, job_id, series_uid)
        record_audit(
            session,
            actor="worker",
            action="job.succeeded",
            object_type="series",
            object_uid=series_uid,
            detail={"job": job_id, "timings": timings},
        )
        session.flush()
        pending = _pending_deliveries(session, job)
    log.info(
        "job %d succeeded: load %.2fs, analyze %.2fs, encode %.2fs",
        job_id,
        timings["load_seconds"],
        timings["analyze_seconds"],
        timings["encode_seconds"],
    )
    stages = {**timings, "record_seconds": time.perf_counter() - recording}
    metrics.job_stages(analyzer_name, result.algorithm.name, stages)
    metrics.job_finished(analyzer_name, "succeeded")
    metrics.gpu_memory()
    return pending


def _current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _previous_results(session: Session, job: Job) -> list[PreviousResult]:
    """The results of the latest earlier version of this analysis that produced any (none for v1)."""
    rows = session.execute(
        select(Job.version, Result, Series.series_instance_uid, Study.study_instance_uid)
        .join(Result, Result.job_fk == Job.id)
        .join(Series, Series.id == Job.series_fk)
        .join(Study, Study.id == Series.study_fk)
        .where(
            Job.series_fk == job.series_fk,
            Job.profile == job.profile,
            Job.analyzer == job.analyzer,
            Job.version < job.version,
            Result.kind.in_(("SEG", "SR")),
        )
        .order_by(Job.version.desc(), Result.id)
    ).all()
    if not rows:
        return []
    latest = rows[0][0]
    return [
        PreviousResult(
            kind=result.kind,
            study_instance_uid=study_uid,
            series_instance_uid=result.series_instance_uid,
            sop_class_uid=result.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid,
        )
        for version, result, _, study_uid in rows
        if version == latest
    ]


def _record_replacements(
    session: Session,
    job: Job,
    written: list[WrittenResult],
    previous: list[PreviousResult],
) -> None:
    """Audit which earlier result each new one replaces (same kind, latest earlier version)."""
    for new in written:
        for old in (item for item in previous if item.kind == new.kind):
            record_audit(
                session,
                actor="worker",
                action="result.replaces",
                object_type="result",
                object_uid=new.sop_instance_uid,
                detail={
                    "kind": new.kind,
                    "job": job.id,
                    "version": job.version,
                    "replaces_sop_instance_uid": old.sop_instance_uid,
                    "replaces_series_instance_uid": old.series_instance_uid,
                },
            )


def _store_results(files: HostFiles, study_uid: str, written: list[WrittenResult]) -> list[str]:
    """Put the written result files into the storage, all at once; their keys, in order.

    The results are in the storage before the index records them, so the
    receiver's dispatch (on any host) finds every result the index names.
    A SEG and an SR go up side by side (a remote store answers both at once);
    the first failure is raised once every upload has ended.
    """
    keys = [result_key(study_uid, item.sop_instance_uid) for item in written]
    if len(written) < 2:
        for key, item in zip(keys, written, strict=True):
            files.put_result(key, item.path)
        return keys
    with ThreadPoolExecutor(max_workers=len(written), thread_name_prefix="store") as uploads:
        futures = [
            uploads.submit(files.put_result, key, item.path) for key, item in zip(keys, written, strict=True)
        ]
    for future in futures:
        future.result()
    return keys


def _encode_and_write(
    settings: Settings,
    files: HostFiles,
    volume: Volume,
    result: AnalysisResult,
    job_key: str,
    version: int = 1,
    previous: list[PreviousResult] | None = None,
) -> list[WrittenResult]:
    """SEG and SR of the job written (fsynced) into the study's staging folder (see ``HostFiles``)."""
    equipment = EquipmentInfo(
        institution_name=settings.institution_name,
        station_name=settings.station_name,
        device_serial_number=settings.ae_title,
    )
    return write_results(
        volume,
        result,
        files.staging_dir(str(volume.headers[0].StudyInstanceUID)),
        key=job_key,
        equipment=equipment,
        uid_prefix=settings.uid_prefix,
        version=version,
        previous=previous or (),
        # A staging copy bound for a remote store is not the durable one: the store's copy is.
        fsync=settings.fsync and files.staging_is_storage(),
    )


def _pending_deliveries(session: Session, job: Job) -> list[int]:
    return list(
        session.scalars(
            select(Delivery.id)
            .join(Result, Result.id == Delivery.result_fk)
            .where(Result.job_fk == job.id, Delivery.state == DeliveryState.PENDING)
            .order_by(Delivery.id)
        )
    )


def _raise_study_priority(
    session: Session, study_fk: int, decision: PriorityDecision, job_id: int, series_uid: str
) -> None:
    """Set the study's AI priority to the decision's unless it already is as urgent or more.

    One conditional UPDATE, so two jobs of the same study finishing at once
    cannot lower what the other raised.
    """
    statement = (
        update(Study)
        .where(
            Study.id == study_fk,
            or_(Study.ai_priority.is_(None), Study.ai_priority.in_(less_urgent_than(decision.priority))),
        )
        .values(
            ai_priority=decision.priority.value, ai_priority_reason=decision.reason, ai_priority_at=utcnow()
        )
        .execution_options(synchronize_session=False)
    )
    raised = cast(CursorResult[Any], session.execute(statement)).rowcount
    study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_fk))
    if not raised:
        log.info(
            "study %s already has priority %s or higher: %s", study_uid, decision.priority, decision.reason
        )
        return
    record_audit(
        session,
        actor="worker",
        action="study.priority",
        object_type="study",
        object_uid=study_uid,
        detail={
            "priority": decision.priority.value,
            "reason": decision.reason,
            "job": job_id,
            "series": series_uid,
        },
    )
    log.warning("study %s priority raised to %s: %s", study_uid, decision.priority, decision.reason)


def _findings(result: AnalysisResult, decision: PriorityDecision | None = None) -> dict[str, Any]:
    return {
        "algorithm": {"name": result.algorithm.name, "version": result.algorithm.version},
        "segments": [{"number": s.number, "label": s.label, "type": asdict(s.type)} for s in result.segments],
        "measurements": [
            {
                "name": m.name.meaning,
                "code": asdict(m.name),
                "derivation": m.derivation.meaning if m.derivation else None,
                "value": m.value,
                "unit": m.unit.value,
                "segment_number": m.segment_number,
                "finding_site": m.finding_site.meaning,
            }
            for m in result.measurements
        ],
        "findings": [
            {
                "finding": f.finding.meaning,
                "code": asdict(f.finding),
                "probability": f.probability,
                "threshold": f.threshold,
                "present": f.present,
                "finding_site": f.finding_site.meaning if f.finding_site else None,
            }
            for f in result.findings
        ],
        # One entry per box the model reported (best first): what a report says about each nodule.
        "detections": [
            {
                "finding": d.finding.meaning,
                "code": asdict(d.finding),
                "score": d.score,
                "threshold": d.threshold,
                "location": d.location or None,
                "finding_site": d.finding_site.meaning if d.finding_site else None,
                "diameter_mm": round(d.diameter_mm, 2),
                "size_mm": [round(v, 2) for v in d.size_mm],
                "center_mm": [round(v, 2) for v in d.center_mm],
                "box_min_mm": list(d.box_min_mm),
                "box_max_mm": list(d.box_max_mm),
            }
            for d in result.detections
        ],
        # Classes a detector found nothing of, recorded only where the profile asks (report_absent).
        "not_detected": [{"finding": c.meaning, "code": asdict(c)} for c in result.not_detected],
        # What produced the result, for sentences such as "... detected by <model>".
        "title": result.title or result.algorithm.name,
        "priority": (
            {"level": decision.priority.value, "reason": decision.reason} if decision is not None else None
        ),
        "notes": result.notes,
    }


def _finish_failed(sessions: sessionmaker[Session], job_id: int, reason: str, series_uid: str) -> None:
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = JobState.FAILED
        job.error = reason
        job.finished_at = utcnow()
        record_audit(
            session,
            actor="worker",
            action="job.failed",
            object_type="series",
            object_uid=series_uid,
            detail={"job": job_id, "reason": reason},
        )
    log.warning("job %d failed: %s", job_id, reason)


def _record_error(sessions: sessionmaker[Session], job_id: int, reason: str) -> None:
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        if job is not None:
            job.error = reason
    log.error("job %d failed: %s", job_id, reason)
