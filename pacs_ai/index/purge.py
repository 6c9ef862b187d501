"""Running retention: gather the facts from the index, let :mod:`pacs_ai.index.retention` decide, delete.

A purged study keeps all its index rows (study, series, instances, jobs,
results, deliveries, audit): only the files go.  Each purged instance row gets
``purged_at`` and keeps its ``path``, so

* ``pacs-ai studies show`` and the audit trail say what was there and when it went;
* reprocessing (:mod:`pacs_ai.route.reprocess`) sees the file is gone and has
  the series retrieved from the PACS again; the listener then puts the file
  back under the same path (an instance row whose file is missing may be
  received again) and clears ``purged_at``.

Each study is purged in its own transaction that first checks again that
nothing holds it (a job opened or a delivery failed since the plan), then
deletes the files, then marks the rows and audits (``study.purged``).  Files
are deleted before the rows are marked: after a crash in between, the rows
still say "in the spool", the next pass finds the files gone and marks them.
Only files inside the spool (and, with ``retention_purge_results``, inside the
results directory) are ever deleted.

With an object store (``storage_url``: an S3 bucket, a shared folder) the
study's objects go too: its instances' and, with ``retention_purge_results``,
its results', up to 1000 per S3 DeleteObjects call, after the rows are marked
and never while another row still refers to the key (see
:mod:`pacs_ai.index.storage_deletions`).  Objects the store would not delete
are recorded with the reason (``pacs-ai purge`` exits 1 and ``pacs-ai status``
reports them) and tried again at the start of every retention pass.  A bucket's
own lifecycle rules can be used in addition.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
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
from pacs_ai.index.reports import ReportDraft, ReportStatus
from pacs_ai.index.retention import (
    DiskUsage,
    RetentionDecision,
    RetentionPlan,
    RetentionPolicy,
    StudyFacts,
    plan_retention,
)
from pacs_ai.index.storage_deletions import (
    PendingDeletions,
    forget_deletions,
    pending_deletions,
    record_failed_deletions,
    referenced_keys,
    summary,
)
from pacs_ai.storage import Storage, is_embedded, storage_for
from pacs_ai.storage.keys import RESULTS, spool_path

__all__ = [
    "PurgeOutcome",
    "RetentionRun",
    "gather_study_facts",
    "policy_of",
    "purge_study",
    "run_retention",
    "spool_disk_usage",
]

log = logging.getLogger(__name__)

_UNFINISHED_JOBS = (JobState.HELD, JobState.QUEUED, JobState.RUNNING)
_UNDELIVERED = (DeliveryState.PENDING, DeliveryState.FAILED)
#: Forwarded originals are spool files: the instances' purge deletes them.
_SPOOL_RESULT_KIND = "ORIGINAL"
#: Keys whose deletion failed earlier that one retention pass tries again (the oldest tries first).
RETRY_DELETIONS_PER_PASS = 10_000


def policy_of(settings: Settings, *, older_than_days: float | None = None) -> RetentionPolicy:
    """The configured limits; ``older_than_days`` (``pacs-ai purge --older-than``) replaces the age limit."""
    return RetentionPolicy(
        days=older_than_days if older_than_days is not None else settings.retention_days,
        high_watermark_percent=settings.retention_high_watermark_percent,
        low_watermark_percent=settings.retention_low_watermark_percent,
    )


def spool_disk_usage(settings: Settings) -> DiskUsage | None:
    """The spool's filesystem (the data directory's while no spool exists yet); None if neither exists."""
    for directory in (settings.spool_dir, settings.data_dir):
        if directory.exists():
            usage = shutil.disk_usage(directory)
            return DiskUsage(total_bytes=usage.total, free_bytes=usage.free)
    return None


def gather_study_facts(
    session: Session, *, include_results: bool, study_ids: Collection[int] | None = None
) -> list[StudyFacts]:
    """Facts of every study with instance files left in the spool (or of the given ones only)."""
    instances = (
        select(
            Series.study_fk,
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.size_bytes), 0),
            func.max(Instance.received_at),
            func.sum(case((Instance.routed.is_(False), 1), else_=0)),
        )
        .join(Series, Series.id == Instance.series_fk)
        .where(Instance.purged_at.is_(None))
        .group_by(Series.study_fk)
    )
    if study_ids is not None:
        instances = instances.where(Series.study_fk.in_(list(study_ids)))
    rows = session.execute(instances).all()
    ids = [row[0] for row in rows]
    if not ids:
        return []
    studies = {
        sid: (uid, accession)
        for sid, uid, accession in session.execute(
            select(Study.id, Study.study_instance_uid, Study.accession_number).where(Study.id.in_(ids))
        )
    }
    unfinished: dict[int, dict[str, int]] = {}
    for sid, state, count in session.execute(
        select(Series.study_fk, Job.state, func.count(Job.id))
        .join(Series, Series.id == Job.series_fk)
        .where(Job.state.in_(_UNFINISHED_JOBS), Series.study_fk.in_(ids))
        .group_by(Series.study_fk, Job.state)
    ):
        unfinished.setdefault(sid, {})[JobState(state).value] = count
    undelivered: dict[int, dict[str, int]] = {}
    for sid, delivery_state, count in session.execute(
        select(Series.study_fk, Delivery.state, func.count(Delivery.id))
        .join(Result, Result.id == Delivery.result_fk)
        .join(Job, Job.id == Result.job_fk)
        .join(Series, Series.id == Job.series_fk)
        .where(Delivery.state.in_(_UNDELIVERED), Series.study_fk.in_(ids))
        .group_by(Series.study_fk, Delivery.state)
    ):
        undelivered.setdefault(sid, {})[DeliveryState(delivery_state).value] = count
    drafts = dict(
        session.execute(
            select(ReportDraft.study_fk, func.count(ReportDraft.id))
            .where(ReportDraft.status == ReportStatus.DRAFT, ReportDraft.study_fk.in_(ids))
            .group_by(ReportDraft.study_fk)
        ).all()
    )
    result_bytes: dict[int, int] = {}
    if include_results:
        for sid, path in _purgeable_results(session, ids):
            result_bytes[sid] = result_bytes.get(sid, 0) + _size(Path(path))
    return [
        StudyFacts(
            study_id=sid,
            study_instance_uid=studies[sid][0],
            accession_number=studies[sid][1],
            last_received_at=last,
            instances=count,
            spool_bytes=int(size),
            result_bytes=result_bytes.get(sid, 0),
            unrouted_instances=int(unrouted or 0),
            unfinished_jobs=unfinished.get(sid, {}),
            undelivered=undelivered.get(sid, {}),
            open_drafts=drafts.get(sid, 0),
        )
        for sid, count, size, last, unrouted in rows
    ]


def _purgeable_results(session: Session, study_ids: list[int]) -> list[tuple[int, str]]:
    """(study id, path) of the studies' result files pacs-ai made that are not purged yet."""
    return list(
        session.execute(
            select(Series.study_fk, Result.path)
            .join(Job, Job.id == Result.job_fk)
            .join(Series, Series.id == Job.series_fk)
            .where(
                Series.study_fk.in_(study_ids),
                Result.kind != _SPOOL_RESULT_KIND,
                Result.purged_at.is_(None),
            )
        ).tuples()
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class PurgeOutcome:
    """What happened to one study of the plan (or would happen, in a dry run)."""

    study_instance_uid: str
    accession_number: str | None
    last_received_at: datetime
    #: The retention limit the study met.
    limit: str
    purged: bool
    kept_because: list[str] = field(default_factory=list)
    instances: int = 0
    bytes: int = 0
    results: int = 0
    #: Objects deleted from the object store (none with the embedded storage: the spool is the storage).
    objects_deleted: int = 0
    #: Files that could not be deleted, and why (the study stays partly in the spool).
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "last_received_at": self.last_received_at.isoformat(),
            "limit": self.limit,
            "purged": self.purged,
            "kept_because": self.kept_because,
            "instances": self.instances,
            "bytes": self.bytes,
            "results": self.results,
            "objects_deleted": self.objects_deleted,
            "problems": self.problems,
        }


