"""The admin console (admin role only): what ``pacs-ai status|studies|retry|cancel|reprocess|rules|audit`` do.

Pages, server-rendered like the rest of the worklist:

* ``/admin``: users, AI drafts in use, the latest audit events, links to the rest;
* ``/admin/status``: the service's health, as ``pacs-ai status`` (listener, workers on every host,
  queues, storage, broker, disk, index counts) in sentences;
* ``/admin/studies``: studies with each series' routing decision and its reason (routed,
  unmatched, discarded, receiving) and failures, filterable; ``/admin/studies/{uid}``: one study's
  series, jobs, results and deliveries with failure reasons, retry / cancel / reprocess buttons and
  its timeline;
* ``/admin/jobs``: jobs by state with their failure reasons, and failed deliveries;
* ``/admin/rules``: the routing rules tester on a study;
* ``/admin/audit``: audit search by action, user, object and time range.

The buttons post (CSRF-checked) to ``/admin/jobs/{id}/retry``, ``/admin/jobs/{id}/cancel`` and
``/admin/studies/{uid}/reprocess``, which call the very functions the CLI verbs call
(:mod:`pacs_ai.ops`), audited with the logged-in user.  JSON: ``/api/audit`` (filters as the
page), ``/api/admin/status``, ``/api/admin/studies`` and ``/api/admin/studies/{uid}/timeline``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai import metrics
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, DeliveryState, Job, JobState, Result, Series, Study
from pacs_ai.index.reports import Role, User
from pacs_ai.ops.audit import audit_row, describe_detail, search_audit
from pacs_ai.ops.jobs import cancel_jobs, enqueue, reprocess_from_index, retry_jobs, studies_due_for_draft
from pacs_ai.ops.rules import explain_rules, samples_from_index
from pacs_ai.ops.status import collect_status, index_counts
from pacs_ai.ops.studies import STUDY_FILTERS, describe_study, study_rows, study_timeline
from pacs_ai.report.draft_stats import draft_stats
from pacs_ai.report.records import ReportNotFound
from pacs_ai.route.rules import RulesError, find_rules_file, load_rules
from pacs_ai.worklist.context import WorklistContext
from pacs_ai.worklist.security import CSRF_FIELD, check_csrf, require_role
from pacs_ai.worklist.users import list_users

__all__ = ["router"]

#: Job states the jobs page lists, and "all".
JOB_FILTERS = ("failed", "queued", "running", "held", "cancelled", "succeeded", "all")
#: Rows the jobs page lists at most.
JOBS_LIMIT = 500
_NOT_QUEUED = (
    "The broker is not reachable (is `pacs-ai serve` running?): the work is queued in the index "
    "and will be sent when the service starts."
)


def _parse_time(value: str | None, field: str) -> datetime | None:
    """A time from a form field (``YYYY-MM-DD``, ``YYYY-MM-DDTHH:MM`` as a browser sends, UTC)."""
    if not value or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{field}: {value!r} is not a date or time (YYYY-MM-DD or YYYY-MM-DD HH:MM)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _flash(request: Request, *messages: str) -> None:
    """Messages the next page shows once (kept in the signed session cookie)."""
    request.session["flash"] = [*request.session.get("flash", []), *messages][-10:]


def _take_flash(request: Request) -> list[str]:
    return list(request.session.pop("flash", []))


def _jobs_rows(db: Session, state: str) -> list[dict[str, Any]]:
    query = (
        select(Job, Series.series_instance_uid, Study.study_instance_uid)
        .join(Series, Series.id == Job.series_fk)
        .join(Study, Study.id == Series.study_fk)
        .order_by(Job.id.desc())
        .limit(JOBS_LIMIT)
    )
    if state != "all":
        query = query.where(Job.state == JobState(state))
    return [
        {
            "id": job.id,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "profile": job.profile,
            "analyzer": job.analyzer,
            "version": job.version,
            "state": job.state.value,
            "attempts": job.attempts,
            "error": job.error,
            "created_at": job.created_at,
            "finished_at": job.finished_at,
            "claimed_by": job.claimed_by,
        }
        for job, series_uid, study_uid in db.execute(query)
    ]


def _failed_deliveries(db: Session) -> list[dict[str, Any]]:
    query = (
        select(Delivery, Result, Job.id, Study.study_instance_uid)
        .join(Result, Result.id == Delivery.result_fk)
        .join(Job, Job.id == Result.job_fk)
        .join(Series, Series.id == Job.series_fk)
        .join(Study, Study.id == Series.study_fk)
        .where(Delivery.state == DeliveryState.FAILED)
        .order_by(Delivery.id.desc())
        .limit(JOBS_LIMIT)
    )
    return [
        {
            "id": delivery.id,
            "job": job_id,
            "study_instance_uid": study_uid,
            "kind": result.kind,
            "destination": delivery.destination,
            "attempts": delivery.attempts,
            "last_status": delivery.last_status,
            "last_error": delivery.last_error,
        }
        for delivery, result, job_id, study_uid in db.execute(query)
    ]


def _study_of_job(db: Session, job_id: int) -> str | None:
    return db.scalar(
        select(Study.study_instance_uid)
        .join(Series, Series.study_fk == Study.id)
        .join(Job, Job.series_fk == Series.id)
        .where(Job.id == job_id)
    )


def _back(request: Request, fallback: str) -> str:
    """Where a button's form asked to go back to (a path of this app only), else ``fallback``."""
    target = request.query_params.get("back") or fallback
    return target if target.startswith("/admin") and not target.startswith("//") else fallback


