"""The radiologist worklist: FastAPI with server-rendered pages and a JSON API over the same actions.

Pages: ``/login``, ``/`` (worklist), ``/studies/{uid}`` (draft, measurements,
key images, accept / edit / reject), ``/admin`` (the admin console: service
status, studies with routing decisions, jobs and deliveries with retry,
cancel and reprocess, per-study timelines, the rules tester, users, AI drafts
in use and the audit trail).  API under ``/api``: the same data as JSON, the
same actions.

Roles: a *radiologist* reads and decides (accept, reject); an *admin* reads,
runs the admin console and sees users and the audit trail, but signs nothing.
Every page or API view of a study, every decision, every admin action, every
login (failed ones too) and every refused request is written to the audit
table.

Each request opens its own index transaction (``session_scope``): what an
action writes, including its audit event, commits together or not at all.

The routes live in :mod:`pacs_ai.worklist.routes`, one router per area, each
built from the one :class:`~pacs_ai.worklist.context.WorklistContext`
(settings, options, index sessions) :func:`create_app` makes.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from pacs_ai.config import Settings
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.report import records as report_drafts
from pacs_ai.worklist.context import (
    PACKAGE_DIR,
    SESSION_COOKIE,
    WorklistContext,
    WorklistOptions,
    client_address,
    from_trusted_proxy,
    is_api,
)
from pacs_ai.worklist.routes import admin, auth, reports, worklist
from pacs_ai.worklist.routes.auth import LOGIN_REFUSED
from pacs_ai.worklist.security import Forbidden, NotAuthenticated, load_secret_key
from pacs_ai.worklist.sessions import session_user

__all__ = ["LOGIN_REFUSED", "WorklistOptions", "create_app"]

log = logging.getLogger(__name__)

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'none'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _came_over_https(request: Request, trusted: tuple[str, ...]) -> bool:
    """HTTPS to us, or to a trusted proxy that says so (X-Forwarded-Proto); other proxies are not believed."""
    if request.url.scheme == "https":
        return True
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return proto == "https" and from_trusted_proxy(request, trusted)


def _secure_session_cookie(response: Response) -> None:
    """Add ``Secure`` to the session cookie the response sets, so the browser sends it over HTTPS only."""
    prefix = f"{SESSION_COOKIE}=".encode()
    response.raw_headers[:] = [
        (name, value + b"; secure")
        if name == b"set-cookie" and value.startswith(prefix) and b"secure" not in value.lower()
        else (name, value)
        for name, value in response.raw_headers
    ]


def create_app(
    settings: Settings,
    options: WorklistOptions | None = None,
    *,
    sessions: sessionmaker[Session] | None = None,
) -> FastAPI:
    """The worklist application on the index of ``settings`` (the schema must be up to date)."""
    options = options or WorklistOptions()
    sessions = sessions or make_session_factory(make_engine(settings.effective_database_url))
    ctx = WorklistContext(settings, options, sessions)

    app = FastAPI(title="pacs-ai worklist", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=options.secret_key or load_secret_key(settings.data_dir),
        session_cookie=SESSION_COOKIE,
        max_age=options.session_max_age_seconds,
        same_site="strict",
        https_only=options.secure_cookies,
    )
    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if _came_over_https(request, options.trusted_proxies):
            _secure_session_cookie(response)
        return response

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if is_api(request):
            return JSONResponse({"detail": "not logged in"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        with session_scope(sessions) as db:
            user = session_user(db, request.session.get("sid"))
            record_audit(
                db,
                actor=user.username if user else "anonymous",
                action="access.denied",
                object_type="request",
                detail={
                    "method": request.method,
                    "path": request.url.path,
                    "reason": str(exc),
                    "client": client_address(request),
                },
            )
        if is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return ctx.page(
            request, "error.html", status_code=403, title="Not allowed", message=str(exc), user=None
        )

    @app.exception_handler(report_drafts.ReportNotFound)
    async def not_found(request: Request, exc: report_drafts.ReportNotFound) -> Response:
        if is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return ctx.page(
            request, "error.html", status_code=404, title="Not found", message=str(exc), user=None
        )

    @app.exception_handler(report_drafts.ReportConflict)
    async def conflict(request: Request, exc: report_drafts.ReportConflict) -> Response:
        if is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return ctx.page(
            request, "error.html", status_code=409, title="Already decided", message=str(exc), user=None
        )

    for build in (auth.router, worklist.router, reports.router, admin.router):
        app.include_router(build(ctx))
    return app
