"""The radiologist worklist: FastAPI with server-rendered pages and a JSON API over the same actions.

Pages: ``/login``, ``/`` (worklist), ``/studies/{uid}`` (draft, measurements,
key images, accept / edit / reject), ``/admin`` (users, AI drafts in use and the audit trail).
API under ``/api``: the same data as JSON, the same actions.

Roles: a *radiologist* reads and decides (accept, reject); an *admin* reads
and sees users and the audit trail, but signs nothing.  Every page or API
view of a study, every decision, every login (failed ones too) and every
refused request is written to the audit table.

Each request opens its own index transaction (``session_scope``): what an
action writes, including its audit event, commits together or not at all.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.background import BackgroundTask
from starlette.middleware.sessions import SessionMiddleware

from pacs_ai.config import Settings
from pacs_ai.encode.fhir_report import FhirDeliveryError, post_diagnostic_report
from pacs_ai.encode.report_sr import ReportText
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import AuditEvent, Study, utcnow
from pacs_ai.index.reports import ReportDraft, Role, User
from pacs_ai.report import records as report_drafts
from pacs_ai.report.draft import Draft, draft_impression
from pacs_ai.report.draft_stats import draft_stats
from pacs_ai.report.drafters import DrafterConfig
from pacs_ai.report.pipeline import ReportPipeline, report_jobs
from pacs_ai.storage.files import HostFiles
from pacs_ai.worklist.key_images import render_segment_image, render_series_image
from pacs_ai.worklist.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    Forbidden,
    NotAuthenticated,
    check_csrf,
    csrf_token,
    load_secret_key,
    require_role,
)
from pacs_ai.worklist.sessions import LoginThrottle, open_session, revoke_session, session_user, try_login
from pacs_ai.worklist.users import list_users
from pacs_ai.worklist.views import draft_view, study_view, worklist_rows

__all__ = ["WorklistOptions", "create_app"]

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
_SESSION_COOKIE = "pacs_ai_worklist"
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


class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class AcceptBody(BaseModel):
    draft_id: int
    #: Edited text; omitted means "as drafted".
    findings: str | None = None
    impression: str | None = None


class ImpressionBody(BaseModel):
    #: The findings text (as the radiologist has it now) to draft an impression from.
    findings: str = Field(min_length=1, max_length=20000)


class RejectBody(BaseModel):
    draft_id: int
    reason: str = Field(min_length=1, max_length=4000)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _from_trusted_proxy(request: Request, trusted: tuple[str, ...]) -> bool:
    """Whether the peer is one of the ``trusted`` proxy addresses or networks."""
    try:
        peer = ipaddress.ip_address(_client(request))
    except ValueError:
        return False
    return any(peer in ipaddress.ip_network(entry, strict=False) for entry in trusted)


def _login_client(request: Request, trusted: tuple[str, ...]) -> str:
    """The client a login is counted for: the address a trusted proxy forwarded for, else the peer."""
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and _from_trusted_proxy(request, trusted):
        return forwarded.split(",")[-1].strip()[:64] or _client(request)
    return _client(request)


def _came_over_https(request: Request, trusted: tuple[str, ...]) -> bool:
    """HTTPS to us, or to a trusted proxy that says so (X-Forwarded-Proto); other proxies are not believed."""
    if request.url.scheme == "https":
        return True
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return proto == "https" and _from_trusted_proxy(request, trusted)


def _secure_session_cookie(response: Response) -> None:
    """Add ``Secure`` to the session cookie the response sets, so the browser sends it over HTTPS only."""
    prefix = f"{_SESSION_COOKIE}=".encode()
    response.raw_headers[:] = [
        (name, value + b"; secure")
        if name == b"set-cookie" and value.startswith(prefix) and b"secure" not in value.lower()
        else (name, value)
        for name, value in response.raw_headers
    ]


#: The answer to a refused login, the same for a wrong password, an unknown user and a locked account.
LOGIN_REFUSED = "Wrong user name or password (after repeated failures an account is locked for a while)."


@dataclass(frozen=True)
class _SignIn:
    """What a login attempt came to: (user name, role) when logged in, else the HTTP status and message."""

    user: tuple[str, str] | None
    status_code: int = 200
    message: str = ""


def create_app(
    settings: Settings,
    options: WorklistOptions | None = None,
    *,
    sessions: sessionmaker[Session] | None = None,
) -> FastAPI:
    """The worklist application on the index of ``settings`` (the schema must be up to date)."""
    options = options or WorklistOptions()
    sessions = sessions or make_session_factory(make_engine(settings.effective_database_url))
    organization = options.organization or settings.institution_name or "pacs-ai"
    cache_dir = settings.data_dir / "worklist-cache"
    files = HostFiles(settings)  # key images read the series and SEGs from the storage
    templates = Jinja2Templates(directory=str(_PACKAGE_DIR / "templates"))

    app = FastAPI(title="pacs-ai worklist", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=options.secret_key or load_secret_key(settings.data_dir),
        session_cookie=_SESSION_COOKIE,
        max_age=options.session_max_age_seconds,
        same_site="strict",
        https_only=options.secure_cookies,
    )
    app.mount("/static", StaticFiles(directory=str(_PACKAGE_DIR / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if _came_over_https(request, options.trusted_proxies):
            _secure_session_cookie(response)
        return response

    # --- helpers ------------------------------------------------------------------------------

    def current_user(request: Request, db: Session) -> User:
        """The user of the request's open session (see :mod:`pacs_ai.worklist.sessions`)."""
        user = session_user(db, request.session.get("sid"))
        if user is None:
            request.session.pop("sid", None)
            raise NotAuthenticated()
        return user

    throttle = LoginThrottle(options.login_attempts_per_minute)

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
            user = current_user(request, db)
            revoke_session(db, request.session.get("sid"), "logout")
            record_audit(db, actor=user.username, action="auth.logout", object_type="user")
        request.session.clear()

    def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            template,
            {"csrf_field": CSRF_FIELD, "csrf_token": csrf_token(request), **context},
            status_code=status_code,
        )

    def study_or_404(db: Session, study_uid: str) -> Study:
        study = db.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            raise report_drafts.ReportNotFound(f"no study {study_uid}")
        return study

    def audit(db: Session, user: User | None, action: str, study_uid: str | None, **detail: Any) -> None:
        record_audit(
            db,
            actor=user.username if user else "anonymous",
            action=action,
            object_type="study" if study_uid else "worklist",
            object_uid=study_uid,
            detail=detail or None,
        )

    def publish_fhir(draft_id: int) -> None:
        """POST the final DiagnosticReport (after the response; failures are audited, not raised)."""
        if not options.fhir_endpoint:
            return
        with session_scope(sessions) as db:
            draft = db.get(ReportDraft, draft_id)
            assert draft is not None
            report = report_drafts.diagnostic_report_for(db, draft)
            study_uid = draft.study.study_instance_uid
        try:
            location = post_diagnostic_report(
                report,
                options.fhir_endpoint,
                timeout_seconds=options.fhir_timeout_seconds,
                bearer_token=options.fhir_bearer_token,
            )
            action, detail = "report.fhir_sent", {"draft": draft_id, "location": location}
        except FhirDeliveryError as exc:
            log.warning("%s", exc)
            action, detail = "report.fhir_failed", {"draft": draft_id, "error": str(exc)[:1000]}
        with session_scope(sessions) as db:
            record_audit(
                db, actor="worklist", action=action, object_type="study", object_uid=study_uid, detail=detail
            )

    # --- errors -------------------------------------------------------------------------------

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if _is_api(request):
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
                    "client": _client(request),
                },
            )
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return page(request, "error.html", status_code=403, title="Not allowed", message=str(exc), user=None)

    @app.exception_handler(report_drafts.ReportNotFound)
    async def not_found(request: Request, exc: report_drafts.ReportNotFound) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return page(request, "error.html", status_code=404, title="Not found", message=str(exc), user=None)

    @app.exception_handler(report_drafts.ReportConflict)
    async def conflict(request: Request, exc: report_drafts.ReportConflict) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return page(
            request, "error.html", status_code=409, title="Already decided", message=str(exc), user=None
        )

    # --- pages --------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "login.html", next=next, error=None, user=None)

    @app.post("/login")
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
            return page(
                request,
                "login.html",
                status_code=signed_in.status_code,
                next=next,
                error=signed_in.message,
                user=None,
            )
        safe_next = next if next.startswith("/") and not next.startswith("//") else "/"
        return RedirectResponse(safe_next, status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf_token_value: str = Form("", alias=CSRF_FIELD)) -> Response:
        check_csrf(request, csrf_token_value)
        sign_out(request)
        return RedirectResponse("/login", status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def worklist_page(request: Request) -> HTMLResponse:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            rows = worklist_rows(db, utcnow())
            audit(db, user, "worklist.view", None, studies=len(rows))
            return page(request, "worklist.html", user=user, rows=rows)

    @app.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str, done: str | None = None) -> HTMLResponse:
        return render_study(request, study_uid, done=done, audited=True)

    def render_study(
        request: Request,
        study_uid: str,
        *,
        status_code: int = 200,
        done: str | None = None,
        error: str | None = None,
        audited: bool = False,
        typed: tuple[int, str, str] | None = None,
        suggestion: Draft | None = None,
    ) -> HTMLResponse:
        """The study page; ``typed`` (draft id, findings, impression) keeps what the radiologist wrote.

        ``audited`` records the view (``report.view``): a page shown again after
        a form post is part of that action, already audited.
        """
        with session_scope(sessions) as db:
            user = current_user(request, db)
            view = study_view(db, study_or_404(db, study_uid), utcnow())
            draft = view["draft"]
            if audited:
                audit(db, user, "report.view", study_uid, draft=draft["id"] if draft else None)
            if typed is not None and draft is not None and draft["id"] == typed[0]:
                draft["findings"], draft["impression"] = typed[1], typed[2]
            return page(
                request,
                "study.html",
                status_code=status_code,
                user=user,
                view=view,
                done=done,
                can_sign=user.role == Role.RADIOLOGIST,
                error=error,
                suggestion=_impression_view(suggestion) if suggestion else None,
            )

    @app.post("/studies/{study_uid}/accept")
    def accept_form(
        request: Request,
        study_uid: str,
        draft_id: int = Form(...),
        findings: str = Form(...),
        impression: str = Form(...),
        csrf_token_value: str = Form("", alias=CSRF_FIELD),
    ) -> Response:
        check_csrf(request, csrf_token_value)
        try:
            text = ReportText(findings=findings, impression=impression)
        except ValueError as exc:
            return _study_error(request, study_uid, str(exc))
        draft_id = _accept(request, study_uid, draft_id, text)
        return RedirectResponse(
            f"/studies/{quote(study_uid)}?done=accepted",
            status_code=303,
            background=BackgroundTask(publish_fhir, draft_id),
        )

    @app.post("/studies/{study_uid}/reject")
    def reject_form(
        request: Request,
        study_uid: str,
        draft_id: int = Form(...),
        reason: str = Form(""),
        csrf_token_value: str = Form("", alias=CSRF_FIELD),
    ) -> Response:
        check_csrf(request, csrf_token_value)
        if not reason.strip():
            return _study_error(request, study_uid, "A rejection needs a reason.")
        _reject(request, study_uid, draft_id, reason)
        return RedirectResponse(f"/studies/{quote(study_uid)}?done=rejected", status_code=303)

    def _study_error(request: Request, study_uid: str, message: str) -> HTMLResponse:
        return render_study(request, study_uid, status_code=400, error=message)

    def _accept(request: Request, study_uid: str, draft_id: int, text: ReportText | None) -> int:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            require_role(user, Role.RADIOLOGIST)
            draft = _draft_of_study(db, study_uid, draft_id)
            text = text or ReportText(draft.findings_text, draft.impression_text)
            report_drafts.accept_draft(
                db, settings, draft_id=draft.id, user=user, text=text, organization=organization
            )
            return draft.id

    def _reject(request: Request, study_uid: str, draft_id: int, reason: str) -> None:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            require_role(user, Role.RADIOLOGIST)
            draft = _draft_of_study(db, study_uid, draft_id)
            report_drafts.reject_draft(db, draft_id=draft.id, user=user, reason=reason)

    def _draft_of_study(db: Session, study_uid: str, draft_id: int) -> ReportDraft:
        draft = db.get(ReportDraft, draft_id)
        if draft is None or draft.study.study_instance_uid != study_uid:
            raise report_drafts.ReportNotFound(f"study {study_uid} has no report draft {draft_id}")
        return draft

    # One per app: a local model (transformers) is loaded once, on the first impression asked for.
    impression_drafting = ReportPipeline(settings, sessions)

    def _suggest_impression(request: Request, study_uid: str, findings: str) -> Draft:
        """Draft an impression from ``findings`` with the study's drafter and guardrails; audited.

        The drafter is the one the study's profiles name (``report`` section),
        the template where none does; its output passes the same guardrails as
        a whole draft (read against the findings text) or is replaced by the
        template's impression, with the reason.  Nothing is stored: the
        radiologist decides what to sign.
        """
        with session_scope(sessions) as db:
            user = current_user(request, db)
            require_role(user, Role.RADIOLOGIST)
            study = study_or_404(db, study_uid)
            profiles = [job.profile for job in report_jobs(db, study.id)]
        config = impression_drafting.report_config(profiles) or DrafterConfig()
        suggestion = draft_impression(findings, config, drafter=impression_drafting.drafter_for(config))
        with session_scope(sessions) as db:
            audit(
                db,
                user,
                "report.impression_drafted",
                study_uid,
                backend=suggestion.backend,
                requested_backend=suggestion.requested_backend,
                guardrails_passed=suggestion.guardrails.passed,
                fallback_reason=suggestion.fallback_reason,
            )
        return suggestion

    def _impression_view(suggestion: Draft) -> dict[str, Any]:
        return {
            "impression": suggestion.impression,
            "backend": suggestion.backend,
            "model": suggestion.model_id,
            "requested_backend": suggestion.requested_backend,
            "guardrails_passed": suggestion.guardrails.passed,
            "fallback_reason": suggestion.fallback_reason,
            "unverified": True,
        }

    @app.post("/studies/{study_uid}/impression", response_class=HTMLResponse)
    def impression_form(
        request: Request,
        study_uid: str,
        draft_id: int = Form(...),
        findings: str = Form(...),
        impression: str = Form(""),
        csrf_token_value: str = Form("", alias=CSRF_FIELD),
    ) -> HTMLResponse:
        """The study page again, the findings as typed and the impression drafted from them."""
        check_csrf(request, csrf_token_value)
        if not findings.strip():
            return _study_error(
                request, study_uid, "Write findings first: the impression is drafted from them."
            )
        suggestion = _suggest_impression(request, study_uid, findings)
        return render_study(
            request, study_uid, typed=(draft_id, findings, suggestion.impression), suggestion=suggestion
        )

    @app.get("/images/seg/{result_id}/{segment_number}.png")
    def segment_image(request: Request, result_id: int, segment_number: int) -> Response:
        with session_scope(sessions) as db:
            current_user(request, db)
            try:
                data = render_segment_image(db, result_id, segment_number, cache_dir, files)
            except LookupError as exc:
                raise report_drafts.ReportNotFound(str(exc)) from exc
        return Response(data, media_type="image/png")

    @app.get("/images/series/{series_id}.png")
    def series_image(request: Request, series_id: int) -> Response:
        with session_scope(sessions) as db:
            current_user(request, db)
            try:
                data = render_series_image(db, series_id, cache_dir, files)
            except LookupError as exc:
                raise report_drafts.ReportNotFound(str(exc)) from exc
        return Response(data, media_type="image/png")

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request) -> HTMLResponse:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            require_role(user, Role.ADMIN)
            events = _recent_audit(db, 200)
            record_audit(db, actor=user.username, action="audit.view", object_type="audit")
            return page(
                request, "admin.html", user=user, users=list_users(db), events=events, drafts=draft_stats(db)
            )

    # --- JSON API -----------------------------------------------------------------------------

    @app.post("/api/login")
    def api_login(request: Request, body: LoginBody) -> Response:
        signed_in = sign_in(request, body.username, body.password, api=True)
        if signed_in.user is None:
            return JSONResponse({"detail": signed_in.message}, status_code=signed_in.status_code)
        username, role = signed_in.user
        return JSONResponse({"username": username, "role": role, "csrf_token": csrf_token(request)})

    @app.post("/api/logout")
    def api_logout(request: Request) -> dict[str, str]:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        sign_out(request)
        return {"status": "logged out"}

    @app.get("/api/session")
    def api_session(request: Request) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            return {"username": user.username, "role": user.role.value, "csrf_token": csrf_token(request)}

    @app.get("/api/worklist")
    def api_worklist(request: Request) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            rows = worklist_rows(db, utcnow())
            audit(db, user, "worklist.view", None, studies=len(rows), api=True)
            return {"studies": rows}

    @app.get("/api/studies/{study_uid}")
    def api_study(request: Request, study_uid: str) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            view = study_view(db, study_or_404(db, study_uid), utcnow())
            audit(
                db,
                user,
                "report.view",
                study_uid,
                draft=view["draft"]["id"] if view["draft"] else None,
                api=True,
            )
            return view

    @app.post("/api/studies/{study_uid}/accept")
    def api_accept(request: Request, study_uid: str, body: AcceptBody) -> Response:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        text: ReportText | None = None
        if body.findings is not None or body.impression is not None:
            with session_scope(sessions) as db:
                current_user(request, db)
                draft = _draft_of_study(db, study_uid, body.draft_id)
                findings = body.findings if body.findings is not None else draft.findings_text
                impression = body.impression if body.impression is not None else draft.impression_text
            try:
                text = ReportText(findings=findings, impression=impression)
            except ValueError as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
        draft_id = _accept(request, study_uid, body.draft_id, text)
        with session_scope(sessions) as db:
            decided = db.get(ReportDraft, draft_id)
            assert decided is not None
            payload = draft_view(decided)
        return JSONResponse(payload, background=BackgroundTask(publish_fhir, draft_id))

    @app.post("/api/studies/{study_uid}/impression")
    def api_impression(request: Request, study_uid: str, body: ImpressionBody) -> dict[str, Any]:
        """Findings to impression: a suggestion with its backend and guardrail outcome; nothing is stored."""
        check_csrf(request, request.headers.get(CSRF_HEADER))
        return _impression_view(_suggest_impression(request, study_uid, body.findings))

    @app.post("/api/studies/{study_uid}/reject")
    def api_reject(request: Request, study_uid: str, body: RejectBody) -> Response:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        if not body.reason.strip():
            return JSONResponse({"detail": "a rejection needs a reason"}, status_code=400)
        _reject(request, study_uid, body.draft_id, body.reason)
        with session_scope(sessions) as db:
            draft = db.get(ReportDraft, body.draft_id)
            assert draft is not None
            return JSONResponse(draft_view(draft))

    @app.get("/api/studies/{study_uid}/fhir")
    def api_fhir(request: Request, study_uid: str) -> Response:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            study = study_or_404(db, study_uid)
            draft = report_drafts.latest_draft(db, study)
            if draft is None:
                raise report_drafts.ReportNotFound(f"study {study_uid} has no report draft")
            report = report_drafts.diagnostic_report_for(db, draft)
            audit(db, user, "report.view", study_uid, draft=draft.id, fhir=True)
        return JSONResponse(report, media_type="application/fhir+json")

    @app.get("/api/audit")
    def api_audit(request: Request, limit: int = 200) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = current_user(request, db)
            require_role(user, Role.ADMIN)
            events = _recent_audit(db, max(1, min(limit, 5000)))
            record_audit(
                db, actor=user.username, action="audit.view", object_type="audit", detail={"api": True}
            )
            return {"events": events}

    return app


def _recent_audit(db: Session, limit: int) -> list[dict[str, Any]]:
    events = db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "actor": e.actor,
            "action": e.action,
            "object_type": e.object_type,
            "object_uid": e.object_uid,
            "detail": e.detail,
        }
        for e in events
    ]