def router(ctx: WorklistContext) -> APIRouter:
    """The admin console's routes on ``ctx``'s index; every one needs the admin role."""
    routes = APIRouter()
    settings, sessions = ctx.settings, ctx.sessions

    def admin_user(request: Request, db: Session) -> User:
        user = ctx.current_user(request, db)
        require_role(user, Role.ADMIN)
        return user

    def viewed(db: Session, user: User, page: str, **detail: Any) -> None:
        record_audit(
            db, actor=user.username, action="admin.view", object_type="admin", detail={"page": page, **detail}
        )

    def console(
        request: Request, template: str, user: User, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        return ctx.page(
            request, template, status_code=status_code, user=user, flash=_take_flash(request), **context
        )

    @routes.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request) -> HTMLResponse:
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            events = [{**audit_row(e), "text": describe_detail(e.detail)} for e in search_audit(db, limit=20)]
            record_audit(db, actor=user.username, action="audit.view", object_type="audit")
            return console(
                request,
                "admin.html",
                user,
                users=list_users(db),
                events=events,
                drafts=draft_stats(db),
                counts=index_counts(db),
            )

    @routes.get("/admin/status", response_class=HTMLResponse)
    def status_page(request: Request) -> HTMLResponse:
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            viewed(db, user, "status")
        report = collect_status(settings, sessions)
        with session_scope(sessions) as db:
            report.update(index_counts(db))
        return console(request, "admin_status.html", user, status=report)

    @routes.get("/api/admin/status")
    def api_status(request: Request) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            viewed(db, user, "status", api=True)
        report = collect_status(settings, sessions)
        with session_scope(sessions) as db:
            report.update(index_counts(db))
        return report

    @routes.get("/admin/studies", response_class=HTMLResponse)
    def studies_page(request: Request, show: str = "all", q: str = "") -> HTMLResponse:
        if show not in STUDY_FILTERS:
            show = "all"
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            rows = study_rows(db, show=show, text=q.strip()[:64] or None)
            viewed(db, user, "studies", show=show, studies=len(rows))
            return console(
                request, "admin_studies.html", user, rows=rows, show=show, q=q, filters=STUDY_FILTERS
            )

    @routes.get("/api/admin/studies")
    def api_studies(request: Request, show: str = "all", q: str = "") -> Response:
        """The studies page as JSON: each study's series with routing decisions, jobs, deliveries."""
        if show not in STUDY_FILTERS:
            return JSONResponse(
                {"detail": f"show must be one of {', '.join(STUDY_FILTERS)}"}, status_code=400
            )
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            rows = study_rows(db, show=show, text=q.strip()[:64] or None)
            viewed(db, user, "studies", show=show, studies=len(rows), api=True)
        for row in rows:
            row["first_received_at"] = row["first_received_at"].isoformat()
        return JSONResponse({"studies": rows})

    @routes.get("/admin/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> HTMLResponse:
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            study = ctx.study_or_404(db, study_uid)
            report = describe_study(db, study)
            steps = study_timeline(db, study)
            since = steps[0].at if steps else None
            record_audit(
                db, actor=user.username, action="admin.study_view", object_type="study", object_uid=study_uid
            )
            return console(
                request,
                "admin_study.html",
                user,
                study=report,
                timeline=[step.as_dict(since) for step in steps],
                failed_delivery_jobs={
                    result["job"]
                    for result in report["results"]
                    if any(d["state"] == DeliveryState.FAILED.value for d in result["deliveries"])
                },
                back=f"/admin/studies/{quote(study_uid)}",
            )

    @routes.get("/api/admin/studies/{study_uid}/timeline")
    def api_timeline(request: Request, study_uid: str) -> dict[str, Any]:
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            study = ctx.study_or_404(db, study_uid)
            steps = study_timeline(db, study)
            since = steps[0].at if steps else None
            record_audit(
                db,
                actor=user.username,
                action="admin.study_view",
                object_type="study",
                object_uid=study_uid,
                detail={"api": True},
            )
            return {"study_instance_uid": study_uid, "timeline": [step.as_dict(since) for step in steps]}

    @routes.get("/admin/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, state: str = "failed") -> HTMLResponse:
        if state not in JOB_FILTERS:
            state = "failed"
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            jobs = _jobs_rows(db, state)
            deliveries = _failed_deliveries(db)
            viewed(db, user, "jobs", state=state)
            return console(
                request,
                "admin_jobs.html",
                user,
                jobs=jobs,
                deliveries=deliveries,
                state=state,
                filters=JOB_FILTERS,
                back=f"/admin/jobs?state={state}",
            )

    @routes.post("/admin/jobs/{job_id}/retry")
    def retry(
        request: Request,
        job_id: int,
        keep_params: bool = Form(False),
        csrf_token_value: str = Form("", alias=CSRF_FIELD),
    ) -> Response:
        check_csrf(request, csrf_token_value)
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            study_uid = _study_of_job(db, job_id)
            if study_uid is None:
                raise ReportNotFound(f"no job {job_id}")
            outcome = retry_jobs(db, settings, [job_id], actor=user.username, keep_params=keep_params)
        sent = enqueue(settings, outcome.jobs, outcome.deliveries)
        _flash(request, *(f"Job {row['job']}: {row['what']}." for row in outcome.retried))
        if (outcome.jobs or outcome.deliveries) and not sent:
            _flash(request, _NOT_QUEUED)
        return RedirectResponse(_back(request, f"/admin/studies/{quote(study_uid)}"), status_code=303)

    @routes.post("/admin/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: int, csrf_token_value: str = Form("", alias=CSRF_FIELD)) -> Response:
        check_csrf(request, csrf_token_value)
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            study_uid = _study_of_job(db, job_id)
            if study_uid is None:
                raise ReportNotFound(f"no job {job_id}")
            (outcome,) = cancel_jobs(db, [job_id], actor=user.username)
        if outcome.cancelled:
            # A cancelled job may have been the last one its study's report draft waited for.
            drafts = studies_due_for_draft(settings, sessions, [job_id])
            sent = enqueue(settings, [], [], drafts)
            _flash(request, f"Job {job_id}: cancelled.", *([] if sent else [_NOT_QUEUED]))
        else:
            _flash(request, f"Job {job_id}: not cancelled: {outcome.reason}.")
        return RedirectResponse(_back(request, f"/admin/studies/{quote(study_uid)}"), status_code=303)

    @routes.post("/admin/studies/{study_uid}/reprocess")
    def reprocess(
        request: Request, study_uid: str, csrf_token_value: str = Form("", alias=CSRF_FIELD)
    ) -> Response:
        check_csrf(request, csrf_token_value)
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            study = ctx.study_or_404(db, study_uid)
            outcome = reprocess_from_index(db, ctx.files, study, actor=user.username, detail={"web": True})
        if outcome.reopened:
            _flash(
                request,
                f"Reopened {len(outcome.reopened)} series ({outcome.instances} instances): the running "
                "service routes them again and opens new job versions.",
            )
        _flash(request, *outcome.problems)
        return RedirectResponse(f"/admin/studies/{quote(study_uid)}", status_code=303)

    @routes.get("/admin/rules", response_class=HTMLResponse)
    def rules_page(request: Request, study: str = "") -> HTMLResponse:
        study = study.strip()[:64]
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            path = find_rules_file(settings.profiles_dir)
            error: str | None = None
            report: list[dict[str, Any]] | None = None
            if path is None or not path.is_file():
                error = f"No rules file at {settings.profiles_dir / 'rules.yaml'}."
            elif study:
                try:
                    rules = load_rules(path)
                except RulesError as exc:
                    error = f"The rules file {path} has problems: {exc}"
                else:
                    samples = samples_from_index(db, ctx.files, study)
                    if samples:
                        report = explain_rules(rules, samples)
                    else:
                        error = f"No study {study} with instance files in the index."
            viewed(db, user, "rules", study=study or None)
            return console(
                request,
                "admin_rules.html",
                user,
                study=study,
                rules_file=str(path) if path else None,
                report=report,
                error=error,
            )

    @routes.get("/admin/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        action: str = "",
        actor: str = "",
        object: str = "",
        since: str = "",
        until: str = "",
        limit: int = 200,
    ) -> HTMLResponse:
        query = {
            "action": action,
            "actor": actor,
            "object": object,
            "since": since,
            "until": until,
            "limit": limit,
        }
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            error = None
            events: list[dict[str, Any]] = []
            try:
                found = search_audit(
                    db,
                    action=action.strip() or None,
                    actor=actor.strip() or None,
                    object_uid=object.strip() or None,
                    since=_parse_time(since, "from"),
                    until=_parse_time(until, "until"),
                    limit=limit,
                )
                events = [{**audit_row(e), "text": describe_detail(e.detail)} for e in found]
            except ValueError as exc:
                error = str(exc)
            record_audit(
                db, actor=user.username, action="audit.view", object_type="audit", detail={"search": True}
            )
            return console(
                request,
                "admin_audit.html",
                user,
                status_code=400 if error else 200,
                events=events,
                query=query,
                error=error,
            )

    @routes.get("/api/audit")
    def api_audit(
        request: Request,
        limit: int = 200,
        action: str | None = None,
        actor: str | None = None,
        object: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> Response:
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            try:
                found = search_audit(
                    db,
                    action=action,
                    actor=actor,
                    object_uid=object,
                    since=_parse_time(since, "since"),
                    until=_parse_time(until, "until"),
                    limit=limit,
                )
            except ValueError as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
            events = [{**audit_row(e), "at": e.at.isoformat()} for e in found]
            record_audit(
                db, actor=user.username, action="audit.view", object_type="audit", detail={"api": True}
            )
            return JSONResponse({"events": events})

    @routes.get("/admin/metrics")
    def metrics_text(request: Request) -> Response:
        """This host's Prometheus metrics as text, for an administrator (Prometheus scrapes metrics_port)."""
        with session_scope(sessions) as db:
            user = admin_user(request, db)
            viewed(db, user, "metrics")
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return routes
