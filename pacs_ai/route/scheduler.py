"""The scheduler: the periodic pass that turns index state into queued work.

Each pass routes series whose quiet period is over, enqueues the jobs it
opened, and enqueues deliveries that are due (first attempts whose message was
lost, and retries whose backoff has passed).  At start-up it re-enqueues every
job that was accepted but not finished: the index is the source of truth, the
broker only carries messages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.dispatch.delivery import DELIVERY_LEASE
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, DeliveryState, Job, JobState, utcnow
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.route.profiles import Profile, ProfileError, load_profiles

log = logging.getLogger(__name__)


class TaskQueue(Protocol):
    """Where the scheduler puts work (Celery in production)."""

    def enqueue_analysis(self, job_id: int, queue: str, timeout_seconds: float | None = None) -> None:
        """Queue job ``job_id`` on ``queue``, limited to ``timeout_seconds`` (None: the default limit)."""
        ...

    def enqueue_delivery(self, delivery_id: int) -> None: ...


class ProfileSet:
    """The profiles directory, reloaded when a file changes; a broken edit keeps the last good set."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self.profiles: list[Profile] = []
        self.refresh()

    def _current_stamp(self) -> tuple[tuple[str, float], ...]:
        files = sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")])
        return tuple((str(path), path.stat().st_mtime) for path in files)

    def refresh(self) -> list[Profile]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            try:
                self.profiles = load_profiles(self.directory)
                log.info(
                    "loaded %d profile(s) from %s: %s",
                    len(self.profiles),
                    self.directory,
                    ", ".join(p.name for p in self.profiles) or "none",
                )
            except ProfileError as exc:
                if self._stamp is None:
                    raise
                log.error("profile change rejected, keeping the previous profiles:\n%s", exc)
            self._stamp = stamp
        return self.profiles


class Scheduler:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], queue: TaskQueue) -> None:
        self.settings = settings
        self.sessions = sessions
        self.queue = queue
        self.profiles = ProfileSet(settings.profiles_dir)

    def recover(self) -> int:
        """Re-enqueue unfinished jobs and pending deliveries; returns how many."""
        with session_scope(self.sessions) as session:
            jobs = session.execute(
                select(Job.id, Job.queue, Job.timeout_seconds).where(
                    Job.state.in_([JobState.QUEUED, JobState.RUNNING])
                )
            ).all()
            deliveries = session.scalars(
                select(Delivery.id).where(Delivery.state == DeliveryState.PENDING)
            ).all()
        for job_id, queue, timeout_seconds in jobs:
            self.queue.enqueue_analysis(job_id, queue, timeout_seconds)
        for delivery_id in deliveries:
            self.queue.enqueue_delivery(delivery_id)
        if jobs or deliveries:
            log.info(
                "recovered %d unfinished job(s) and %d undelivered result(s) from the index",
                len(jobs),
                len(deliveries),
            )
        return len(jobs) + len(deliveries)

    def requeue_jobs_of(self, worker: str) -> list[int]:
        """Hand the running jobs of a worker that died back to the queue."""
        with session_scope(self.sessions) as session:
            jobs = session.scalars(
                select(Job).where(Job.state == JobState.RUNNING, Job.claimed_by == worker)
            ).all()
            for job in jobs:
                job.state = JobState.QUEUED
                job.claimed_by = None
            handed = [(job.id, job.queue, job.timeout_seconds) for job in jobs]
        for job_id, queue, timeout_seconds in handed:
            self.queue.enqueue_analysis(job_id, queue, timeout_seconds)
        if handed:
            log.warning("re-enqueued job(s) %s of dead worker %s", [j for j, _, _ in handed], worker)
        return [job_id for job_id, _, _ in handed]

    def run_once(self) -> None:
        profiles = self.profiles.refresh()
        now = utcnow()
        with session_scope(self.sessions) as session:
            routing = route_ready_series(
                session, profiles, now=now, default_quiet_seconds=self.settings.quiet_period_seconds
            )
        for job_id, queue, timeout_seconds in routing.new_jobs:
            self.queue.enqueue_analysis(job_id, queue, timeout_seconds)

        with session_scope(self.sessions) as session:
            due = session.scalars(
                select(Delivery).where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                )
            ).all()
            for delivery in due:
                delivery.next_attempt_at = now + DELIVERY_LEASE
            due_ids = [delivery.id for delivery in due]
        for delivery_id in due_ids:
            self.queue.enqueue_delivery(delivery_id)
