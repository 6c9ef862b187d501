"""Worklist users: argon2id password hashes, roles, enabling and disabling accounts.

Passwords are hashed with argon2id (``argon2-cffi``'s defaults, RFC 9106's
low-memory profile); the hash string carries its parameters, so raising them
later re-hashes each user's password at their next login.  A login for an
unknown user still runs one hash verification, so response time does not tell
which user names exist.
"""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_ai.index.models import utcnow
from pacs_ai.index.reports import Role, User, WorklistSession

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "UserError",
    "add_user",
    "authenticate",
    "hash_password",
    "list_users",
    "revoke_user_sessions",
    "set_active",
    "verify_password",
]

MIN_PASSWORD_LENGTH = 10
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_hasher = PasswordHasher()
#: Verified against when the user does not exist, to spend the same time as a real check.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class UserError(ValueError):
    """A user cannot be created or changed as asked (the message says why)."""


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (PHC string), after checking its length."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; False for a malformed hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def add_user(
    session: Session, username: str, password: str, role: Role | str, display_name: str | None = None
) -> User:
    """Create an active user; ``display_name`` (DICOM "Family^Given") defaults to the user name."""
    if not _USERNAME.match(username):
        raise UserError(
            f"user name {username!r} must be 1-64 letters, digits or . _ @ - and start with a letter or digit"
        )
    try:
        role = Role(role)
    except ValueError as exc:
        raise UserError(f"role {role!r} is not one of {[r.value for r in Role]}") from exc
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    name = (display_name or username).strip()
    if not name or len(name) > 320 or "\\" in name:
        raise UserError("display name must be 1-320 characters without backslash (a DICOM person name)")
    user = User(
        username=username, display_name=name, role=role, password_hash=hash_password(password), active=True
    )
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with these credentials, or None; records the login time and upgrades old hashes."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        verify_password(_DUMMY_HASH, password)
        return None
    if not verify_password(user.password_hash, password) or not user.active:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = utcnow()
    return user


def set_active(session: Session, username: str, active: bool) -> User:
    """Enable or disable a user; disabling revokes the user's open worklist sessions at once."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise UserError(f"no user {username!r}")
    user.active = active
    if not active:
        revoke_user_sessions(session, user, "user disabled")
    return user


def revoke_user_sessions(session: Session, user: User, reason: str) -> int:
    """Revoke every open worklist session of ``user``; how many were open."""
    result = session.execute(
        update(WorklistSession)
        .where(WorklistSession.user_fk == user.id, WorklistSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_reason=reason[:64])
    )
    return int(getattr(result, "rowcount", 0) or 0)


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))
