"""Worker nodes in the index: registration, heartbeats, clean stops and lost workers.

Each Celery worker node writes its own row (:class:`~pacs_ai.index.models.WorkerNode`)
and refreshes ``heartbeat_at`` every ``worker_heartbeat_seconds``; the row is the
only trace of a worker that another host needs.  A worker whose heartbeat is
older than ``worker_stale_after_seconds`` and that did not stop cleanly is
*stale*: the receiver's scheduler marks it ``lost`` and hands its running jobs to
another worker (:func:`take_lost_workers`), and ``pacs-ai status`` reports it.

A worker whose host is gone for good is *forgotten* (:func:`forget_worker`):
by ``pacs-ai workers forget``, or by the receiver once it has been lost or
stopped for ``worker_forget_after_hours`` (:func:`forget_silent_workers`).  Its
row goes, the jobs it still held are queued again (each once: one ``UPDATE``
takes them), and the audit trail keeps what it was (``worker.forgotten``).  A
forgotten worker that comes back simply registers again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import Job, JobState, WorkerNode, WorkerState, utcnow

#: States of a worker that is supposed to be alive and beating.
LIVE_STATES = (WorkerState.STARTING, WorkerState.READY)
#: States of a worker that is not expected to beat: forgotten after ``worker_forget_after_hours``.
SILENT_STATES = (WorkerState.LOST, WorkerState.STOPPED)


def register_worker(
    session: Session,
    *,
    node: str,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    device: dict[str, Any] | None,
    version: str | None,
) -> None:
    """Insert or reset the node's row as ``starting`` (a restarted node reuses its row)."""
    now = utcnow()
    worker = session.scalar(select(WorkerNode).where(WorkerNode.node == node).with_for_update())
    if worker is None:
        worker = WorkerNode(node=node)
        session.add(worker)
    worker.hostname = hostname
    worker.pid = pid
    worker.queues = list(queues)
    worker.concurrency = concurrency
    worker.device = device
    worker.processes = {}
    worker.state = WorkerState.STARTING
    worker.version = version
    worker.started_at = now
    worker.heartbeat_at = now
    worker.stopped_at = None


def set_worker_state(session: Session, node: str, state: WorkerState) -> None:
    """Record ``ready`` or ``stopped`` (with the time), refreshing the heartbeat."""
    worker = session.scalar(select(WorkerNode).where(WorkerNode.node == node).with_for_update())
    if worker is None:
        return
    worker.state = state
    worker.heartbeat_at = utcnow()
    if state == WorkerState.STOPPED:
        worker.stopped_at = worker.heartbeat_at
        worker.processes = {}


def beat(session: Session, node: str, live_pids: Sequence[int]) -> bool:
    """Refresh the node's heartbeat and forget pool processes no longer alive; False if it has no row.

    A node marked ``lost`` that beats again (a network partition healed) is
    ``ready`` again; the jobs handed away meanwhile are not taken back, and
    running one twice is harmless (results are idempotent).
    """
    worker = session.scalar(select(WorkerNode).where(WorkerNode.node == node).with_for_update())
    if worker is None:
        return False
    worker.heartbeat_at = utcnow()
    if worker.state == WorkerState.LOST:
        worker.state = WorkerState.READY
    alive = {str(pid) for pid in live_pids}
    processes = dict(worker.processes or {})
    if set(processes) - alive:
        worker.processes = {pid: models for pid, models in processes.items() if pid in alive}
    return True


def record_process_models(session: Session, node: str, pid: int, models: list[str]) -> None:
    """Record the models pool process ``pid`` of ``node`` keeps loaded (after each of its tasks)."""
    worker = session.scalar(select(WorkerNode).where(WorkerNode.node == node).with_for_update())
    if worker is None:
        return
    processes = dict(worker.processes or {})
    if processes.get(str(pid)) != models:
        processes[str(pid)] = models
        worker.processes = processes


def is_stale(worker: WorkerNode, now: datetime, stale_after_seconds: float) -> bool:
    """True for a worker that should be beating and has not for ``stale_after_seconds``."""
    if worker.state not in (*LIVE_STATES, WorkerState.LOST):
        return False
    return now - worker.heartbeat_at > timedelta(seconds=stale_after_seconds)


def is_beating(worker: WorkerNode, now: datetime, stale_after_seconds: float) -> bool:
    """True for a worker that says it is alive and beat within ``stale_after_seconds``."""
    return worker.state in LIVE_STATES and not is_stale(worker, now, stale_after_seconds)


def served_queues(session: Session, stale_after_seconds: float) -> set[str]:
    """The queues that at least one worker beating now (:func:`is_beating`) serves."""
    now = utcnow()
    live = session.scalars(select(WorkerNode).where(WorkerNode.state.in_(LIVE_STATES)))
    beating = [worker for worker in live if is_beating(worker, now, stale_after_seconds)]
    return {queue for worker in beating for queue in worker.queues or ()}