def purge_study(
    session: Session, settings: Settings, decision: RetentionDecision, *, actor: str
) -> PurgeOutcome:
    """Delete one planned study's spool files (and delivered results if configured); the caller commits.

    The study is checked again first: what holds it now keeps it, whatever the plan said.
    """
    study = decision.study
    outcome = PurgeOutcome(
        study.study_instance_uid, study.accession_number, study.last_received_at, decision.limit, False
    )
    current = gather_study_facts(
        session, include_results=settings.retention_purge_results, study_ids=[study.study_id]
    )
    if not current:
        outcome.kept_because = ["no files left in the spool"]
        return outcome
    reasons = current[0].reasons_to_keep()
    if reasons:
        outcome.kept_because = reasons
        return outcome

    now = utcnow()
    rows = (
        session.execute(
            select(Instance.id, Instance.path, Instance.size_bytes)
            .join(Series, Series.id == Instance.series_fk)
            .where(Series.study_fk == study.study_id, Instance.purged_at.is_(None))
        )
        .tuples()
        .all()
    )
    instance_keys = {row_id: key for row_id, key, _ in rows}
    rows = [(row_id, str(spool_path(settings.spool_dir, key)), size) for row_id, key, size in rows]
    deleted = _delete_files(session, Instance, rows, settings.spool_dir, outcome, now)
    outcome.instances = len(deleted)
    objects = [instance_keys[row_id] for row_id in deleted]

    if settings.retention_purge_results:
        result_keys = dict(
            session.execute(
                select(Result.id, Result.path)
                .join(Job, Job.id == Result.job_fk)
                .join(Series, Series.id == Job.series_fk)
                .where(
                    Series.study_fk == study.study_id,
                    Result.kind != _SPOOL_RESULT_KIND,
                    Result.purged_at.is_(None),
                )
            )
            .tuples()
            .all()
        )
        results = [
            (result_id, str(path), _size(path))
            for result_id, path in (
                (result_id, _result_file(settings, key)) for result_id, key in result_keys.items()
            )
        ]
        purged_results = _delete_files(session, Result, results, settings.results_dir, outcome, now)
        outcome.results = len(purged_results)
        objects += [result_keys[result_id] for result_id in purged_results]

    if not is_embedded(settings):
        _delete_objects(session, storage_for(settings), objects, outcome)

    outcome.purged = outcome.instances > 0 or outcome.results > 0
    record_audit(
        session,
        actor=actor,
        action="study.purged",
        object_type="study",
        object_uid=study.study_instance_uid,
        detail={
            "limit": decision.limit,
            "instances": outcome.instances,
            "results": outcome.results,
            "bytes": outcome.bytes,
            "objects_deleted": outcome.objects_deleted,
            "last_received_at": study.last_received_at.isoformat(),
            **({"problems": outcome.problems[:20]} if outcome.problems else {}),
        },
    )
    _remove_empty_directories({Path(path).parent for path in deleted.values()}, settings.spool_dir)
    return outcome


