"""Server-side worklist sessions, login throttling and lockout.

The session cookie (signed by ``itsdangerous`` through Starlette's session
middleware) carries a random token; the index keeps a
:class:`~pacs_ai.index.reports.WorklistSession` per login with the token's
SHA-256, never the token.  A request is logged in only while its session row
is neither expired nor revoked and its user is active, so logging out, or an
administrator disabling the user (``pacs-ai users disable``), ends the session
at once, also for a copy of the cookie kept elsewhere.

Two limits on guessing passwords, both settings:

* :class:`LoginThrottle`: at most ``worklist_login_attempts_per_minute``
  attempts per client address (any user name) in a minute, counted in the
  index so that every web process shares the count, answered 429 beyond;
* lockout: ``worklist_lockout_failures`` failed logins of one user name in a
  row lock it for ``worklist_lockout_minutes`` (its password is not even tried
  meanwhile); a successful login resets the count.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import ReturningInsert

from pacs_ai.index.db import session_scope
from pacs_ai.index.models import utcnow
from pacs_ai.index.reports import LoginAttempts, User, WorklistSession
from pacs_ai.worklist.users import authenticate

__all__ = [
    "LoginOutcome",
    "LoginThrottle",
    "open_session",
    "revoke_session",
    "session_user",
    "try_login",
]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def open_session(db: Session, user: User, *, max_age_seconds: float, client: str | None) -> str:
    """Record a new session of ``user`` and return its token (for the signed cookie only)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    db.add(
        WorklistSession(
            token_hash=_hash(token),
            user_fk=user.id,
            created_at=now,
            expires_at=now + timedelta(seconds=max_age_seconds),
            client=(client or "")[:64] or None,
        )
    )
    db.flush()
    return token


def session_user(db: Session, token: object) -> User | None:
    """The active user of an open session with this token; None if unknown, expired or revoked."""
    if not isinstance(token, str) or not token:
        return None
    record = db.scalar(select(WorklistSession).where(WorklistSession.token_hash == _hash(token)))
    if record is None or record.revoked_at is not None or record.expires_at <= utcnow():
        return None
    user = db.get(User, record.user_fk)
    return user if user is not None and user.active else None


def revoke_session(db: Session, token: object, reason: str) -> bool:
    """Revoke the session with this token; whether an open one was revoked."""
    if not isinstance(token, str) or not token:
        return False
    result = db.execute(
        update(WorklistSession)
        .where(WorklistSession.token_hash == _hash(token), WorklistSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_reason=reason[:64])
    )
    return bool(getattr(result, "rowcount", 0))


@dataclass(frozen=True)
class LoginOutcome:
    """What a login attempt came to: the user, or why not ("wrong" or "locked")."""

    user: User | None
    reason: str | None = None
    locked_until: datetime | None = None


def try_login(
    db: Session, username: str, password: str, *, lockout_failures: int, lockout_minutes: float
) -> LoginOutcome:
    """Check the credentials with the lockout rule (see the module docstring); records the failure count."""
    known = db.scalar(select(User).where(User.username == username))
    now = utcnow()
    if known is not None and known.locked_until is not None and known.locked_until > now:
        return LoginOutcome(None, "locked", known.locked_until)
    user = authenticate(db, username, password)
    if user is not None:
        user.failed_logins = 0
        user.locked_until = None
        return LoginOutcome(user)
    if known is None:
        return LoginOutcome(None, "wrong")
    # Counted in one statement: failures arriving at once at several web processes are all counted.
    failures = db.execute(
        update(User)
        .where(User.id == known.id)
        .values(failed_logins=User.failed_logins + 1)
        .returning(User.failed_logins)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    if failures >= lockout_failures:
        locked_until = now + timedelta(minutes=lockout_minutes)
        db.execute(
            update(User)
            .where(User.id == known.id)
            .values(locked_until=locked_until, failed_logins=0)
            .execution_options(synchronize_session=False)
        )
        return LoginOutcome(None, "locked", locked_until)
    return LoginOutcome(None, "wrong")


class LoginThrottle:
    """At most ``per_minute`` login attempts per client address in each minute, counted in the index.

    Every web process of the worklist (``pacs-ai serve`` may run several, on
    several hosts) counts in the same ``login_attempts`` row of an address,
    so the limit holds for the site, not per process.  One atomic
    ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per attempt counts it
    and starts a new window once the last one is a minute old (a fixed
    window: at most twice the limit across a window boundary).  Refused
    attempts are counted too, so an address that keeps trying stays refused.
    Rows of addresses silent for two windows are deleted as attempts come,
    so a flood of addresses leaves a bounded table.
    """

    WINDOW_SECONDS = 60.0

    def __init__(self, sessions: sessionmaker[Session], per_minute: int) -> None:
        self.sessions = sessions
        self.per_minute = per_minute

    def allow(self, client: str) -> bool:
        """Count an attempt of ``client``; False when it is over the limit (the attempt is not made)."""
        now = utcnow()
        window = timedelta(seconds=self.WINDOW_SECONDS)
        with session_scope(self.sessions) as db:
            attempts = db.execute(_count_attempt(db.get_bind().dialect.name, client[:64], now, window))
            count = int(attempts.scalar_one())
            db.execute(delete(LoginAttempts).where(LoginAttempts.window_start < now - 2 * window))
        return count <= self.per_minute


def _count_attempt(dialect: str, client: str, now: datetime, window: timedelta) -> ReturningInsert[int]:
    """Add one attempt to ``client``'s window (a new window when its last one is over); returns the count."""
    module = postgresql if dialect == "postgresql" else sqlite
    table = LoginAttempts.__table__
    statement = module.insert(LoginAttempts).values(client=client, window_start=now, attempts=1)
    window_over = table.c.window_start <= now - window
    return statement.on_conflict_do_update(
        index_elements=[table.c.client],
        set_={
            "attempts": case((window_over, 1), else_=table.c.attempts + 1),
            "window_start": case(
                (window_over, literal(now, table.c.window_start.type)), else_=table.c.window_start
            ),
        },
    ).returning(table.c.attempts)
