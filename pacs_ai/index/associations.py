"""Series being received by an open association, and those a vanished listener process left behind.

An association that ends without A-RELEASE marks the series it stored into
interrupted when it ends (:meth:`pacs_ai.receive.store.StoreHandler.association_ended`).
A listener process that is killed (SIGKILL, the power lost) runs nothing at
the end of its associations, so each association also leaves a durable trace
while it is open: one ``receiving_series`` row per series it stores into,
written once, before that series' first instance of the association is
acknowledged, and deleted when the association ends.  Nothing is written per
instance.

A row whose listener process no longer exists is found by
:func:`interrupt_dead_associations` (run when a listener process starts and by
every routing pass): its series is marked interrupted, exactly as an aborted
association's are, so the router holds it for the resend window and then
marks it incomplete.  A process is named by its host name, the kernel's boot
id, its pid and its start time counted from boot (not affected by clock
changes), so a reused pid or a reboot is never taken for the process that
wrote the row.  Only rows of this host are judged; another host's listener
judges its own when it starts.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import Instance, ReceivingSeries, Series, utcnow

log = logging.getLogger(__name__)

#: Start times from boot are in clock ticks (1/100 s on Linux); a live process always matches itself.
_START_TOLERANCE_SECONDS = 0.05
#: What a sweep records as the reason (audit and the series' routing detail).
PROCESS_GONE_REASON = "the listener process ended with the association open (killed or power lost)"


def _boot_id() -> str:
    """The kernel's random boot id: changes at every boot (empty where there is none)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - Linux always has it
        return ""


def _started_after_boot(process: psutil.Process) -> float:
    """Seconds from boot to the process's start: fixed for the process, whatever the wall clock does."""
    return float(process.create_time() - psutil.boot_time())


@dataclass(frozen=True)
class ListenerProcess:
    """This listener process, as the ``receiving_series`` rows it writes name it."""

    host: str
    boot_id: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> ListenerProcess:
        """This process (looked up once per pid: a forked child is another process)."""
        return _process_of(os.getpid())


@cache
def _process_of(pid: int) -> ListenerProcess:
    process = psutil.Process(pid)
    return ListenerProcess(socket.gethostname()[:255], _boot_id(), pid, _started_after_boot(process))


class AssociationMark:
    """The trace one open association leaves in the index: the series it has stored into so far.

    :meth:`series_to_mark` says whether a series still needs its row (once per
    series); :meth:`write` (or :meth:`row` on the listener's DBAPI path) adds it
    in the transaction of the instance's own row, so it costs no commit of its
    own; :meth:`clear` deletes the association's rows.
    """

    _numbers = itertools.count(1)

    def __init__(self, calling_ae_title: str) -> None:
        self.process = ListenerProcess.current()
        self.number = next(self._numbers)  # itertools.count is atomic under the GIL
        self.calling_ae_title = calling_ae_title[:16]
        self.marked: set[str] = set()

    def series_to_mark(self, series_uid: str) -> bool:
        return series_uid not in self.marked

    def row(self, series_uid: str) -> dict[str, Any]:
        """The values of the ``receiving_series`` row for ``series_uid``."""
        return {
            "series_instance_uid": series_uid,
            "host": self.process.host,
            "boot_id": self.process.boot_id,
            "pid": self.process.pid,
            "process_started": self.process.started,
            "association": self.number,
            "calling_ae_title": self.calling_ae_title,
            "opened_at": utcnow(),
        }

    def write(self, connection: Connection, series_uid: str) -> None:
        """Insert the row for ``series_uid`` (the caller commits, then calls :meth:`written`)."""
        connection.execute(insert(ReceivingSeries).values(**self.row(series_uid)))

    def written(self, series_uid: str) -> None:
        self.marked.add(series_uid)

    def clear(self, connection: Connection) -> None:
        """Delete this association's rows (in the caller's transaction), when it ends."""
        connection.execute(
            delete(ReceivingSeries).where(
                ReceivingSeries.host == self.process.host,
                ReceivingSeries.pid == self.process.pid,
                ReceivingSeries.process_started == self.process.started,
                ReceivingSeries.association == self.number,
            )
        )
        self.marked.clear()


