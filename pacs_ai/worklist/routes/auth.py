"""Logging in and out: the login page and form, and the JSON API's login, logout and session.

Every outcome is audited (``auth.login``, ``auth.login_failed``,
``auth.locked_out``, ``auth.throttled``, ``auth.logout``); a refused login says
the same for a wrong password, an unknown user and a locked account.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.worklist.context import WorklistContext, client_address, from_trusted_proxy
from pacs_ai.worklist.security import CSRF_FIELD, CSRF_HEADER, check_csrf, csrf_token
from pacs_ai.worklist.sessions import LoginThrottle, open_session, revoke_session, try_login

__all__ = ["LOGIN_REFUSED", "router"]

#: The answer to a refused login, the same for a wrong password, an unknown user and a locked account.
LOGIN_REFUSED = "Wrong user name or password (after repeated failures an account is locked for a while)."


class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


@dataclass(frozen=True)
class _SignIn:
    """What a login attempt came to: (user name, role) when logged in, else the HTTP status and message."""

    user: tuple[str, str] | None
    status_code: int = 200
    message: str = ""


def _login_client(request: Request, trusted: tuple[str, ...]) -> str:
    """The client a login is counted for: the address a trusted proxy forwarded for, else the peer."""
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and from_trusted_proxy(request, trusted):
        return forwarded.split(",")[-1].strip()[:64] or client_address(request)
    return client_address(request)


def router(ctx: WorklistContext) -> APIRouter:
    """The login and logout routes on ``ctx``'s index."""
    routes = APIRouter()
    options, sessions = ctx.options, ctx.sessions
    throttle = LoginThrottle(sessions, options.login_attempts_per_minute)  # shared by every process

    def sign_in(request: Request, username: str, password: str, **extra: Any) -> _SignIn:
        """Throttle, check (with lockout), open the session; every outcome is audited."""
        client = _login_client(request, options.trusted_proxies)
        detail = {"client": client, **extra}
        if not throttle.allow(client):
            with session_scope(sessions) as db:
                record_audit(
                    db, actor=username[:128], action="auth.throttled", object_type="user", detail=detail
                )
            return _SignIn(
                None, 429, "Too many login attempts from this address; wait a minute and try again."
            )
        with session_scope(sessions) as db:
            outcome = try_login(
                db,
                username,
                password,
                lockout_failures=options.lockout_failures,
                lockout_minutes=options.lockout_minutes,
            )
            if outcome.user is None:
                action = "auth.locked_out" if outcome.reason == "locked" else "auth.login_failed"
                record_audit(db, actor=username[:128], action=action, object_type="user", detail=detail)
                return _SignIn(None, 401, LOGIN_REFUSED)
            token = open_session(
                db, outcome.user, max_age_seconds=options.session_max_age_seconds, client=client
            )
            record_audit(
                db, actor=outcome.user.username, action="auth.login", object_type="user", detail=detail
            )
            signed_in = _SignIn((outcome.user.username, outcome.user.role.value))
        request.session.clear()
        request.session["sid"] = token
        csrf_token(request)  # a fresh token for the new login
        return signed_in

    def sign_out(request: Request) -> None:
        """Revoke the request's session (audited) and clear the cookie."""
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            revoke_session(db, request.session.get("sid"), "logout")
            record_audit(db, actor=user.username, action="auth.logout", object_type="user")
        request.session.clear()

    @routes.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return ctx.page(request, "login.html", next=next, error=None, user=None)

    @routes.post("/login")
    def login(
        request: Request,
        username: str = Form(...),
        password: str = Form(...),
        csrf_token_value: str = Form("", alias=CSRF_FIELD),
        next: str = Form("/"),
    ) -> Response:
        check_csrf(request, csrf_token_value)
        signed_in = sign_in(request, username, password)
        if signed_in.user is None:
            return ctx.page(
                request,
                "login.html",
                status_code=signed_in.status_code,
                next=next,
                error=signed_in.message,
                user=None,
            )
        safe_next = next if next.startswith("/") and not next.startswith("//") else "/"
        return RedirectResponse(safe_next, status_code=303)

    @routes.post("/logout")
    def logout(request: Request, csrf_token_value: str = Form("", alias=CSRF_FIELD)) -> Response:
        check_csrf(request, csrf_token_value)
        sign_out(request)
        return RedirectResponse("/login", status_code=303)

    @routes.post("/api/login")
    def api_login(request: Request, body: LoginBody) -> Response:
        signed_in = sign_in(request, body.username, body.password, api=True)
        if signed_in.user is None:
            return JSONResponse({"detail": signed_in.message}, status_code=signed_in.status_code)
        username, role = signed_in.user
        return JSONResponse({"username": username, "role": role, "csrf_token": csrf_token(request)})

    @routes.post("/api/logout")
    def api_logout(request: Request) -> dict[str, str]:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        sign_out(request)
        return {"status": "logged out"}

    @routes.get("/api/session")
    def api_session(request: Request) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            return {"username": user.username, "role": user.role.value, "csrf_token": csrf_token(request)}

    return routes
