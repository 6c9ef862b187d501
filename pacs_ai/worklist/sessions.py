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
  attempts per client address (any user name), answered 429 beyond;
* lockout: ``worklist_lockout_failures`` failed logins of one user name in a
  row lock it for ``worklist_lockout_minutes`` (its password is not even tried
  meanwhile); a successful login resets the count.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_ai.index.models import utcnow
from pacs_ai.index.reports import User, WorklistSession
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
    known.failed_logins = (known.failed_logins or 0) + 1
    if known.failed_logins >= lockout_failures:
        known.locked_until = now + timedelta(minutes=lockout_minutes)
        known.failed_logins = 0
        return LoginOutcome(None, "locked", known.locked_until)
    return LoginOutcome(None, "wrong")


class LoginThrottle:
    """At most ``per_minute`` login attempts per client address in any 60 s (in this process)."""

    WINDOW_SECONDS = 60.0
    #: Addresses remembered at most, the oldest forgotten first: a flood of addresses has bounded cost.
    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._attempts: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        """Count an attempt of ``client``; False when it is over the limit (the attempt is not made)."""
        now = time.monotonic()
        with self._lock:
            attempts = self._attempts.pop(client, None) or deque()
            while attempts and now - attempts[0] >= self.WINDOW_SECONDS:
                attempts.popleft()
            allowed = len(attempts) < self.per_minute
            if allowed:
                attempts.append(now)
            self._attempts[client] = attempts  # re-inserted: most recent last
            while len(self._attempts) > self.MAX_CLIENTS:
                del self._attempts[next(iter(self._attempts))]
            return allowed
