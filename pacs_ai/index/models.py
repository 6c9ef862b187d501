"""The index database: what was received, what was decided, what was produced.

The index, not the broker, is the source of truth.  A job exists here before a
message for it is queued, and its state here decides whether a (re)delivered
message still has work to do.  Schema changes go through Alembic migrations in
``pacs_ai/index/migrations``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite keeps no zone and hands back naive values; comparing those with
    aware ones raises, so values are normalised to aware UTC both ways.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the index; use pacs_ai.index.models.utcnow()")
        value = value.astimezone(UTC)
        # SQLite stores text without a zone: keep it naive UTC there so that
        # SQL comparisons between stored values and parameters stay consistent.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class Patient(Base):
    """A patient as identified by the sending system (PatientID + issuer)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    #: Kept locally for the worklist; never written to logs.
    patient_name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int | None] = mapped_column(ForeignKey("patients.id"))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Reading priority raised by AI findings (a :class:`StudyPriority` value),
    #: None while no profile rule has fired.  Only ever raised, never lowered.
    ai_priority: Mapped[str | None] = mapped_column(String(16))
    #: Which finding of which job raised it, e.g. "Pneumothorax p=0.93 > 0.8 (profile cxr, ...)".
    ai_priority_reason: Mapped[str | None] = mapped_column(Text)
    ai_priority_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[list[Series]] = relationship(back_populates="study")


class StudyPriority(enum.StrEnum):
    """Reading priority of a study as AI findings set it, most urgent first."""

    STAT = "STAT"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"

    @property
    def rank(self) -> int:
        """0 for STAT, 1 for URGENT, 2 for ROUTINE: lower is more urgent."""
        return list(StudyPriority).index(self)