def _delete_objects(session: Session, storage: Storage, keys: list[str], outcome: PurgeOutcome) -> None:
    """Delete the purged rows' objects from the store, batched; record those it would not delete.

    Runs after the rows are marked (and so locked): a key another row not
    purged still names is left alone.  A host path recorded before keys is no
    object of the store.
    """
    keys = [key for key in keys if not key.startswith("/")]
    if not keys:
        return
    held = referenced_keys(session, keys)
    wanted = [key for key in keys if key not in held]
    failed = storage.delete_many(wanted)
    record_failed_deletions(session, failed)
    outcome.objects_deleted = len(wanted) - len(failed)
    if failed:
        outcome.problems.append(
            f"{len(failed)} of {len(wanted)} object(s) not deleted from {storage.description}: "
            f"{next(iter(failed.values()))}; tried again at the next retention pass"
        )


@dataclass
class DeletionRetry:
    """What a retention pass's retry of earlier failed deletions did, and what still waits."""

    deleted: int = 0
    #: Keys the index needs again (the study was received again): dropped, never deleted.
    in_use_again: int = 0
    pending: PendingDeletions | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted": self.deleted,
            "in_use_again": self.in_use_again,
            "pending": self.pending.as_dict() if self.pending else None,
        }


def retry_failed_deletions(
    sessions: sessionmaker[Session], settings: Settings, *, dry_run: bool
) -> DeletionRetry:
    """Delete again the objects earlier passes could not (the oldest first); ``dry_run`` only counts."""
    retry = DeletionRetry()
    with session_scope(sessions) as session:
        if not dry_run and not is_embedded(settings):
            keys = pending_deletions(session, RETRY_DELETIONS_PER_PASS)
            if keys:
                held = referenced_keys(session, keys)
                forget_deletions(session, held)
                wanted = [key for key in keys if key not in held]
                failed = storage_for(settings).delete_many(wanted)
                forget_deletions(session, [key for key in wanted if key not in failed])
                record_failed_deletions(session, failed)
                retry.deleted, retry.in_use_again = len(wanted) - len(failed), len(held)
        retry.pending = summary(session)
    if retry.deleted or retry.in_use_again:
        log.info(
            "retention deleted %d object(s) an earlier pass could not (%d in use again, kept)",
            retry.deleted,
            retry.in_use_again,
        )
    return retry