def mark_insert_statement() -> Insert:
    """The insert of one ``receiving_series`` row (for a compiled, DBAPI-level execution)."""
    return insert(ReceivingSeries)


def process_gone(written_by: ListenerProcess, here: ListenerProcess) -> bool | None:
    """Whether the listener process ``written_by`` is gone; None when it ran on another host than ``here``."""
    if written_by.host != here.host:
        return None
    if written_by.boot_id != here.boot_id:
        return True  # written before this host last booted
    try:
        process = psutil.Process(written_by.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        started = _started_after_boot(process)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # pragma: no cover - /proc/<pid>/stat is readable by anyone
        return False
    return abs(started - written_by.started) > _START_TOLERANCE_SECONDS


def interrupt_dead_associations(db: Session | Connection, now: datetime | None = None) -> int:
    """Mark interrupted the series of associations whose listener process on this host is gone.

    Each such series gets ``interrupted_at`` (now: the resend window starts
    when the loss is found) and, as ``interrupted_instances``, how many of its
    instances arrived since the association's row was written; audited as
    ``series.interrupted`` with the reason.  The rows are deleted, each by the
    one sweep that deletes it, so two sweeps at once record a series once.
    Returns the number of series marked.  The caller commits.
    """
    here = ListenerProcess.current()
    rows = db.execute(
        select(
            ReceivingSeries.id,
            ReceivingSeries.series_instance_uid,
            ReceivingSeries.opened_at,
            ReceivingSeries.calling_ae_title,
            ReceivingSeries.host,
            ReceivingSeries.boot_id,
            ReceivingSeries.pid,
            ReceivingSeries.process_started,
        ).where(ReceivingSeries.host == here.host)
    ).all()
    gone: dict[ListenerProcess, bool | None] = {}  # each process looked up once, not once per row
    for row in rows:
        written_by = ListenerProcess(row.host, row.boot_id, row.pid, row.process_started)
        if written_by not in gone:
            gone[written_by] = process_gone(written_by, here)
    dead = [row for row in rows if gone[ListenerProcess(row.host, row.boot_id, row.pid, row.process_started)]]
    if not dead:
        return 0
    now = now or utcnow()
    marked = 0
    for row in dead:
        series_uid, opened_at, calling_ae = row.series_instance_uid, row.opened_at, row.calling_ae_title
        taken = db.execute(delete(ReceivingSeries).where(ReceivingSeries.id == row.id))
        if getattr(taken, "rowcount", 1) != 1:
            continue  # another sweep took it
        series_id = db.scalar(select(Series.id).where(Series.series_instance_uid == series_uid))
        if series_id is None:
            continue  # nothing of it was acknowledged (or it was purged since)
        count = db.scalar(
            select(func.count(Instance.id)).where(
                Instance.series_fk == series_id, Instance.received_at >= opened_at
            )
        )
        mark_series_interrupted(db, series_uid, count or 0, calling_ae, PROCESS_GONE_REASON, now)
        marked += 1
    if marked:
        log.warning(
            "%d series were being received when their listener process ended; they wait for a resend",
            marked,
        )
    return marked


def mark_series_interrupted(
    db: Connection | Session, series_uid: str, instances: int, calling_ae: str, reason: str, now: datetime
) -> None:
    """Hold ``series_uid`` as interrupted (``instances`` of it came in the cut association) and audit why.

    The router holds such a series for ``resend_window_seconds`` and then marks
    it incomplete unless a released association completes it.
    """
    db.execute(
        update(Series)
        .where(Series.series_instance_uid == series_uid)
        .values(interrupted_at=now, interrupted_instances=instances)
    )
    record_audit(
        db,
        actor=f"dicom:{calling_ae}"[:128],
        action="series.interrupted",
        object_type="series",
        object_uid=series_uid,
        detail={"instances": instances, "reason": reason},
    )
