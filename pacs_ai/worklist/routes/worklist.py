"""The worklist page, key images, and the worklist and studies as JSON (``/api/worklist``, ``/api/studies``).

Every view of the worklist or a study is audited (``worklist.view``, ``report.view``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from pacs_ai.index.db import session_scope
from pacs_ai.index.models import utcnow
from pacs_ai.report import records as report_drafts
from pacs_ai.worklist.context import WorklistContext
from pacs_ai.worklist.key_images import render_segment_image, render_series_image
from pacs_ai.worklist.views import study_view, worklist_rows

__all__ = ["router"]


def router(ctx: WorklistContext) -> APIRouter:
    """The worklist, key image and study API routes on ``ctx``'s index (the study page: ``reports``)."""
    routes = APIRouter()
    sessions = ctx.sessions

    @routes.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/", response_class=HTMLResponse)
    def worklist_page(request: Request) -> HTMLResponse:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            rows = worklist_rows(db, utcnow())
            ctx.audit(db, user, "worklist.view", None, studies=len(rows))
            return ctx.page(request, "worklist.html", user=user, rows=rows)

    @routes.get("/images/seg/{result_id}/{segment_number}.png")
    def segment_image(request: Request, result_id: int, segment_number: int) -> Response:
        with session_scope(sessions) as db:
            ctx.current_user(request, db)
            try:
                data = render_segment_image(db, result_id, segment_number, ctx.cache_dir, ctx.files)
            except LookupError as exc:
                raise report_drafts.ReportNotFound(str(exc)) from exc
        return Response(data, media_type="image/png")

    @routes.get("/images/series/{series_id}.png")
    def series_image(request: Request, series_id: int) -> Response:
        with session_scope(sessions) as db:
            ctx.current_user(request, db)
            try:
                data = render_series_image(db, series_id, ctx.cache_dir, ctx.files)
            except LookupError as exc:
                raise report_drafts.ReportNotFound(str(exc)) from exc
        return Response(data, media_type="image/png")

    @routes.get("/api/worklist")
    def api_worklist(request: Request) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            rows = worklist_rows(db, utcnow())
            ctx.audit(db, user, "worklist.view", None, studies=len(rows), api=True)
            return {"studies": rows}

    @routes.get("/api/studies/{study_uid}")
    def api_study(request: Request, study_uid: str) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = ctx.current_user(request, db)
            view = study_view(db, ctx.study_or_404(db, study_uid), utcnow())
            ctx.audit(
                db,
                user,
                "report.view",
                study_uid,
                draft=view["draft"]["id"] if view["draft"] else None,
                api=True,
            )
            return view

    return routes
