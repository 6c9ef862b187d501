"""The scheduler: the periodic pass that turns index state into queued work.

Each pass routes series whose quiet period is over, enqueues the jobs it
opened, and enqueues deliveries that are due (first attempts whose message was
lost, and retries whose backoff has passed).  At start-up it re-enqueues every
job that was accepted but not finished: the index is the source of truth, the
broker only carries messages.  Every ``retention_interval_minutes`` it also
runs retention (:mod:`pacs_ai.index.purge`) where a retention limit is set.
"""

from __future__ import annotations

import logging
import threading
import time as monotonic_clock
from collections.abc import Callable, Mapping
from datetime import datetime, time, timedelta
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.analyze.registry import get_analyzer
from pacs_ai.config import Settings
from pacs_ai.dispatch.delivery import DELIVERY_LEASE
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    WorkerNode,
    WorkerState,
    utcnow,
)
from pacs_ai.index.purge import RetentionRun, policy_of, run_retention
from pacs_ai.index.workers import hand_back_running_jobs, served_queues
from pacs_ai.receive.uploader import Uploader
from pacs_ai.report.pipeline import ReportPipeline
from pacs_ai.route.assembly import JobTicket, Notification, RoutingPass, route_ready_series
from pacs_ai.route.prefetch import PrefetchHint, prefetch_hints
from pacs_ai.route.profile_set import ProfileSet
from pacs_ai.storage.files import HostFiles

log = logging.getLogger(__name__)

#: How far back start-up looks for analysed studies whose report draft was never queued.
DRAFT_RECOVERY_WINDOW = timedelta(days=2)


class TaskQueue(Protocol):
    """Where the scheduler puts work (Celery in production)."""

    def enqueue_analysis(self, ticket: JobTicket) -> None:
        """Queue a job on its queue, with its time limit and routing priority."""
        ...

    def enqueue_delivery(self, delivery_id: int) -> None: ...

    def enqueue_notification(self, notification: Notification) -> None: ...

    def enqueue_draft(self, study_id: int) -> None:
        """Queue the AI report draft of a study whose analyses are all finished."""
        ...

    def enqueue_prefetch(self, hint: PrefetchHint) -> None:
        """Ask a worker of the hint's queue to fetch its instances (lowest priority; may expire)."""
        ...