def _result_file(settings: Settings, key: str) -> Path:
    """The local file of a result key: under ``results_dir`` (a host path recorded before keys as is).

    With a remote store the file is usually not here (the worker put it in the store); the
    store's copy is deleted by :func:`_delete_objects`.
    """
    if key.startswith("/"):
        return Path(key)
    return settings.results_dir / key.removeprefix(RESULTS + "/")


def _delete_files(
    session: Session,
    model: type[Instance] | type[Result],
    rows: Sequence[tuple[int, str, int]],
    root: Path,
    outcome: PurgeOutcome,
    now: datetime,
) -> dict[int, str]:
    """Delete the files of ``(row id, path, size)`` rows inside ``root`` and mark those rows purged.

    Files that cannot be deleted are added to ``outcome.problems`` and their rows stay unmarked;
    the bytes of the others are added to ``outcome.bytes``.  Returns the deleted rows' ids and paths.
    """
    deleted: dict[int, str] = {}
    for row_id, path, size in rows:
        problem = _delete_inside(Path(path), root)
        if problem:
            outcome.problems.append(problem)
            continue
        deleted[row_id] = path
        outcome.bytes += size
    if deleted:
        session.execute(
            update(model)
            .where(model.id.in_(list(deleted)))
            .values(purged_at=now)
            .execution_options(synchronize_session=False)
        )
    return deleted


def _delete_inside(path: Path, root: Path) -> str | None:
    """Delete ``path`` if it lies inside ``root``; a problem in words otherwise (None when done).

    A file already gone counts as deleted: an administrator removed it, or an
    earlier pass was interrupted after deleting and before marking the row.
    """
    try:
        if not path.resolve().is_relative_to(root.resolve()):
            return f"{path}: not inside {root}; left alone"
        path.unlink(missing_ok=True)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def _remove_empty_directories(directories: set[Path], root: Path) -> None:
    """Remove series directories left empty, then their study directories; never ``root`` itself.

    A listener creating a directory for a late instance of the study at the
    same moment fails that one store, which its sender repeats.
    """
    root = root.resolve()
    parents: set[Path] = set()
    for directory in sorted(directories, reverse=True):
        for candidate in (directory, directory.parent):
            resolved = candidate.resolve()
            if resolved == root or not resolved.is_relative_to(root) or candidate in parents:
                continue
            with contextlib.suppress(OSError):  # not empty (or already gone): leave it
                os.rmdir(candidate)
            parents.add(candidate)


