"""Accepting one received data set: durable in the spool, recorded in the index, or refused.

An instance is acknowledged with Success only after its file is fsynced in the
spool and its row is committed in the index.  Anything else gets a failure
status that says why (0xA700 out of resources, 0xA900 data set does not match
SOP class, 0xC000 cannot understand) and leaves nothing half-written; the
rejection is recorded in the audit table, so it is visible, not silent.

This runs on the thread of the association that received the data set: it
blocks on fsync and on the index while the other associations' threads go on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import configure_mappers

from pacs_ai.config import Settings
from pacs_ai.index.associations import (
    AssociationMark,
    interrupt_dead_associations,
    mark_insert_statement,
    mark_series_interrupted,
)
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import WriteGate, make_write_gate
from pacs_ai.index.ingest import (
    NewInstanceInsert,
    Sender,
    SeriesIds,
    find_instance,
    insert_instance_if_new,
    instance_row,
    record_duplicate,
    record_new_instance,
)
from pacs_ai.index.models import Instance, ReceivingSeries, RoutingState, Series, Study, utcnow
from pacs_ai.receive.headers import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceHeader,
    InstanceRejected,
    ReceivedBytes,
    read_header,
)
from pacs_ai.receive.spool import Spool, UnsafeIdentifier
from pacs_ai.receive.uploader import UploadBacklog
from pacs_ai.storage.keys import spool_key, spool_path

log = logging.getLogger(__name__)


@dataclass
class _PendingRow:
    header: InstanceHeader
    path: str
    size: int
    sender: Sender
    #: The association's trace, when this row's series has no ``receiving_series`` row of it yet.
    mark: AssociationMark | None = None
    done: bool = False
    inserted: bool = False


class GroupCommit:
    """Index rows of instances stored at the same moment, committed in one transaction.

    Each commit takes the write lock and waits for a flush to the disk (a few
    milliseconds), so one commit per instance would cost every instance both.
    Here the first thread to arrive commits every row waiting at that moment;
    rows arriving meanwhile wait and go in the next commit.  Every instance is
    still acknowledged only after the commit holding its row is on the disk.
    The first instance of a series in an association carries that series'
    ``receiving_series`` row (:class:`AssociationMark`) into the same commit.
    """

    def __init__(self, gate: WriteGate, series_ids: SeriesIds) -> None:
        self._gate = gate
        self._series_ids = series_ids
        self._changed = threading.Condition()
        self._pending: list[_PendingRow] = []
        self._committing = False
        #: The DBAPI path's statement, on SQLite only (see :meth:`WriteGate.begin_dbapi`).
        self._insert = NewInstanceInsert(gate.engine.dialect) if gate.has_dbapi_path else None
        self._mark_insert = (
            NewInstanceInsert(gate.engine.dialect, mark_insert_statement(), ReceivingSeries.__table__)  # type: ignore[arg-type]
            if gate.has_dbapi_path
            else None
        )
        #: What the DBAPI (sqlite3) raises: its errors reach here unwrapped on the DBAPI path.
        self._dbapi_error: type[Exception] = gate.engine.dialect.loaded_dbapi.Error

    def insert(
        self,
        header: InstanceHeader,
        *,
        path: str,
        size: int,
        sender: Sender,
        mark: AssociationMark | None = None,
    ) -> bool:
        """Commit a new instance's row; False if it was not inserted (a duplicate, or any error).

        The caller then records it the slow way, one instance per transaction,
        which tells duplicates apart and raises what went wrong.  ``mark``'s
        row for the series goes in the same commit, if the series needs one.
        """
        series_uid = header.series_instance_uid
        needs_mark = mark is not None and mark.series_to_mark(series_uid)
        row = _PendingRow(header, path, size, sender, mark if needs_mark else None)
        with self._changed:
            self._pending.append(row)
            while self._committing and not row.done:
                self._changed.wait()
            if row.done:
                return row.inserted
            batch, self._pending = self._pending, []
            self._committing = True
        try:
            self._commit(batch)
        finally:
            with self._changed:
                for pending in batch:
                    pending.done = True
                self._committing = False
                self._changed.notify_all()
        return row.inserted

    def _commit(self, batch: list[_PendingRow]) -> None:
        series_ids = [self._series_ids.get(row.header.series_instance_uid) for row in batch]
        known_series_ids = [series_id for series_id in series_ids if series_id is not None]
        try:
            if self._insert is not None and len(known_series_ids) == len(batch):
                inserted = self._insert_on_dbapi(self._insert, batch, known_series_ids)
            else:
                with self._gate.begin() as connection:
                    for row in batch:
                        if row.mark is not None:
                            row.mark.write(connection, row.header.series_instance_uid)
                    inserted = [
                        insert_instance_if_new(
                            connection,
                            row.header,
                            path=row.path,
                            size=row.size,
                            sender=row.sender,
                            series_ids=self._series_ids,
                        )
                        for row in batch
                    ]
        except (SQLAlchemyError, self._dbapi_error) as exc:  # every row of the batch is retried on its own
            log.debug("group commit of %d rows failed, retrying one by one: %s", len(batch), exc)
            return
        for row, was_inserted in zip(batch, inserted, strict=True):
            row.inserted = was_inserted
            if row.mark is not None:  # committed, whether or not the instance was new
                row.mark.written(row.header.series_instance_uid)

    def _insert_on_dbapi(
        self, statement: NewInstanceInsert, batch: list[_PendingRow], series_ids: list[int]
    ) -> list[bool]:
        """The rows of instances of known series, inserted without SQLAlchemy's per-statement work."""
        rows = [
            instance_row(row.header, path=row.path, size=row.size, sender=row.sender, series_id=series_id)
            for row, series_id in zip(batch, series_ids, strict=True)
        ]
        with self._gate.begin_dbapi() as cursor:
            for pending in batch:
                if pending.mark is not None:
                    assert self._mark_insert is not None
                    self._mark_insert.execute(cursor, pending.mark.row(pending.header.series_instance_uid))
            return [statement.execute(cursor, row) for row in rows]