class RoutingState(enum.StrEnum):
    """What the router decided for a series."""

    RECEIVING = "receiving"  # instances still arriving (quiet period not over)
    ROUTED = "routed"  # one or more profiles matched; jobs exist
    UNMATCHED = "unmatched"  # no profile matched; the reason is recorded
    DISCARDED = "discarded"  # a routing rule said to ignore it; the rule and reason are recorded
    #: An association storing into it was aborted and no complete resend came within the resend
    #: window: not analysed unless forced (``pacs-ai reprocess``); the reason is recorded.
    INCOMPLETE = "incomplete"


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[str | None] = mapped_column(String(256))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    #: IP address of the sender of the series' first instance, for routing rules.
    peer_address: Mapped[str | None] = mapped_column(String(64))
    #: Instances and latest arrival as of the router's last decision; the
    #: listener only inserts instance rows, so receiving never contends on
    #: this row (see ``Instance.routed``).
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime | None] = mapped_column()
    routing_state: Mapped[RoutingState] = mapped_column(
        Enum(RoutingState, native_enum=False, length=16), default=RoutingState.RECEIVING
    )
    routing_detail: Mapped[str | None] = mapped_column(Text)
    #: When the last association that stored into the series ended by A-ABORT or a lost
    #: connection (not A-RELEASE); None once a later association storing into it was released.
    #: The router holds the series for ``resend_window_seconds`` from then (see
    #: :mod:`pacs_ai.route.assembly`).
    interrupted_at: Mapped[datetime | None] = mapped_column()
    #: Instances of the series that interrupted association had acknowledged.
    interrupted_instances: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One accepted SOP instance; ``path`` is its storage key (``instances/<study>/<series>/<sop>.dcm``).

    The key names the instance in the storage (:mod:`pacs_ai.storage`) and, on
    the receiver, its file in the spool; no host path is recorded.
    """

    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_unrouted", "routed", "series_fk"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Copies of this SOP Instance UID received after the first one.
    duplicates_received: Mapped[int] = mapped_column(Integer, default=0)
    #: False until the router has taken this instance into a decision; a
    #: series with unrouted instances is one the router must look at again.
    routed: Mapped[bool] = mapped_column(Boolean, default=False)
    #: When retention deleted the spool file (``path`` is kept for the record); None while it is there.
    #: Such a row may be received again: the listener restores the file (see ``pacs_ai.index.purge``).
    purged_at: Mapped[datetime | None] = mapped_column()
    #: When the uploader put the spool file into a remote object store (``storage_url``); None while
    #: only the receiver's spool has it.  Always None with the embedded storage, which is the spool.
    #: A series is routed only once every instance is uploaded (see ``pacs_ai.receive.uploader``).
    uploaded_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[Series] = relationship(back_populates="instances")


class JobState(enum.StrEnum):
    HELD = "held"  # waiting for the off-peak window (routing priority "off-peak")
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Job(Base):
    """One analysis of one series by one analyzer of one profile, at one version.

    ``idempotency_key`` is (series, profile, analyzer@version, job version): a
    redelivered message for a finished job finds it finished and does nothing,
    and result UIDs are derived from it so a resend overwrites, never duplicates.
    """

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("idempotency_key", name="uq_job_idempotency_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(400))
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    profile: Mapped[str] = mapped_column(String(128))
    analyzer: Mapped[str] = mapped_column(String(128))
    analyzer_version: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    #: The analyzer parameters and destinations of the profile as it was when
    #: the job was opened: a job runs as decided, whatever later edits say.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: The profile step's priority rules (``PriorityRule`` as dicts), evaluated on the findings.
    priority_rules: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=list)
    #: The profile step's time limit in seconds; None means the installation default.
    timeout_seconds: Mapped[float | None] = mapped_column(Float)
    #: The routing rule that opened the job (None when profiles route without rules).
    rule: Mapped[str | None] = mapped_column(String(128))
    #: "stat", "routine" or "off-peak" (held until the off-peak window); from the routing rule.
    routing_priority: Mapped[str] = mapped_column(String(16), default="routine")
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.QUEUED, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Celery node name of the worker running it, so a supervisor that sees that
    #: worker die can hand the job to another at once.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    #: Why the job failed: "input: ..." (retrying will not help) or "error: ...".
    error: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    #: Per-stage timings in seconds (load, analyze, encode), for operators and benchmarks.
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Structured findings: the analyzer's measurements, for the worklist and reports.
    findings: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    series: Mapped[Series] = relationship()
    results: Mapped[list[Result]] = relationship(back_populates="job")


class Result(Base):
    """A DICOM object to deliver: one pacs-ai produced (SEG, SR), or an original being forwarded.

    Forwarded originals (kind ``ORIGINAL``) belong to a job of the analyzer
    ``forward``, which routing opens finished, so they share the delivery
    machinery: retries, failures in ``jobs list``, ``retry`` and ``send``.
    """

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "SEG", "SR", "ORIGINAL"
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    #: Storage key of the object (``results/<study>/<sop>.dcm``; a forwarded original's instance key).
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: When retention deleted the file after every delivery succeeded (``retention_purge_results``).
    purged_at: Mapped[datetime | None] = mapped_column()

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # retries exhausted; replayable by an administrator


class Delivery(Base):
    """Sending one result to one destination, with its retry history."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_fk", "destination", name="uq_delivery_result_destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), default=DeliveryState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: DICOM status of the last attempt (e.g. 0x0000, 0xA700) or None if no response.
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column()

    result: Mapped[Result] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    """Who did what to which object; never carries patient names."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class WorkerState(enum.StrEnum):
    """Where a Celery worker node is in its life, as it last reported (``lost``: the scheduler's verdict)."""

    STARTING = "starting"  # registered, warming up; takes no task yet
    READY = "ready"  # consuming its queues
    STOPPED = "stopped"  # shut down cleanly; its running tasks finished or went back to the queue
    LOST = "lost"  # no heartbeat for worker_stale_after_seconds; its running jobs were handed back


class WorkerNode(Base):
    """A Celery worker node on any host, with the heartbeat it writes itself.

    Every host shares the index, so ``pacs-ai status`` on any of them sees every
    worker without reading another machine's files.  ``processes`` holds what each
    pool process last reported (pid -> models loaded), written after each task.
    """

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Celery node name, ``name@hostname``; a worker that starts again under the same name reuses the row.
    node: Mapped[str] = mapped_column(String(255), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    concurrency: Mapped[int] = mapped_column(Integer)
    #: ``{"type": "cuda"|"cpu", "name": ..., "memory_mb": ...}`` per device the worker's models run on.
    device: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: pid (as text) -> names of the models that pool process keeps loaded.
    processes: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=dict)
    state: Mapped[WorkerState] = mapped_column(
        Enum(WorkerState, native_enum=False, length=16), default=WorkerState.STARTING
    )
    version: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column()


class ReceivingSeries(Base):
    """A series an open association has stored into: written at its first instance, deleted at the end.

    The listener writes one row per series per association, before that
    series' first instance of the association is acknowledged, and deletes the
    association's rows when it ends (released or not).  A row whose listener
    process is gone (killed, power lost: nothing ran at the association's end)
    is found by :func:`pacs_ai.index.associations.interrupt_dead_associations`
    and its series is treated as one an aborted association cut short.  The
    process is named by host name, boot id, pid and start time, so neither a
    reused pid nor a reboot is mistaken for it.
    """

    __tablename__ = "receiving_series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    #: The listener process: host name, the kernel's boot id, pid and start time (seconds after boot).
    host: Mapped[str] = mapped_column(String(255))
    boot_id: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    process_started: Mapped[float] = mapped_column(Float)
    #: The association's number within that process.
    association: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