@dataclass
class RetentionRun:
    """A retention pass: the plan, and what became of each planned study."""

    policy: RetentionPolicy
    plan: RetentionPlan
    dry_run: bool
    outcomes: list[PurgeOutcome] = field(default_factory=list)
    #: Earlier failed deletions from the object store tried again, and what still waits.
    deletions: DeletionRetry = field(default_factory=DeletionRetry)

    @property
    def purged(self) -> list[PurgeOutcome]:
        return [o for o in self.outcomes if o.purged]

    @property
    def kept(self) -> list[PurgeOutcome]:
        return [o for o in self.outcomes if not o.purged]

    @property
    def problems(self) -> list[str]:
        problems = [problem for o in self.outcomes for problem in o.problems]
        pending = self.deletions.pending
        if pending is not None and pending.count:
            problems.append(
                f"{pending.count} object(s) of purged studies not deleted from the storage yet (the first "
                f"failed {pending.oldest_failure}; last reason: {pending.last_error}); tried again at every "
                "retention pass"
            )
        return problems

    def as_dict(self) -> dict[str, Any]:
        disk = self.plan.disk
        return {
            "dry_run": self.dry_run,
            "policy": {
                "days": self.policy.days,
                "high_watermark_percent": self.policy.high_watermark_percent,
                "low_watermark_percent": self.policy.target_percent,
            },
            "disk": None
            if disk is None
            else {
                "total_mb": disk.total_bytes // (1024 * 1024),
                "free_mb": disk.free_bytes // (1024 * 1024),
                "used_percent": round(disk.used_percent, 1),
            },
            "watermark_bytes_wanted": self.plan.bytes_wanted,
            "watermark_shortfall_bytes": self.plan.shortfall_bytes,
            "purged": [o.as_dict() for o in self.purged],
            "kept": [o.as_dict() for o in self.kept],
            "storage_deletions": self.deletions.as_dict(),
            "problems": self.problems,
        }


def plan_now(sessions: sessionmaker[Session], settings: Settings, policy: RetentionPolicy) -> RetentionPlan:
    """The retention plan for the index and the spool's disk as they are now."""
    with session_scope(sessions) as session:
        facts = gather_study_facts(session, include_results=settings.retention_purge_results)
    return plan_retention(facts, policy, now=utcnow(), disk=spool_disk_usage(settings))


def run_retention(
    sessions: sessionmaker[Session],
    settings: Settings,
    policy: RetentionPolicy,
    *,
    actor: str,
    dry_run: bool = False,
    plan: RetentionPlan | None = None,
    on_study: Callable[[PurgeOutcome], None] | None = None,
) -> RetentionRun:
    """Plan (unless given a plan) and purge, one study per transaction; ``dry_run`` deletes nothing.

    ``on_study`` is called after each planned study (progress bars).
    """
    deletions = retry_failed_deletions(sessions, settings, dry_run=dry_run)
    plan = plan if plan is not None else plan_now(sessions, settings, policy)
    run = RetentionRun(policy=policy, plan=plan, dry_run=dry_run, deletions=deletions)
    for decision in [*plan.purge, *plan.kept]:
        study = decision.study
        if dry_run or not decision.purge:
            outcome = PurgeOutcome(
                study.study_instance_uid,
                study.accession_number,
                study.last_received_at,
                decision.limit,
                purged=decision.purge,
                kept_because=decision.kept_because,
                instances=study.instances if decision.purge else 0,
                bytes=study.bytes if decision.purge else 0,
            )
        else:
            with session_scope(sessions) as session:
                outcome = purge_study(session, settings, decision, actor=actor)
            if outcome.purged:
                log.info(
                    "retention purged study %s (%s): %d instance(s), %d result(s), %.1f MB",
                    study.study_instance_uid,
                    decision.limit,
                    outcome.instances,
                    outcome.results,
                    outcome.bytes / (1024 * 1024),
                )
            for problem in outcome.problems:
                log.error("retention could not delete %s", problem)
        run.outcomes.append(outcome)
        if on_study is not None:
            on_study(outcome)
    if not dry_run:
        run.deletions.pending = _pending_now(sessions)
    if not dry_run and plan.shortfall_bytes:
        log.warning(
            "retention cannot bring the spool's disk to %s%%: %.0f MB more are held by studies that must "
            "stay (see `pacs-ai purge --dry-run`)",
            policy.target_percent,
            plan.shortfall_bytes / (1024 * 1024),
        )
    return run


def _pending_now(sessions: sessionmaker[Session]) -> PendingDeletions:
    with session_scope(sessions) as session:
        return summary(session)
