"""Recording a result object of a job and its pending deliveries, idempotently.

A job's SEG and SR, a report draft's SR and a signed report's SR are all
recorded the same way: one :class:`~pacs_ai.index.models.Result` row per SOP
Instance UID and one pending :class:`~pacs_ai.index.models.Delivery` per
destination.  Recording again (a redelivered task, a retried transaction)
finds the rows already there and adds only what is missing, so a result is
never recorded or sent twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.models import Delivery, DeliveryState, Result

__all__ = ["record_result"]


def record_result(
    session: Session,
    job_id: int,
    *,
    kind: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    path: str | Path,
    destinations: Sequence[str],
    next_attempt_at: datetime,
) -> Result:
    """The result row of ``sop_instance_uid`` (added if new) with a delivery to each destination.

    ``path`` is the object's storage key (``results/<study>/<sop>.dcm``, see
    :mod:`pacs_ai.storage.keys`); it is in the storage before this is called.

    ``next_attempt_at`` is when the scheduler may send a new delivery: now for
    work nobody queues, or a lease (:func:`pacs_ai.dispatch.delivery.lease_expiry`)
    when the caller queues it itself right after the commit.
    """
    result = session.scalar(select(Result).where(Result.sop_instance_uid == sop_instance_uid))
    if result is None:
        result = Result(
            job_fk=job_id,
            kind=kind,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            series_instance_uid=series_instance_uid,
            path=str(path),
        )
        session.add(result)
        session.flush()
    known = set(session.scalars(select(Delivery.destination).where(Delivery.result_fk == result.id)))
    for destination in destinations:
        if destination not in known:
            session.add(
                Delivery(
                    result_fk=result.id,
                    destination=destination,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=next_attempt_at,
                )
            )
    session.flush()
    return result
