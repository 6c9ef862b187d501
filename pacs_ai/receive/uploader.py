"""Getting acknowledged instances from the receiver's spool into the object store, and knowing the backlog.

Durability with a remote store works like this: the listener acknowledges an
instance once it is fsynced in its local spool and indexed (fast, as with the
embedded storage), with ``instances.uploaded_at`` still empty.  The
:class:`Uploader`, run by the scheduler on the receiver, puts each such file
into the store under its key and only then sets ``uploaded_at``.  The router
waits for every instance of a series to be uploaded before it routes the
series (see :func:`pacs_ai.route.assembly.route_ready_series`), so no worker
on another host ever looks for an object that is not there.  Nothing is
acknowledged that is not durable: the spool file is, and the index remembers
what is still to upload, so after any restart the uploader first uploads
what was left.  While the store is unreachable or slower than ingest the
backlog grows; past ``storage_upload_backlog_max`` the listener refuses new
instances with 0xA700 and the reason (:class:`UploadBacklog`), and senders
retry later.  With ``storage_upload_hold_ms`` the uploads of a burst wait
until it is over (:meth:`Uploader.hold_seconds`), for receivers whose CPU
the uploads, or a store on the same host, would take from the listener.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Select, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.config import Settings
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Instance, utcnow
from pacs_ai.storage.base import Storage, StorageError
from pacs_ai.storage.keys import spool_path
from pacs_ai.storage.registry import is_embedded, storage_for

__all__ = ["UploadBacklog", "Uploader", "UploadPass", "lower_thread_priority"]

log = logging.getLogger(__name__)

#: Instances one pass of the uploader takes from the index at most.
UPLOAD_BATCH = 500
#: Uploads in flight at once: one object is one request, and the store answers many at a time.
UPLOADS_AT_ONCE = 8
#: Seconds between two passes that also look at routed instances (see ``Uploader.run_once``).
SWEEP_INTERVAL_SECONDS = 600.0
#: Seconds the listener trusts a backlog count before counting again.
BACKLOG_RECOUNT_SECONDS = 1.0


def _pending(only_unrouted: bool) -> Select[int, str]:
    """Instances acknowledged and not uploaded (the unrouted ones use the router's index)."""
    statement = select(Instance.id, Instance.path).where(
        Instance.uploaded_at.is_(None), Instance.purged_at.is_(None)
    )
    return statement.where(Instance.routed.is_(False)) if only_unrouted else statement


@dataclass
class UploadPass:
    """What one pass of the uploader did."""

    uploaded: int = 0
    failed: int = 0
    error: str | None = None


class Uploader:
    """Uploads the spool's un-uploaded instances into the remote store; a no-op for the embedded storage."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], storage: Storage | None = None
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.enabled = not is_embedded(settings)
        self.storage = storage if storage is not None else (storage_for(settings) if self.enabled else None)
        if self.storage is not None:  # a client's own threads (obstore's runtime) upload at our priority too
            self.storage.start_threads(lambda: lower_thread_priority(settings.storage_upload_nice))
        #: Monotonic time of the next pass that also looks at routed rows: instances received before
        #: a switch to a store, or a purged file received again.  Other passes read only unrouted
        #: rows, which the router's index finds at once.
        self._next_sweep = 0.0
        self._failing_since: float | None = None

    def run_once(self, after_batch: Callable[[list[int]], object] | None = None) -> UploadPass:
        """Upload what is pending, batch after batch, until nothing is or the store fails; never raises
        :class:`StorageError` (the failure is in the outcome and the log).

        ``after_batch`` is called with the ids of each batch's instances once they are recorded as
        uploaded (the scheduler's prefetch hints, :mod:`pacs_ai.route.prefetch`).
        """
        outcome = UploadPass()
        if not self.enabled:
            return outcome
        sweep = time.monotonic() >= self._next_sweep
        while True:
            with session_scope(self.sessions) as session:
                pending = _pending(only_unrouted=not sweep).order_by(Instance.id).limit(UPLOAD_BATCH)
                rows = session.execute(pending).all()
            if not rows:
                if sweep:
                    self._next_sweep = time.monotonic() + SWEEP_INTERVAL_SECONDS
                break
            done, error = self._upload([(row.id, row.path) for row in rows])
            if done:
                with session_scope(self.sessions) as session:
                    session.execute(
                        update(Instance)
                        .where(Instance.id.in_(done), Instance.uploaded_at.is_(None))
                        .values(uploaded_at=utcnow())
                        .execution_options(synchronize_session=False)
                    )
                if after_batch is not None:
                    after_batch(done)
            outcome.uploaded += len(done)
            if error is not None:
                outcome.failed += len(rows) - len(done)
                outcome.error = error
                break
        self._log(outcome)
        metrics.uploads(outcome.uploaded, outcome.failed)
        return outcome

    def hold_seconds(self) -> float:
        """How long to wait before the next pass: while instances are still arriving
        (``storage_upload_hold_ms``), up to ``storage_upload_max_hold_seconds`` after the oldest
        pending one was acknowledged; 0 when the pass should run now."""
        quiet = self.settings.storage_upload_hold_ms / 1000
        if not self.enabled or quiet <= 0:
            return 0.0
        arrivals = select(func.min(Instance.received_at), func.max(Instance.received_at)).where(
            Instance.uploaded_at.is_(None), Instance.purged_at.is_(None), Instance.routed.is_(False)
        )
        with session_scope(self.sessions) as session:
            oldest, newest = session.execute(arrivals).one()
        if newest is None:
            return 0.0
        now = utcnow()
        since_newest = (now - newest).total_seconds()
        since_oldest = (now - oldest).total_seconds()
        if (
            since_newest >= quiet
            or since_oldest >= self.settings.storage_upload_max_hold_seconds
            or since_newest < 0  # the clock was set back: the times say nothing, so do not wait
        ):
            return 0.0
        return min(quiet - since_newest, self.settings.storage_upload_max_hold_seconds - since_oldest)

    def backlog(self) -> int:
        """Instances acknowledged and not yet in the object store (0 with the embedded storage)."""
        if not self.enabled:
            return 0
        pending = select(func.count()).select_from(_pending(only_unrouted=False).subquery())
        with session_scope(self.sessions) as session:
            return session.scalar(pending) or 0

    def _upload(self, rows: list[tuple[int, str]]) -> tuple[list[int], str | None]:
        """Upload ``(id, key)`` rows at the same time; the ids done and the first error."""
        assert self.storage is not None
        storage, spool = self.storage, self.settings.spool_dir

        def upload(row: tuple[int, str]) -> int:
            storage.put_file(row[1], spool_path(spool, row[1]))
            return row[0]

        done: list[int] = []
        error: str | None = None
        with ThreadPoolExecutor(
            max_workers=UPLOADS_AT_ONCE,
            thread_name_prefix="upload",
            initializer=lower_thread_priority,
            initargs=(self.settings.storage_upload_nice,),
        ) as uploaders:
            for row, future in [(row, uploaders.submit(upload, row)) for row in rows]:
                try:
                    done.append(future.result())
                except (StorageError, OSError) as exc:
                    error = error or f"{row[1]}: {exc}"
        return done, error

    def _log(self, outcome: UploadPass) -> None:
        if outcome.error is None:
            if self._failing_since is not None:
                log.warning("uploads to %s work again", self.storage.description if self.storage else "")
            self._failing_since = None
            if outcome.uploaded:
                log.debug("uploaded %d instance(s)", outcome.uploaded)
            return
        now = time.monotonic()
        if self._failing_since is None or now - self._failing_since > 60:  # not once per pass
            self._failing_since = now
            log.error("uploading to the object store failed (will retry): %s", outcome.error)


def lower_thread_priority(steps: int) -> None:
    """Run the calling thread ``steps`` of ``nice`` lower (Linux, where a thread has a priority of its own).

    The receiver's uploads then take the CPU its listener leaves: during a burst the listener
    acknowledges at full speed and the uploads catch up after it (``storage_upload_nice``).
    Elsewhere, or where the system refuses, the thread keeps its priority.
    """
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + steps))
    except OSError as exc:
        log.debug("upload thread priority left as it is: %s", exc)


class UploadBacklog:
    """The listener's count of instances acknowledged and not yet in the object store.

    Counted in the index (every listener process and the uploader share it),
    at most once a second while far from the limit; near it, every instance
    counts again.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.limit = 0 if is_embedded(settings) else settings.storage_upload_backlog_max
        self.engine = engine
        self.where = settings.storage_url
        self._lock = threading.Lock()
        self._count = 0
        self._since_count = 0
        self._counted_at = -math.inf

    def refusal(self) -> str | None:
        """Why a new instance must be refused (0xA700), or None when it may be stored."""
        if not self.limit:
            return None
        with self._lock:
            now = time.monotonic()
            if (
                self._count + self._since_count >= self.limit
                or now - self._counted_at > BACKLOG_RECOUNT_SECONDS
            ):
                with self.engine.connect() as connection:
                    self._count = (
                        connection.scalar(
                            select(func.count()).select_from(_pending(only_unrouted=True).subquery())
                        )
                        or 0
                    )
                self._since_count, self._counted_at = 0, now
            if self._count >= self.limit:
                return (
                    f"{self._count} acknowledged instances are not yet in the object store {self.where} "
                    f"(storage_upload_backlog_max {self.limit}): the store is unreachable or slower than "
                    f"ingest; retry later"
                )
            self._since_count += 1
            return None
