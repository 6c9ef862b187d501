"""Index tables of the reporting workflow: worklist users, report drafts and the site's signed reports.

A :class:`ReportDraft` is one AI-written report of one study and what became
of it: drafted (``draft``), signed by a radiologist (``accepted``), turned
down with a reason (``rejected``), or replaced by a newer draft of the same
study before anyone decided (``superseded``).  The text the drafter wrote is
kept unchanged next to the text that was signed, so an audit can show what
the radiologist changed.

A :class:`SignedReport` is one report a radiologist signed, as findings and
impression text: every draft signed in the worklist (copied by
:func:`pacs_ai.report.signed_reports.index_signed_drafts`) and past reports
loaded with ``pacs-ai reports import``.  The retrieval drafter suggests
impressions from them (:mod:`pacs_ai.report.drafters.retrieval`).

The tables share :class:`~pacs_ai.index.models.Base` with the rest of the
index, so Alembic (``migrations/env.py`` imports this module) sees them.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pacs_ai.index.models import Base, Job, Study, utcnow

__all__ = ["ReportDraft", "ReportStatus", "Role", "SignedReport", "User", "WorklistSession"]


class Role(enum.StrEnum):
    """What a worklist user may do."""

    #: Reads studies and drafts, accepts (signs) or rejects them.
    RADIOLOGIST = "radiologist"
    #: Administers the installation: users and the audit trail; does not sign reports.
    ADMIN = "admin"


class User(Base):
    """A person who logs in to the worklist."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    #: DICOM person name ("Family^Given") written into signed reports.
    display_name: Mapped[str] = mapped_column(String(324))
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    #: argon2id hash in PHC string format (never the password).
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column()
    #: Failed logins in a row since the last success or lockout (``worklist_lockout_failures``).
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    #: No login is tried before this time (set after too many failures); None: not locked.
    locked_until: Mapped[datetime | None] = mapped_column()


class LoginAttempts(Base):
    """Worklist login attempts of one client address in its current minute, shared by every web process.

    One row per address (see :class:`pacs_ai.worklist.sessions.LoginThrottle`);
    rows of addresses silent for a while are deleted by the throttle itself.
    """

    __tablename__ = "login_attempts"

    #: The client address (after trusted proxies), as the audit records it.
    client: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Start of the current one-minute window of this address.
    window_start: Mapped[datetime] = mapped_column()
    #: Attempts in that window, refused ones included.
    attempts: Mapped[int] = mapped_column(Integer)


class WorklistSession(Base):
    """One worklist login (see :mod:`pacs_ai.worklist.sessions`); ended by logout, expiry or disabling."""

    __tablename__ = "worklist_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: SHA-256 (hex) of the random token in the signed cookie; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    #: Why it ended early: "logout", "user disabled", ...
    revoked_reason: Mapped[str | None] = mapped_column(String(64))
    #: Client address at login.
    client: Mapped[str | None] = mapped_column(String(64))


class ReportStatus(enum.StrEnum):
    DRAFT = "draft"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"


class ReportDraft(Base):
    """One AI report draft of a study, and the radiologist's decision on it."""

    __tablename__ = "report_drafts"
    __table_args__ = (UniqueConstraint("study_fk", "version", name="uq_report_draft_study_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    #: The job whose results the SR files are recorded with (and delivered like).
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    #: Every job whose findings the draft was written from.
    job_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    #: 1 for a study's first draft; a re-drafted study gets the next number.
    version: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[ReportStatus] = mapped_column(
        Enum(ReportStatus, native_enum=False, length=16), default=ReportStatus.DRAFT, index=True
    )

    # What the drafter wrote, never changed afterwards.
    findings_text: Mapped[str] = mapped_column(Text)
    impression_text: Mapped[str] = mapped_column(Text)
    backend: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    #: The guardrail checks' outcome (e.g. {"passed": true, "checks": [...]}).
    guardrail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Why a fallback backend wrote the text instead of the configured one; None if it did not.
    fallback_reason: Mapped[str | None] = mapped_column(Text)
    draft_sr_uid: Mapped[str | None] = mapped_column(String(64), unique=True)

    # The decision.
    signed_findings_text: Mapped[str | None] = mapped_column(Text)
    signed_impression_text: Mapped[str | None] = mapped_column(Text)
    #: True when the signed text differs from the draft.
    edited: Mapped[bool] = mapped_column(Boolean, default=False)
    signed_sr_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    reject_reason: Mapped[str | None] = mapped_column(Text)
    decided_by_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[datetime | None] = mapped_column()

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship()
    job: Mapped[Job] = relationship()
    decided_by: Mapped[User | None] = relationship()


class SignedReport(Base):
    """A signed report's findings and impression, for impression suggestions from similar findings."""

    __tablename__ = "signed_reports"
    __table_args__ = (UniqueConstraint("source", "external_id", name="uq_signed_report_source_external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: "worklist" (signed here) or "import" (``pacs-ai reports import``).
    source: Mapped[str] = mapped_column(String(16))
    #: The imported report's own identifier, or "draft:<id>" for worklist reports; repeats are skipped.
    external_id: Mapped[str] = mapped_column(String(128))
    report_draft_fk: Mapped[int | None] = mapped_column(ForeignKey("report_drafts.id"), unique=True)
    findings_text: Mapped[str] = mapped_column(Text)
    impression_text: Mapped[str] = mapped_column(Text)
    #: DICOM Modality of the study where known ("CR", "CT"), to prefer reports of the same kind.
    modality: Mapped[str | None] = mapped_column(String(16))
    signed_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
