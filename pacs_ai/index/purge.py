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
    rows = [(row_id, str(spool_path(settings.spool_dir, key)), size) for row_id, key, size in rows]
    deleted = _delete_files(session, Instance, rows, settings.spool_dir, outcome, now)
    outcome.instances = len(deleted)

    if settings.retention_purge_results:
        results = [
            (result_id, str(path), _size(path))
            for result_id, path in (
                (result_id, _result_file(settings, key))
                for result_id, key in session.execute(
                    select(Result.id, Result.path)
                    .join(Job, Job.id == Result.job_fk)
                    .join(Series, Series.id == Job.series_fk)
                    .where(
                        Series.study_fk == study.study_id,
                        Result.kind != _SPOOL_RESULT_KIND,
                        Result.purged_at.is_(None),
                    )
                ).tuples()
            )
        ]
        outcome.results = len(_delete_files(session, Result, results, settings.results_dir, outcome, now))

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
            "last_received_at": study.last_received_at.isoformat(),
            **({"problems": outcome.problems[:20]} if outcome.problems else {}),
        },
    )
    _remove_empty_directories({Path(path).parent for path in deleted}, settings.spool_dir)
    return outcome


def _result_file(settings: Settings, key: str) -> Path:
    """The local file of a result key: under ``results_dir`` (a host path recorded before keys as is).

    With a remote store the file is not here (the worker put it in the store); retention leaves
    the store's copy to the store's own lifecycle rules.
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
) -> list[str]:
    """Delete the files of ``(row id, path, size)`` rows inside ``root`` and mark those rows purged.

    Files that cannot be deleted are added to ``outcome.problems`` and their rows stay unmarked;
    the bytes of the others are added to ``outcome.bytes``.  Returns the deleted paths.
    """
    deleted_ids: list[int] = []
    deleted_paths: list[str] = []
    for row_id, path, size in rows:
        problem = _delete_inside(Path(path), root)
        if problem:
            outcome.problems.append(problem)
            continue
        deleted_ids.append(row_id)
        deleted_paths.append(path)
        outcome.bytes += size
    if deleted_ids:
        session.execute(
            update(model)
            .where(model.id.in_(deleted_ids))
            .values(purged_at=now)
            .execution_options(synchronize_session=False)
        )
    return deleted_paths


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

    @property
    def purged(self) -> list[PurgeOutcome]:
        return [o for o in self.outcomes if o.purged]

    @property
    def kept(self) -> list[PurgeOutcome]:
        return [o for o in self.outcomes if not o.purged]

    @property
    def problems(self) -> list[str]:
        return [problem for o in self.outcomes for problem in o.problems]

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
    plan = plan if plan is not None else plan_now(sessions, settings, policy)
    run = RetentionRun(policy=policy, plan=plan, dry_run=dry_run)
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
    if not dry_run and plan.shortfall_bytes:
        log.warning(
            "retention cannot bring the spool's disk to %s%%: %.0f MB more are held by studies that must "
            "stay (see `pacs-ai purge --dry-run`)",
            policy.target_percent,
            plan.shortfall_bytes / (1024 * 1024),
        )
    return run
