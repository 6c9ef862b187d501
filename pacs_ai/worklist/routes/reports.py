"""The study page and the radiologist's decisions: accept (as drafted or edited), reject, draft an impression.

Forms post back to the study page; the JSON API (``/api/studies/{uid}/...``)
takes the same actions.  Only a radiologist signs or rejects; a signed report
is POSTed as a FHIR DiagnosticReport after the response when an endpoint is
configured (failures audited, not raised).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from pacs_ai.encode.fhir_report import FhirDeliveryError, post_diagnostic_report
from pacs_ai.encode.report_sr import ReportText
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import utcnow
from pacs_ai.index.reports import ReportDraft, Role
from pacs_ai.report import records as report_drafts
from pacs_ai.report.draft import Draft, draft_impression
from pacs_ai.report.drafters import DrafterConfig
from pacs_ai.report.pipeline import ReportPipeline, report_jobs
from pacs_ai.worklist.context import WorklistContext
from pacs_ai.worklist.security import CSRF_FIELD, CSRF_HEADER, check_csrf, require_role
from pacs_ai.worklist.views import draft_view, study_view

__all__ = ["render_study", "router"]

log = logging.getLogger(__name__)


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


def render_study(
    ctx: WorklistContext,
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
    with session_scope(ctx.sessions) as db:
        user = ctx.current_user(request, db)
        view = study_view(db, ctx.study_or_404(db, study_uid), utcnow())
        draft = view["draft"]
        if audited:
            ctx.audit(db, user, "report.view", study_uid, draft=draft["id"] if draft else None)
        if typed is not None and draft is not None and draft["id"] == typed[0]:
            draft["findings"], draft["impression"] = typed[1], typed[2]
        return ctx.page(
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


def _draft_of_study(db: Session, study_uid: str, draft_id: int) -> ReportDraft:
    draft = db.get(ReportDraft, draft_id)
    if draft is None or draft.study.study_instance_uid != study_uid:
        raise report_drafts.ReportNotFound(f"study {study_uid} has no report draft {draft_id}")
    return draft


def router(ctx: WorklistContext) -> APIRouter:
    """The study page and report decision routes on ``ctx``'s index."""
    routes = APIRouter()
    settings, options, sessions = ctx.settings, ctx.options, ctx.sessions
    # One per app: a local model (transformers) is loaded once, on the first impression asked for.
    impression_drafting = ReportPipeline(settings, sessions)

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

    def study_error(request: Request, study_uid: str, message: str) -> HTMLResponse:
        return render_study(ctx, request, study_uid, status_code=400, error=message)

    def accept(request: Request, study_uid: str, draft_id: int, text: ReportText | None) -> int:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            require_role(user, Role.RADIOLOGIST)
            draft = _draft_of_study(db, study_uid, draft_id)
            text = text or ReportText(draft.findings_text, draft.impression_text)
            report_drafts.accept_draft(
                db, settings, draft_id=draft.id, user=user, text=text, organization=ctx.organization
            )
            return draft.id

    def reject(request: Request, study_uid: str, draft_id: int, reason: str) -> None:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            require_role(user, Role.RADIOLOGIST)
            draft = _draft_of_study(db, study_uid, draft_id)
            report_drafts.reject_draft(db, draft_id=draft.id, user=user, reason=reason)

    def suggest_impression(request: Request, study_uid: str, findings: str) -> Draft:
        """Draft an impression from ``findings`` with the study's drafter and guardrails; audited.

        The drafter is the one the study's profiles name (``report`` section),
        the template where none does; its output passes the same guardrails as
        a whole draft (read against the findings text) or is replaced by the
        template's impression, with the reason.  Nothing is stored: the
        radiologist decides what to sign.
        """
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            require_role(user, Role.RADIOLOGIST)
            study = ctx.study_or_404(db, study_uid)
            profiles = [job.profile for job in report_jobs(db, study.id)]
        config = impression_drafting.report_config(profiles) or DrafterConfig()
        suggestion = draft_impression(findings, config, drafter=impression_drafting.drafter_for(config))
        with session_scope(sessions) as db:
            ctx.audit(
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

    @routes.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str, done: str | None = None) -> HTMLResponse:
        return render_study(ctx, request, study_uid, done=done, audited=True)

    @routes.post("/studies/{study_uid}/accept")
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
            return study_error(request, study_uid, str(exc))
        draft_id = accept(request, study_uid, draft_id, text)
        return RedirectResponse(
            f"/studies/{quote(study_uid)}?done=accepted",
            status_code=303,
            background=BackgroundTask(publish_fhir, draft_id),
        )

    @routes.post("/studies/{study_uid}/reject")
    def reject_form(
        request: Request,
        study_uid: str,
        draft_id: int = Form(...),
        reason: str = Form(""),
        csrf_token_value: str = Form("", alias=CSRF_FIELD),
    ) -> Response:
        check_csrf(request, csrf_token_value)
        if not reason.strip():
            return study_error(request, study_uid, "A rejection needs a reason.")
        reject(request, study_uid, draft_id, reason)
        return RedirectResponse(f"/studies/{quote(study_uid)}?done=rejected", status_code=303)

    @routes.post("/studies/{study_uid}/impression", response_class=HTMLResponse)
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
            return study_error(
                request, study_uid, "Write findings first: the impression is drafted from them."
            )
        suggestion = suggest_impression(request, study_uid, findings)
        return render_study(
            ctx,
            request,
            study_uid,
            typed=(draft_id, findings, suggestion.impression),
            suggestion=suggestion,
        )

    @routes.post("/api/studies/{study_uid}/accept")
    def api_accept(request: Request, study_uid: str, body: AcceptBody) -> Response:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        text: ReportText | None = None
        if body.findings is not None or body.impression is not None:
            with session_scope(sessions) as db:
                ctx.current_user(request, db)
                draft = _draft_of_study(db, study_uid, body.draft_id)
                findings = body.findings if body.findings is not None else draft.findings_text
                impression = body.impression if body.impression is not None else draft.impression_text
            try:
                text = ReportText(findings=findings, impression=impression)
            except ValueError as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
        draft_id = accept(request, study_uid, body.draft_id, text)
        with session_scope(sessions) as db:
            decided = db.get(ReportDraft, draft_id)
            assert decided is not None
            payload = draft_view(decided)
        return JSONResponse(payload, background=BackgroundTask(publish_fhir, draft_id))

    @routes.post("/api/studies/{study_uid}/impression")
    def api_impression(request: Request, study_uid: str, body: ImpressionBody) -> dict[str, Any]:
        """Findings to impression: a suggestion with its backend and guardrail outcome; nothing is stored."""
        check_csrf(request, request.headers.get(CSRF_HEADER))
        return _impression_view(suggest_impression(request, study_uid, body.findings))

    @routes.post("/api/studies/{study_uid}/reject")
    def api_reject(request: Request, study_uid: str, body: RejectBody) -> Response:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        if not body.reason.strip():
            return JSONResponse({"detail": "a rejection needs a reason"}, status_code=400)
        reject(request, study_uid, body.draft_id, body.reason)
        with session_scope(sessions) as db:
            draft = db.get(ReportDraft, body.draft_id)
            assert draft is not None
            return JSONResponse(draft_view(draft))

    @routes.get("/api/studies/{study_uid}/fhir")
    def api_fhir(request: Request, study_uid: str) -> Response:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            study = ctx.study_or_404(db, study_uid)
            draft = report_drafts.latest_draft(db, study)
            if draft is None:
                raise report_drafts.ReportNotFound(f"study {study_uid} has no report draft")
            report = report_drafts.diagnostic_report_for(db, draft)
            ctx.audit(db, user, "report.view", study_uid, draft=draft.id, fhir=True)
        return JSONResponse(report, media_type="application/fhir+json")

    return routes