#: Seconds past a series' quiet period that its wake-up waits, so the pass finds the period over.
QUIET_MARGIN_SECONDS = 0.01
#: The shortest wait between two passes: many series ending their quiet periods within moments of
#: each other (a busy hour) are routed a few at a time, not in a pass each.
MIN_PASS_GAP_SECONDS = 0.1


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        queue: TaskQueue,
        queue_depths: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.queue = queue
        #: Reads the messages waiting in each broker queue, for the metrics (None: not sampled).
        self.queue_depths = queue_depths
        #: Monotonic time of the next metrics sample (see :meth:`sample_metrics`).
        self._next_sample = 0.0
        self.profiles = ProfileSet(settings.profiles_dir)
        #: Monotonic time of the next retention pass; the first comes with the first scheduler pass.
        self._next_retention = 0.0
        self.files = HostFiles(settings)
        #: Puts acknowledged instances into a remote object store (nothing to do with the embedded one).
        self.uploader = Uploader(settings, sessions)
        self._upload_thread: threading.Thread | None = None
        self._stop_uploading = threading.Event()
        #: Held by a routing pass: the scheduler's and the uploader's thread both route.
        self._routing = threading.Lock()
        #: When the next series becomes quiet, as the last routing pass saw it (see
        #: :meth:`seconds_until_next_pass`).
        self._next_quiet_at: datetime | None = None

    def load_analyzers(self) -> list[str]:
        """Load the analyzers the profiles name now, not when the first series is routed; returns
        their names.

        Opening a job asks its analyzer for its version, and the first time that imports the
        analyzer's module: for the built-in lung analyzer, SciPy, about 0.15 s on two cores, which
        the first study after every start waited for past its quiet period (1.18 s against
        1.02-1.05 s for the next ones, 300-slice CT, quiet period 1 s).  An analyzer that cannot
        be loaded is logged here, and fails its jobs' routing as before.
        """
        names = sorted({step.name for profile in self.profiles.refresh() for step in profile.analyzers})
        for name in names:
            try:
                get_analyzer(name)
            except Exception as exc:  # noqa: BLE001 - any failure: routing reports it again, per series
                log.warning("analyzer %s, named by a profile, cannot be loaded: %s", name, exc)
        return names

    def recover(self) -> int:
        """Re-enqueue unfinished jobs and pending deliveries; returns how many."""
        with session_scope(self.sessions) as session:
            jobs = [
                JobTicket.of(job)
                for job in session.scalars(
                    select(Job).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                )
            ]
            deliveries = session.scalars(
                select(Delivery.id).where(Delivery.state == DeliveryState.PENDING)
            ).all()
        for ticket in jobs:
            self.queue.enqueue_analysis(ticket)
        for delivery_id in deliveries:
            self.queue.enqueue_delivery(delivery_id)
        drafts = self.studies_due_for_draft()
        for study_id in drafts:
            self.queue.enqueue_draft(study_id)
        if jobs or deliveries or drafts:
            log.info(
                "recovered %d unfinished job(s), %d undelivered result(s) and %d report draft(s) due "
                "from the index",
                len(jobs),
                len(deliveries),
                len(drafts),
            )
        return len(jobs) + len(deliveries) + len(drafts)

    def studies_due_for_draft(self) -> list[int]:
        """Studies analysed in the last ``DRAFT_RECOVERY_WINDOW`` whose AI report draft is due but missing.

        A worker that stopped between finishing a study's last job and queueing
        its draft, or a broker that lost the draft message, leaves such a
        study; the draft task is idempotent, so a study queued twice is
        drafted once.
        """
        since = utcnow() - DRAFT_RECOVERY_WINDOW
        with session_scope(self.sessions) as session:
            last_jobs = session.execute(
                select(Series.study_fk, func.max(Job.id))
                .join(Series, Series.id == Job.series_fk)
                .where(Job.state == JobState.SUCCEEDED, Job.finished_at >= since)
                .group_by(Series.study_fk)
            ).all()
        pipeline = ReportPipeline(self.settings, self.sessions, self.profiles)
        return sorted(
            study_id for study_id, job_id in last_jobs if pipeline.study_to_draft(job_id) is not None
        )

    def requeue_jobs_of(self, worker: str) -> list[int]:
        """Hand the running jobs of a worker that died back to the queue.

        One ``UPDATE`` takes them (:func:`~pacs_ai.index.workers.hand_back_running_jobs`), so a job
        that ``pacs-ai workers forget`` hands back at the same moment is enqueued once, not twice.
        """
        with session_scope(self.sessions) as session:
            taken = hand_back_running_jobs(session, worker)
            handed = [JobTicket.of(job) for job in session.scalars(select(Job).where(Job.id.in_(taken)))]
        for ticket in handed:
            self.queue.enqueue_analysis(ticket)
        if handed:
            log.warning("re-enqueued job(s) %s of dead worker %s", [t.job_id for t in handed], worker)
        return [ticket.job_id for ticket in handed]

    def run_once(self) -> None:
        self.start_uploads()
        now = utcnow()
        self.route(now)
        rules = self.profiles.rules
        if rules is not None and rules.off_peak.contains(local_time_of_day()):
            self.release_held_jobs()

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
        self.retain_if_due()
        metrics.scheduler_pass()
        self.sample_metrics()

    def sample_metrics(self) -> metrics.HostSample | None:
        """Read the broker's queues, the index and the disks into the gauges, once per sample interval.

        The broker unreachable leaves the queue depths as they were (logged); the
        index unreachable fails the pass as it does routing.
        """
        now = monotonic_clock.monotonic()
        if now < self._next_sample:
            return None
        self._next_sample = now + self.settings.metrics_sample_seconds
        depths: dict[str, int] = {}
        if self.queue_depths is not None:
            try:
                depths = dict(self.queue_depths())
            except Exception as exc:  # noqa: BLE001 - any broker failure: the gauges wait for the next sample
                log.warning("metrics: the broker's queue depths cannot be read: %s", exc)
        with session_scope(self.sessions) as session:
            pending = session.execute(
                select(Delivery.destination, func.count())
                .where(Delivery.state == DeliveryState.PENDING)
                .group_by(Delivery.destination)
            ).all()
            workers = session.execute(select(WorkerNode.state, func.count()).group_by(WorkerNode.state)).all()
        sample = metrics.HostSample(
            queue_depths=depths,
            storage_backlog=self.uploader.backlog(),
            deliveries_pending={str(destination): int(count) for destination, count in pending},
            workers={WorkerState(state).value: int(count) for state, count in workers},
            disks={"data": self.settings.data_dir, "spool": self.settings.spool_dir},
        )
        metrics.record_sample(sample, [state.value for state in WorkerState])
        return sample

    def route(self, now: datetime | None = None) -> RoutingPass:
        """Route the series that are ready and queue the jobs, deliveries and notifications that opened.

        Called by every scheduler pass, and by the uploader's thread the moment
        an upload pass has put the last waiting instance into the object store
        (a series waits for its last upload; see :meth:`_upload_forever`).  One
        routing pass at a time: two at once could both open jobs for the same series.
        """
        with self._routing:
            self._next_quiet_at = None  # a pass that fails leaves the regular interval, not a stale time
            profiles = self.profiles.refresh()
            with session_scope(self.sessions) as session:
                routing = route_ready_series(
                    session,
                    profiles,
                    now=now or utcnow(),
                    default_quiet_seconds=self.settings.quiet_period_seconds,
                    rules=self.profiles.rules,
                    files=self.files,
                    require_uploaded=self.uploader.enabled,
                    resend_window_seconds=self.settings.resend_window_seconds,
                )
            self._next_quiet_at = routing.next_quiet_at
            # Queued after the commit: a row always exists before its message does.
            for ticket in routing.new_jobs:
                self.queue.enqueue_analysis(ticket)
            for delivery_id in routing.new_deliveries:
                self.queue.enqueue_delivery(delivery_id)
            for notification in routing.notifications:
                self.queue.enqueue_notification(notification)
        return routing

    def seconds_until_next_pass(self, now: datetime | None = None) -> float:
        """How long the service waits before the next pass: ``scheduler_interval_seconds``, or less
        when a series becomes quiet sooner.

        Waking at the quiet period's end routes a series then, not up to one interval later (the
        local worker's turnaround had waited 0.2-0.5 s past the quiet period of a 300-slice CT).
        """
        interval = self.settings.scheduler_interval_seconds
        due = self._next_quiet_at
        if due is None:
            return interval
        remaining = (due - (now or utcnow())).total_seconds() + QUIET_MARGIN_SECONDS
        return min(interval, max(MIN_PASS_GAP_SECONDS, remaining))

    def start_uploads(self) -> None:
        """Run the uploader on a thread of its own, so uploads never hold up routing and deliveries.

        Started by the first pass (:meth:`run_once`), so after a restart what was left to upload
        goes first: nothing of it is routed before it is in the store.  Nothing to do for the
        embedded storage.
        """
        if not self.uploader.enabled or (self._upload_thread is not None and self._upload_thread.is_alive()):
            return
        self._stop_uploading.clear()
        self._upload_thread = threading.Thread(target=self._upload_forever, name="uploader", daemon=True)
        self._upload_thread.start()

    def stop_uploads(self, timeout: float | None = None) -> None:
        """Stop the uploader's thread after its current pass (what is not uploaded waits in the spool)."""
        self._stop_uploading.set()
        if self._upload_thread is not None:
            self._upload_thread.join(timeout)

    def _upload_forever(self) -> None:
        while not self._stop_uploading.is_set():
            try:
                hold = self.uploader.hold_seconds()
                if hold > 0:
                    self._stop_uploading.wait(hold)
                    continue
                outcome = self.uploader.run_once(after_batch=self.hint_prefetch)
            except Exception:  # the index unreachable, say: try again next interval
                log.exception("upload pass failed")
                outcome = None
            if outcome is not None and outcome.uploaded and outcome.error is None:
                # Everything acknowledged so far is in the store: a quiet series whose last
                # instance just landed is routed now, not at the next scheduler pass.
                try:
                    self.route()
                except Exception:  # the scheduler's own pass tries again
                    log.exception("routing after uploads failed")
            if outcome is None or outcome.error is not None or not outcome.uploaded:
                self._stop_uploading.wait(self.settings.scheduler_interval_seconds)

    def hint_prefetch(self, instance_ids: list[int]) -> list[PrefetchHint]:
        """Tell the workers that will analyse these just-uploaded instances to fetch them now
        (``worker_prefetch``; see :mod:`pacs_ai.route.prefetch`); returns the hints sent.

        Never raises: a hint not sent costs only the time it would have saved.
        """
        if not self.settings.worker_prefetch or not instance_ids:
            return []
        try:
            profiles = self.profiles.refresh()
            with session_scope(self.sessions) as session:
                served = served_queues(session, self.settings.worker_stale_after_seconds)
                hints = prefetch_hints(session, profiles, instance_ids, served)
            for hint in hints:
                self.queue.enqueue_prefetch(hint)
        except Exception:  # noqa: BLE001 - the broker or the index failing: the jobs fetch for themselves
            log.warning(
                "prefetch hints for %d uploaded instance(s) not sent", len(instance_ids), exc_info=True
            )
            return []
        return hints

    def retain_if_due(self) -> RetentionRun | None:
        """Run retention when its interval has passed and a retention limit is configured."""
        policy = policy_of(self.settings)
        if not policy.enabled or monotonic_clock.monotonic() < self._next_retention:
            return None
        # Set before running: a failing pass is retried next interval, not on every scheduler pass.
        self._next_retention = monotonic_clock.monotonic() + self.settings.retention_interval_minutes * 60
        return run_retention(self.sessions, self.settings, policy, actor="retention")

    def release_held_jobs(self) -> list[int]:
        """Queue the jobs held for the off-peak window (the caller checks that it is open)."""
        with session_scope(self.sessions) as session:
            held = list(session.scalars(select(Job).where(Job.state == JobState.HELD).order_by(Job.id)))
            for job in held:
                job.state = JobState.QUEUED
            tickets = [JobTicket.of(job) for job in held]
        for ticket in tickets:
            self.queue.enqueue_analysis(ticket)
        if tickets:
            log.info("off-peak window open: released %d held job(s)", len(tickets))
        return [ticket.job_id for ticket in tickets]


def local_time_of_day() -> time:
    """The wall-clock time here, which is what an off-peak window means to the people who set it."""
    return datetime.now().time()
