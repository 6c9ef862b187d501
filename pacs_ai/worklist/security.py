"""Sessions, CSRF tokens and role checks of the worklist.

Sessions are Starlette's signed cookies (``itsdangerous``): the cookie holds
the user id, the CSRF token and the login time, signed with a secret key that
is either configured or generated once into the data directory (mode 0600).
Every request reloads the user, so disabling a user or changing their role
takes effect at once, without a server-side session store.

CSRF: every state-changing request must carry the session's token, as the
``csrf_token`` form field (HTML forms) or the ``X-CSRF-Token`` header (JSON
API); the cookie is also ``SameSite=Strict``.  The one exception is the JSON
login, which has no session yet and cannot be sent cross-site without a CORS
preflight (``application/json``), which this app never grants.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from starlette.requests import Request

from pacs_ai.index.reports import Role, User
from pacs_ai.keyfile import load_or_create_key

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "Forbidden",
    "NotAuthenticated",
    "check_csrf",
    "csrf_token",
    "load_secret_key",
    "require_role",
]

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_SECRET_FILE = "worklist-session.key"


class NotAuthenticated(Exception):
    """No (valid) session: HTML requests are sent to the login page, API requests get 401."""


class Forbidden(Exception):
    """Logged in, but not allowed: 403."""


def load_secret_key(data_dir: Path) -> str:
    """The session signing key kept in ``data_dir``; created (random, 0600) on first use."""
    return load_or_create_key(data_dir / _SECRET_FILE)


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return str(token)


def check_csrf(request: Request, submitted: str | None) -> None:
    """Raise :class:`Forbidden` unless ``submitted`` is this session's CSRF token."""
    expected = request.session.get("csrf")
    if not expected or not submitted or not secrets.compare_digest(str(expected), str(submitted)):
        raise Forbidden("missing or wrong CSRF token; reload the page and try again")


def require_role(user: User, *roles: Role) -> None:
    if user.role not in roles:
        raise Forbidden(
            f"this needs the role {' or '.join(r.value for r in roles)}; you are {user.role.value}"
        )
