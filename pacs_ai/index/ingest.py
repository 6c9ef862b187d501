"""Recording received instances in the index.

Called by the listener for every instance after its file is durably in the
spool and before the C-STORE is acknowledged.  The common case (another
instance of a series already known) costs one UPDATE and one INSERT; the first
instance of a series also upserts its patient, study and series rows.  Upserts
use ``INSERT ... ON CONFLICT DO NOTHING`` because several listener processes
may see the first instances of one study at the same moment.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import Instance, Patient, RoutingState, Series, Study, utcnow
from pacs_ai.receive.headers import InstanceHeader


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE_KEPT_FIRST = "duplicate-kept-first"
    DUPLICATE_REPLACED = "duplicate-replaced"


def _insert_ignoring_conflict(session: Session, model: type, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(model).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        session.execute(sqlite.insert(model).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise RuntimeError(f"unsupported index database dialect {dialect!r}")


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def _touch_series(session: Session, series_uid: str, *, new_instance: bool) -> int | None:
    """Count an accepted write on a known series; returns its id, or None if unknown."""
    stmt = (
        update(Series)
        .where(Series.series_instance_uid == series_uid)
        .values(
            instance_count=Series.instance_count + (1 if new_instance else 0),
            revision=Series.revision + 1,
            last_received_at=utcnow(),
        )
        .returning(Series.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def _create_series(session: Session, header: InstanceHeader, calling_ae: str) -> int:
    _insert_ignoring_conflict(
        session,
        Patient,
        {
            "patient_id": header.patient_id,
            "issuer": header.issuer_of_patient_id,
            "patient_name": header.patient_name,
            "birth_date": header.patient_birth_date,
            "sex": header.patient_sex,
        },
    )
    patient_fk = session.scalar(
        select(Patient.id).where(
            Patient.patient_id == header.patient_id, Patient.issuer == header.issuer_of_patient_id
        )
    )
    _insert_ignoring_conflict(
        session,
        Study,
        {
            "study_instance_uid": header.study_instance_uid,
            "patient_fk": patient_fk,
            "accession_number": header.accession_number,
            "study_date": header.study_date,
            "study_description": header.study_description,
            "first_received_at": utcnow(),
        },
    )
    study_fk = session.scalar(select(Study.id).where(Study.study_instance_uid == header.study_instance_uid))
    _insert_ignoring_conflict(
        session,
        Series,
        {
            "series_instance_uid": header.series_instance_uid,
            "study_fk": study_fk,
            "modality": header.modality,
            "body_part_examined": header.body_part_examined,
            "series_description": header.series_description,
            "series_number": header.series_number,
            "sop_class_uid": header.sop_class_uid,
            "image_type": header.image_type,
            "slice_thickness": header.slice_thickness,
            "calling_ae_title": calling_ae,
            "instance_count": 0,
            "revision": 0,
            "routed_revision": 0,
            "routing_state": RoutingState.RECEIVING,
            "last_received_at": utcnow(),
        },
    )
    series_id = _touch_series(session, header.series_instance_uid, new_instance=True)
    assert series_id is not None  # inserted or present: the upsert above guarantees it
    return series_id


def record_new_instance(
    session: Session, header: InstanceHeader, *, path: str, size: int, calling_ae: str
) -> None:
    """Add a new instance (the caller commits).  Raises IntegrityError if it already exists."""
    series_id = _touch_series(session, header.series_instance_uid, new_instance=True)
    if series_id is None:
        series_id = _create_series(session, header, calling_ae)
    # A Core INSERT: this runs for every received instance, and the ORM's
    # unit of work would cost more than the statement itself.
    session.execute(
        insert(Instance).values(
            sop_instance_uid=header.sop_instance_uid,
            series_fk=series_id,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            instance_number=header.instance_number,
            path=path,
            size_bytes=size,
            calling_ae_title=calling_ae,
            received_at=utcnow(),
            duplicates_received=0,
        )
    )


def record_duplicate(
    session: Session,
    existing: Instance,
    *,
    replaced: bool,
    size: int,
    calling_ae: str,
    transfer_syntax_uid: str,
) -> IngestOutcome:
    """Count a second copy of a known instance and audit it (the caller commits)."""
    existing.duplicates_received += 1
    if replaced:
        existing.size_bytes = size
        existing.transfer_syntax_uid = transfer_syntax_uid
        existing.received_at = utcnow()
        series_uid = session.scalar(select(Series.series_instance_uid).where(Series.id == existing.series_fk))
        if series_uid is not None:
            _touch_series(session, series_uid, new_instance=False)
    outcome = IngestOutcome.DUPLICATE_REPLACED if replaced else IngestOutcome.DUPLICATE_KEPT_FIRST
    record_audit(
        session,
        actor=f"dicom:{calling_ae}",
        action="instance.duplicate",
        object_type="instance",
        object_uid=existing.sop_instance_uid,
        detail={"outcome": outcome.value, "copies_after_first": existing.duplicates_received},
    )
    return outcome


__all__ = [
    "IngestOutcome",
    "IntegrityError",
    "find_instance",
    "record_duplicate",
    "record_new_instance",
]
