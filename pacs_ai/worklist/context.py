"""What every router of the worklist shares, passed to each explicitly: settings, index sessions, templates.

:func:`pacs_ai.worklist.app.create_app` builds one :class:`WorklistContext`
and hands it to each router factory (``pacs_ai.worklist.routes.*.router``), so
a router sees exactly the settings and index it was given (tests pass their
own), and no route reaches for a global.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.audit import record_audit
from pacs_ai.index.models import Study
from pacs_ai.index.reports import User
from pacs_ai.ops.status import counts_in_words
from pacs_ai.report import records as report_drafts
from pacs_ai.storage.files import HostFiles
from pacs_ai.worklist.security import CSRF_FIELD, NotAuthenticated, csrf_token
from pacs_ai.worklist.sessions import session_user

__all__ = ["SESSION_COOKIE", "WorklistContext", "WorklistOptions", "client_address", "is_api"]

PACKAGE_DIR = Path(__file__).resolve().parent
SESSION_COOKIE = "pacs_ai_worklist"


@dataclass(frozen=True)
class WorklistOptions:
    """How the worklist runs, beyond the installation :class:`~pacs_ai.config.Settings`."""

    #: Session signing key; None keeps a generated one in the data directory.
    secret_key: str | None = None
    #: A login lasts this long (seconds).
    session_max_age_seconds: int = 8 * 3600
    #: Send the session cookie over HTTPS only, always; without it, only to clients that came over HTTPS
    #: (directly, or through a ``trusted_proxies`` proxy that says so in X-Forwarded-Proto).
    secure_cookies: bool = False
    #: Addresses or networks of TLS proxies whose X-Forwarded-Proto and X-Forwarded-For are believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Failed logins of one user name in a row that lock it, and for how long.
    lockout_failures: int = 5
    lockout_minutes: float = 15.0
    #: Login attempts one client address may make per minute; more are answered 429.
    login_attempts_per_minute: int = 10
    #: Verifying Organization of signed reports; None: the institution name, else "pacs-ai".
    organization: str | None = None
    #: FHIR R4 base URL that signed reports are POSTed to; None sends none.
    fhir_endpoint: str | None = None
    fhir_bearer_token: str | None = None
    fhir_timeout_seconds: float = 10.0


def format_when(value: datetime | str | None) -> str:
    """``2026-12-07 06:31:15 UTC`` (to the second) for a page; ``""`` for none."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def format_seconds(value: float | None) -> str:
    """A duration in words: ``0.4 s``, ``12 s``, ``3 min 5 s``, ``2 h 10 min``; ``""`` for none."""
    if value is None:
        return ""
    if value < 10:
        return f"{value:.1f} s"
    if value < 60:
        return f"{value:.0f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def is_api(request: Request) -> bool:
    """Whether the request is for the JSON API (errors as JSON) rather than a page."""
    return request.url.path.startswith("/api/")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def from_trusted_proxy(request: Request, trusted: tuple[str, ...]) -> bool:
    """Whether the peer is one of the ``trusted`` proxy addresses or networks."""
    try:
        peer = ipaddress.ip_address(client_address(request))
    except ValueError:
        return False
    return any(peer in ipaddress.ip_network(entry, strict=False) for entry in trusted)


@dataclass
class WorklistContext:
    """The dependencies of every route: settings, options, index sessions, templates, storage."""

    settings: Settings
    options: WorklistOptions
    sessions: sessionmaker[Session]
    templates: Jinja2Templates = field(init=False)
    #: Key images read the series and SEGs from the storage.
    files: HostFiles = field(init=False)
    cache_dir: Path = field(init=False)
    organization: str = field(init=False)

    def __post_init__(self) -> None:
        self.templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))
        self.templates.env.filters.update(when=format_when, seconds=format_seconds, words=counts_in_words)
        self.files = HostFiles(self.settings)
        self.cache_dir = self.settings.data_dir / "worklist-cache"
        self.organization = self.options.organization or self.settings.institution_name or "pacs-ai"

    def current_user(self, request: Request, db: Session) -> User:
        """The user of the request's open session (see :mod:`pacs_ai.worklist.sessions`)."""
        user = session_user(db, request.session.get("sid"))
        if user is None:
            request.session.pop("sid", None)
            raise NotAuthenticated()
        return user

    def page(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        """A server-rendered page (Jinja autoescapes every value) with the session's CSRF token."""
        return self.templates.TemplateResponse(
            request,
            template,
            {"csrf_field": CSRF_FIELD, "csrf_token": csrf_token(request), **context},
            status_code=status_code,
        )

    @staticmethod
    def study_or_404(db: Session, study_uid: str) -> Study:
        study = db.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            raise report_drafts.ReportNotFound(f"no study {study_uid}")
        return study

    @staticmethod
    def audit(db: Session, user: User | None, action: str, study_uid: str | None, **detail: Any) -> None:
        record_audit(
            db,
            actor=user.username if user else "anonymous",
            action=action,
            object_type="study" if study_uid else "worklist",
            object_uid=study_uid,
            detail=detail or None,
        )