class StoreHandler:
    """Files received data sets for one listener process (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir, fsync=settings.fsync)
        #: Every index write of the listener goes through the gate (see :func:`make_write_gate`).
        self.gate = make_write_gate(settings.effective_database_url)
        self.series_ids = SeriesIds()
        self.group_commit = GroupCommit(self.gate, self.series_ids)
        self.min_free_bytes = settings.min_free_disk_mb * 1024 * 1024
        #: Refuses instances while too many acknowledged ones are not yet in the object store.
        self.upload_backlog = UploadBacklog(settings, self.gate.engine)
        # Set up the ORM's mappers now (about 20 ms of CPU) rather than while the first
        # instance's sender waits for its response.
        configure_mappers()

    def interrupt_dead_associations(self) -> int:
        """Series a listener process of this host left mid-association when it died: interrupted now.

        Run when a listener process starts (see :mod:`pacs_ai.index.associations`);
        the routing pass runs the same.  A failure is logged: the routing pass tries again.
        """
        try:
            with self.gate.begin() as connection:
                return interrupt_dead_associations(connection)
        except Exception:
            log.exception("could not look for associations a dead listener process left open")
            return 0

    def store(
        self,
        temp_path: Path,
        *,
        sender: Sender,
        sop_class: str,
        sop_instance: str,
        received: ReceivedBytes | None = None,
        stored_series: Counter[str] | None = None,
        mark: AssociationMark | None = None,
    ) -> tuple[int, str | None]:
        """File the complete Part 10 file at ``temp_path``; return (status, error comment).

        On Success (a new instance or a duplicate) the instance's Series
        Instance UID is counted in ``stored_series``: the association's record
        of what it stored, for :meth:`association_ended`.  With ``mark`` (the
        association's trace in the index), the first instance of each series
        in the association writes that series' ``receiving_series`` row in the
        transaction of its own index row: once per series per association,
        never per instance, and no commit of its own.

        ``received`` (the file's first bytes, as the listener kept them) spares
        reading the header back from the file; see
        :func:`~pacs_ai.receive.headers.read_header`.  ``temp_path`` may be an
        unnamed file's ``/proc/self/fd`` path (:meth:`Spool.create_incoming`),
        open until this returns.  On Success the file has its final name; the
        caller always discards the temporary file (or name) afterwards.
        """
        try:
            series_uid = self._store(temp_path, sender, sop_class, sop_instance, received, mark)
            if stored_series is not None:
                stored_series[series_uid] += 1
            return STATUS_SUCCESS, None
        except InstanceRejected as rejected:
            self.record_rejection(sender, sop_instance, rejected)
            return rejected.status, rejected.reason
        except OSError as exc:
            # Full disk, I/O error: refuse with "out of resources"; the sender retries later.
            log.error("cannot store %s from %s: %s", sop_instance, sender, exc)
            storage_error = InstanceRejected(STATUS_OUT_OF_RESOURCES, f"storage error: {exc}")
            self.record_rejection(sender, sop_instance, storage_error)
            return storage_error.status, storage_error.reason
        except OperationalError as exc:
            log.error("index unavailable while storing %s: %s", sop_instance, exc)
            return STATUS_OUT_OF_RESOURCES, "index database unavailable"

    def _store(
        self,
        temp_path: Path,
        sender: Sender,
        sop_class: str,
        sop_instance: str,
        received: ReceivedBytes | None,
        mark: AssociationMark | None = None,
    ) -> str:
        """Store or refuse (:class:`InstanceRejected`) one instance; returns its Series Instance UID."""
        if self.spool.free_bytes() < self.min_free_bytes:
            raise InstanceRejected(
                STATUS_OUT_OF_RESOURCES,
                f"less than {self.settings.min_free_disk_mb} MB free in {self.spool.root}",
            )
        backlog = self.upload_backlog.refusal()
        if backlog is not None:
            raise InstanceRejected(STATUS_OUT_OF_RESOURCES, backlog)
        header = read_header(
            temp_path,
            command_sop_class=sop_class,
            command_sop_instance=sop_instance,
            received=received,
        )
        try:
            final_path = self.spool.path_for(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
        except UnsafeIdentifier as exc:
            raise InstanceRejected(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc

        if self.series_ids.get(header.series_instance_uid) is None:
            # The first instance of a series this process has not seen: checked before its series
            # row is created, so a UID held in another study leaves no empty series behind.
            with self.gate.begin() as connection:
                elsewhere = held_elsewhere(connection, header)
            if elsewhere is not None:
                raise InstanceRejected(STATUS_CANNOT_UNDERSTAND, elsewhere)
        if self.spool.place_new(temp_path, final_path):
            try:
                self._index_new(header, final_path, sender, mark)
            except BaseException:
                # Not indexed means not accepted: take the name back so nothing half-recorded remains.
                final_path.unlink(missing_ok=True)
                raise
        else:
            self._store_over_existing_name(header, temp_path, final_path, sender, mark)
        log.debug(
            "stored %s (series %s) from %s", header.sop_instance_uid, header.series_instance_uid, sender
        )
        return header.series_instance_uid

    def _index_new(
        self, header: InstanceHeader, final_path: Path, sender: Sender, mark: AssociationMark | None = None
    ) -> None:
        size = final_path.stat().st_size
        key = spool_key(self.spool.root, final_path)  # the index records storage keys, not paths
        if self.group_commit.insert(header, path=key, size=size, sender=sender, mark=mark):
            return
        for attempt in range(2):
            try:
                with _marking(self.gate, mark, header.series_instance_uid) as connection:
                    record_new_instance(
                        connection,
                        header,
                        path=key,
                        size=size,
                        sender=sender,
                        series_ids=self.series_ids,
                    )
                return
            except IntegrityError:
                with _marking(self.gate, mark, header.series_instance_uid) as connection:
                    existing = find_instance(connection, header.sop_instance_uid)
                    if existing is not None:
                        if existing[1] == key or not spool_path(self.spool.root, existing[1]).exists():
                            # The indexed copy's file is gone (deleted by an administrator or by
                            # retention), which is why this copy's name was free: it takes its place.
                            _record_restored(connection, existing[0], header, key, size, sender)
                            return
                        # The SOP Instance UID is filed under another series or study: refused, and
                        # this copy's file removed by the caller, so nothing is left unindexed.
                        raise InstanceRejected(
                            STATUS_CANNOT_UNDERSTAND, held_elsewhere(connection, header) or "held elsewhere"
                        ) from None
                # Not a duplicate: the remembered series row is gone (purged); look it up again.
                self.series_ids.forget(header.series_instance_uid)
                if attempt:
                    raise

    def _store_over_existing_name(
        self,
        header: InstanceHeader,
        temp_path: Path,
        final_path: Path,
        sender: Sender,
        mark: AssociationMark | None = None,
    ) -> None:
        """The spool already has a file of this name: a duplicate, or an unindexed leftover."""
        # The first copy's association holds a lock on its file until it is indexed (or its name
        # taken back): waiting for it makes keep-first hold when two copies arrive at once.
        wait_for_first_copy(final_path)
        with _marking(self.gate, mark, header.series_instance_uid) as connection:
            existing = find_instance(connection, header.sop_instance_uid)
            if existing is not None:
                instance_id, existing_path = existing[0], spool_path(self.spool.root, existing[1])
                replace = self.settings.duplicate_policy == "replace"
                if replace:
                    self.spool.replace(temp_path, existing_path)
                outcome = record_duplicate(
                    connection,
                    instance_id,
                    header,
                    replaced=replace,
                    size=existing_path.stat().st_size,
                    sender=sender,
                )
                log.info("duplicate %s from %s: %s", header.sop_instance_uid, sender, outcome.value)
                return
        # A file never acknowledged (a crash between rename and commit): this copy replaces it.
        self.spool.replace(temp_path, final_path)
        self._index_new(header, final_path, sender, mark)

    def record_rejection(self, sender: Sender, sop_instance: str, rejected: InstanceRejected) -> None:
        log.warning(
            "refused %s from %s with status 0x%04X: %s",
            sop_instance,
            sender,
            rejected.status,
            rejected.reason,
        )
        try:
            with self.gate.begin() as connection:
                record_audit(
                    connection,
                    actor=f"dicom:{sender.ae_title}",
                    action="instance.rejected",
                    object_type="instance",
                    object_uid=sop_instance[:64],
                    detail={"status": f"0x{rejected.status:04X}", "reason": rejected.reason},
                )
        except Exception:  # the refusal itself must still reach the sender
            log.exception("could not record the refusal of %s", sop_instance)

    def association_ended(
        self,
        stored_series: Counter[str],
        sender: Sender,
        *,
        released: bool,
        reason: str | None = None,
        mark: AssociationMark | None = None,
    ) -> None:
        """Record how an association that stored instances of ``stored_series`` ended.

        Not released (A-ABORT, a lost connection, a timeout, a protocol error):
        each series it stored into is marked interrupted now, with how many of
        its instances this association had acknowledged, and audited
        (``series.interrupted``); the router holds it for the resend window.
        Released: the series it stored into that were interrupted are complete
        again (``series.resent``); one marked incomplete meanwhile is reopened,
        so the router takes it as it takes any arrival.  Either way the
        association's ``receiving_series`` rows (``mark``) are deleted in the
        same transaction: a released association storing into no interrupted
        series costs one read and that one delete, whatever its instance count.
        """
        marked = mark is not None and bool(mark.marked)
        if not stored_series and not marked:
            return
        uids = list(stored_series)
        try:
            if released:
                self._clear_interruptions(uids, sender, mark if marked else None)
            else:
                self._record_interruption(
                    stored_series, sender, reason or "ended without A-RELEASE", mark if marked else None
                )
        except Exception:  # the association is over either way; the router then routes as before
            log.exception("could not record how the association from %s ended", sender)

    def _record_interruption(
        self, stored_series: Counter[str], sender: Sender, reason: str, mark: AssociationMark | None
    ) -> None:
        now = utcnow()
        with self.gate.begin() as connection:
            if mark is not None:
                mark.clear(connection)
            for series_uid, count in stored_series.items():
                mark_series_interrupted(connection, series_uid, count, sender.ae_title, reason, now)
        if not stored_series:
            return
        log.warning(
            "association from %s ended without A-RELEASE (%s) after storing into %d series; they wait "
            "%.0f s for a resend",
            sender,
            reason,
            len(stored_series),
            self.settings.resend_window_seconds,
        )

    def _clear_interruptions(
        self, series_uids: list[str], sender: Sender, mark: AssociationMark | None
    ) -> None:
        interrupted: list[tuple[int, str, RoutingState]] = []
        if mark is None:
            with self.gate.engine.connect() as connection:  # a read: no write lock in the common case
                interrupted = _interrupted_among(connection, series_uids)
            if not interrupted:
                return
        # Deleting the marks needs no flush of its own: a killed process does not lose the commit
        # (the kernel has it), and only a power cut before the next flushed commit could.  What a
        # release completes is flushed before returning, as every other index write of the listener.
        with self.gate.begin(flush=False) as connection:
            if mark is not None:
                mark.clear(connection)
                interrupted = _interrupted_among(connection, series_uids)
            for series_id, series_uid, state in interrupted:
                connection.execute(
                    update(Series)
                    .where(Series.id == series_id)
                    .values(interrupted_at=None, interrupted_instances=None)
                )
                if state == RoutingState.INCOMPLETE:
                    # Held back as incomplete: now it is whole, route it as a new arrival.
                    connection.execute(
                        update(Instance).where(Instance.series_fk == series_id).values(routed=False)
                    )
                    connection.execute(
                        update(Series)
                        .where(Series.id == series_id)
                        .values(routing_state=RoutingState.RECEIVING)
                    )
                record_audit(
                    connection,
                    actor=f"dicom:{sender.ae_title}"[:128],
                    action="series.resent",
                    object_type="series",
                    object_uid=series_uid,
                    detail={"was": state.value},
                )
        if interrupted:
            self.gate.flush()
            log.info("association from %s completed %d interrupted series", sender, len(interrupted))


def _interrupted_among(connection: Connection, series_uids: list[str]) -> list[tuple[int, str, RoutingState]]:
    """(id, UID, routing state) of those of ``series_uids`` marked interrupted."""
    if not series_uids:
        return []
    rows = connection.execute(
        select(Series.id, Series.series_instance_uid, Series.routing_state).where(
            Series.series_instance_uid.in_(series_uids), Series.interrupted_at.is_not(None)
        )
    )
    return [(row[0], row[1], row[2]) for row in rows]


@contextlib.contextmanager
def _marking(gate: WriteGate, mark: AssociationMark | None, series_uid: str) -> Iterator[Connection]:
    """``gate.begin()``, with ``mark``'s row for the series in the same transaction if it needs one.

    The row counts as written once the transaction has committed (whatever
    the caller did in it); rolled back, the series still needs its row.
    """
    needs_mark = mark is not None and mark.series_to_mark(series_uid)
    with gate.begin() as connection:
        if needs_mark:
            assert mark is not None
            mark.write(connection, series_uid)
        yield connection
    if needs_mark:
        assert mark is not None
        mark.written(series_uid)


def held_elsewhere(connection: Connection, header: InstanceHeader) -> str | None:
    """Why ``header``'s SOP Instance UID cannot be filed: it is indexed under another series; or None."""
    row = connection.execute(
        select(Series.series_instance_uid, Study.study_instance_uid)
        .join(Instance, Instance.series_fk == Series.id)
        .join(Study, Study.id == Series.study_fk)
        .where(Instance.sop_instance_uid == header.sop_instance_uid)
    ).first()
    if row is None or row.series_instance_uid == header.series_instance_uid:
        return None
    return (
        f"SOP Instance UID {header.sop_instance_uid} is already held in series {row.series_instance_uid} "
        f"of study {row.study_instance_uid}; a UID names one instance only"
    )


#: Longest a second copy of an instance waits for the first copy's store to finish, in seconds.
FIRST_COPY_WAIT_SECONDS = 30.0


def wait_for_first_copy(final_path: Path) -> None:
    """Wait until no association holds the lock on the file at ``final_path``.

    The listener locks each incoming file (``flock``) from its creation until
    it is stored or refused; a second copy finding the name taken waits here,
    so it never mistakes a copy being indexed for a leftover of a crash.
    """
    deadline = time.monotonic() + FIRST_COPY_WAIT_SECONDS
    try:
        descriptor = os.open(final_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InstanceRejected(
                        STATUS_OUT_OF_RESOURCES, "another copy of this instance is still being stored"
                    ) from None
                time.sleep(0.01)
    finally:
        os.close(descriptor)


def _record_restored(
    connection: Connection, instance_id: int, header: InstanceHeader, key: str, size: int, sender: Sender
) -> None:
    """Point an indexed instance whose file was missing at the copy just received, and audit it.

    The row keeps its routing state: receiving a lost file again (``pacs-ai
    reprocess`` retrieving it from the PACS, say) is not by itself a reason to
    analyse the series again.
    """
    connection.execute(
        update(Instance)
        .where(Instance.id == instance_id)
        .values(
            path=key,
            size_bytes=size,
            transfer_syntax_uid=header.transfer_syntax_uid,
            purged_at=None,
            uploaded_at=None,  # this copy goes to the object store again
        )
    )
    record_audit(
        connection,
        actor=f"dicom:{sender.ae_title}",
        action="instance.restored",
        object_type="instance",
        object_uid=header.sop_instance_uid,
        detail={"path": key},
    )
    log.info("restored the missing file of %s from %s", header.sop_instance_uid, sender)
