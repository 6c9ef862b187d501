"""Objects retention could not delete from the storage yet, and which objects the index still needs.

Retention deletes the objects of a purged study's instances and results from
the storage (an S3 bucket, a shared folder) in batches.  A key the storage
would not delete (unreachable, permission refused) is recorded here with the
reason and tried again at the next retention pass; ``pacs-ai status`` and
``pacs-ai purge`` show how many wait, and why.

An object is never deleted while the index still refers to it: an instance
row not purged (the study was received again, e.g. pulled back for
reprocessing, under the same key) or a result not purged.  The check locks
those rows, so a listener receiving the instance again meanwhile waits until
the deletion is over and then stores it anew.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from pacs_ai.index.models import Base, Instance, Result, utcnow
from pacs_ai.storage.keys import INSTANCES, RESULTS

__all__ = [
    "PendingDeletions",
    "StorageDeletion",
    "forget_deletions",
    "pending_deletions",
    "record_failed_deletions",
    "referenced_keys",
    "summary",
]

#: Kind of the results that are forwarded originals: their key is an instance's key.
_ORIGINAL = "ORIGINAL"


class StorageDeletion(Base):
    """An object key retention has to delete from the storage and could not yet."""

    __tablename__ = "storage_deletions"

    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    first_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_tried_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    #: Why the last attempt failed, as the storage said it (no credentials in it).
    last_error: Mapped[str] = mapped_column(Text)


def _sop_uid(key: str) -> str | None:
    """The SOP Instance UID a key of pacs-ai's names (its last part without ``.dcm``); None otherwise."""
    top, _, rest = key.partition("/")
    name = rest.rpartition("/")[2]
    if top not in (INSTANCES, RESULTS) or not name.endswith(".dcm"):
        return None
    return name.removesuffix(".dcm")


def referenced_keys(session: Session, keys: Collection[str]) -> set[str]:
    """Those of ``keys`` an instance or result row not purged still refers to (locked until commit).

    Looked up by SOP Instance UID (unique, indexed) and compared by key.
    """
    wanted = set(keys)
    by_uid = {uid: key for key in wanted if (uid := _sop_uid(key)) is not None}
    referenced: set[str] = set()
    uids = list(by_uid)
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        for path, purged_at in session.execute(
            select(Instance.path, Instance.purged_at)
            .where(Instance.sop_instance_uid.in_(chunk))
            .with_for_update()
        ):
            if purged_at is None and path in wanted:
                referenced.add(path)
        for path, purged_at, kind in session.execute(
            select(Result.path, Result.purged_at, Result.kind)
            .where(Result.sop_instance_uid.in_(chunk))
            .with_for_update()
        ):
            if purged_at is None and kind != _ORIGINAL and path in wanted:
                referenced.add(path)
    return referenced


def record_failed_deletions(session: Session, failed: dict[str, str]) -> None:
    """Record (or count again) the keys the storage did not delete, with why; the caller commits."""
    if not failed:
        return
    now = utcnow()
    known = {
        row.key: row
        for row in session.scalars(select(StorageDeletion).where(StorageDeletion.key.in_(list(failed))))
    }
    for key, reason in failed.items():
        row = known.get(key)
        if row is None:
            session.add(
                StorageDeletion(
                    key=key, first_failed_at=now, last_tried_at=now, attempts=1, last_error=reason
                )
            )
        else:
            row.attempts += 1
            row.last_tried_at = now
            row.last_error = reason


def forget_deletions(session: Session, keys: Iterable[str]) -> None:
    """Drop keys that are deleted now, or that the index needs again (never to be deleted)."""
    keys = list(keys)
    for start in range(0, len(keys), 500):
        session.execute(delete(StorageDeletion).where(StorageDeletion.key.in_(keys[start : start + 500])))


def pending_deletions(session: Session, limit: int) -> list[str]:
    """Up to ``limit`` keys waiting to be deleted, those tried least recently first."""
    return list(
        session.scalars(select(StorageDeletion.key).order_by(StorageDeletion.last_tried_at).limit(limit))
    )


@dataclass(frozen=True)
class PendingDeletions:
    """How many objects wait to be deleted from the storage, since when, and the latest reason."""

    count: int
    oldest_failure: str | None
    last_error: str | None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def summary(session: Session) -> PendingDeletions:
    """The objects retention could not delete yet (``pacs-ai status``, ``pacs-ai purge``)."""
    count, oldest = session.execute(
        select(func.count(StorageDeletion.key), func.min(StorageDeletion.first_failed_at))
    ).one()
    last = session.scalar(
        select(StorageDeletion.last_error).order_by(StorageDeletion.last_tried_at.desc()).limit(1)
    )
    return PendingDeletions(int(count or 0), oldest.isoformat() if oldest else None, last)