def hand_back_running_jobs(session: Session, node: str) -> list[int]:
    """Queue the jobs ``node`` is running again (``queued``, unclaimed); their ids, to enqueue.

    One ``UPDATE`` takes them: of two callers at once (the scheduler finding the
    worker lost, an administrator forgetting it) only one gets each job, so no
    job is enqueued twice.
    """
    taken = session.scalars(
        update(Job)
        .where(Job.state == JobState.RUNNING, Job.claimed_by == node)
        .values(state=JobState.QUEUED, claimed_by=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    return sorted(taken)


@dataclass(frozen=True)
class ForgottenWorker:
    """A worker removed from the index, as it was, and the jobs it held that were queued again."""

    node: str
    hostname: str
    state: str
    last_heartbeat: str
    seconds_since_heartbeat: float
    jobs_queued_again: list[int]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def forget_worker(session: Session, node: str, *, actor: str, reason: str) -> ForgottenWorker | None:
    """Remove ``node``'s row, queue the jobs it held again and audit it; None if there is no such worker.

    Whether the worker may be forgotten (not beating) is the caller's decision;
    the caller commits and then enqueues ``jobs_queued_again``.
    """
    worker = session.scalar(select(WorkerNode).where(WorkerNode.node == node).with_for_update())
    if worker is None:
        return None
    now = utcnow()
    forgotten = ForgottenWorker(
        node=worker.node,
        hostname=worker.hostname,
        state=worker.state.value,
        last_heartbeat=worker.heartbeat_at.isoformat(),
        seconds_since_heartbeat=round((now - worker.heartbeat_at).total_seconds(), 1),
        jobs_queued_again=hand_back_running_jobs(session, node),
    )
    record_audit(
        session,
        actor=actor,
        action="worker.forgotten",
        object_type="worker",
        object_uid=node,
        detail={
            "reason": reason,
            "hostname": forgotten.hostname,
            "state": forgotten.state,
            "queues": list(worker.queues or []),
            "last_heartbeat": forgotten.last_heartbeat,
            "jobs_queued_again": forgotten.jobs_queued_again,
        },
    )
    session.delete(worker)
    return forgotten


def forget_silent_workers(session: Session, forget_after_hours: float | None) -> list[ForgottenWorker]:
    """Forget workers lost or stopped more than ``forget_after_hours`` ago (the receiver's housekeeping).

    A lost worker's jobs were handed back when it was marked lost, and a stopped
    one holds none, so normally nothing is queued again here.
    """
    if forget_after_hours is None:
        return []
    cutoff = utcnow() - timedelta(hours=forget_after_hours)
    nodes = session.scalars(
        select(WorkerNode.node).where(WorkerNode.state.in_(SILENT_STATES), WorkerNode.heartbeat_at < cutoff)
    ).all()
    forgotten = []
    for node in nodes:
        gone = forget_worker(
            session,
            node,
            actor="service",
            reason=f"lost or stopped for more than worker_forget_after_hours ({forget_after_hours:g})",
        )
        if gone is not None:
            forgotten.append(gone)
    return forgotten


def take_lost_workers(session: Session, stale_after_seconds: float) -> list[str]:
    """Mark stale live workers ``lost`` and return their node names (their jobs are to be handed back)."""
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    stale = session.scalars(
        select(WorkerNode)
        .where(WorkerNode.state.in_(LIVE_STATES), WorkerNode.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)
    ).all()
    for worker in stale:
        worker.state = WorkerState.LOST
    return [worker.node for worker in stale]


@dataclass(frozen=True)
class WorkerView:
    """One worker as ``pacs-ai status`` shows it."""

    node: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int
    device: dict[str, Any] | None
    models_loaded: list[str]
    jobs_running: int
    state: str
    stale: bool
    version: str | None
    started_at: str
    last_heartbeat: str
    seconds_since_heartbeat: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_workers(
    session: Session, stale_after_seconds: float, forget_after_hours: float | None = None
) -> list[WorkerView]:
    """Every worker the index knows, by host then node, with its running jobs counted from the jobs table.

    With ``forget_after_hours``, workers lost or stopped longer ago are left out
    (the receiver forgets them; ``pacs-ai status`` no longer reports them).
    """
    now = utcnow()
    cutoff = now - timedelta(hours=forget_after_hours) if forget_after_hours is not None else None
    running = dict(
        session.execute(
            select(Job.claimed_by, func.count(Job.id))
            .where(Job.state == JobState.RUNNING, Job.claimed_by.is_not(None))
            .group_by(Job.claimed_by)
        ).all()
    )
    views = []
    for worker in session.scalars(select(WorkerNode).order_by(WorkerNode.hostname, WorkerNode.node)):
        if cutoff is not None and worker.state in SILENT_STATES and worker.heartbeat_at < cutoff:
            continue
        models = sorted({name for names in (worker.processes or {}).values() for name in names})
        views.append(
            WorkerView(
                node=worker.node,
                hostname=worker.hostname,
                pid=worker.pid,
                queues=list(worker.queues or []),
                concurrency=worker.concurrency,
                device=worker.device,
                models_loaded=models,
                jobs_running=int(running.get(worker.node, 0)),
                state=worker.state.value,
                stale=is_stale(worker, now, stale_after_seconds),
                version=worker.version,
                started_at=worker.started_at.isoformat(),
                last_heartbeat=worker.heartbeat_at.isoformat(),
                seconds_since_heartbeat=round((now - worker.heartbeat_at).total_seconds(), 1),
            )
        )
    return views
