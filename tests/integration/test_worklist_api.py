"""The worklist app against a real index: login, roles, CSRF, accept / edit / reject, audit, FHIR.

The study is a phantom CT analysed by the real job runner (SEG and
measurement SR on disk) with a draft recorded through ``create_draft_record``
(see ``worklist_study.py``); the app is the real FastAPI app on the same
SQLite file, driven with Starlette's TestClient.  A local HTTP server plays
the FHIR endpoint.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.encode.fhir_report import FhirDeliveryError, post_diagnostic_report
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Delivery, DeliveryState, Job, Result
from pacs_ai.index.reports import ReportDraft, ReportStatus
from pacs_ai.report.records import create_draft_record
from pacs_ai.storage.files import HostFiles
from pacs_ai.worklist import WorklistOptions, create_app
from pacs_ai.worklist.users import set_active
from tests import peers
from tests.integration.worklist_study import (
    ADMIN,
    DESTINATION,
    DRAFTER,
    RADIOLOGIST,
    IndexedStudy,
    add_users,
    index_analysed_study,
    make_settings,
    template_text,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class FhirServer:
    """A FHIR endpoint on 127.0.0.1 that records what it is sent and answers with queued statuses."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                status = outer.statuses.pop(0) if outer.statuses else 201
                self.send_response(status)
                if status == 201:
                    self.send_header("Location", f"{self.path}/1/_history/1")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirServer]:
    server = FhirServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, sessionmaker[Session], IndexedStudy]:
    base = tmp_path_factory.mktemp("worklist")
    settings = make_settings(base / "data")
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    study = index_analysed_study(settings, sessions, base / "source")
    add_users(sessions)
    return settings, sessions, study


@pytest.fixture(scope="module")
def app(env: tuple[Settings, sessionmaker[Session], IndexedStudy], fhir: FhirServer):  # type: ignore[no-untyped-def]
    settings, sessions, _ = env
    # Every TestClient comes from one address: no login throttle here (test_worklist_sessions.py has it).
    options = WorklistOptions(fhir_endpoint=fhir.url, login_attempts_per_minute=10_000)
    return create_app(settings, options, sessions=sessions)


def _new_draft(env: tuple[Settings, sessionmaker[Session], IndexedStudy]) -> int:
    """A fresh open draft of the study (the previous open one is superseded)."""
    settings, sessions, study = env
    with session_scope(sessions) as session:
        job = session.get(Job, study.job_id)
        assert job is not None
        return create_draft_record(
            session, settings, job_ids=[job.id], text=template_text(job.findings or {}), drafter=DRAFTER
        ).draft_id


def _login_form(client: TestClient, username: str, password: str) -> Any:
    token = CSRF.search(client.get("/login").text).group(1)  # type: ignore[union-attr]
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


def _login_api(client: TestClient, username: str, password: str) -> str:
    response = client.post("/api/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["csrf_token"])


def _audit(sessions: sessionmaker[Session], action: str) -> list[AuditEvent]:
    with session_scope(sessions) as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )


def _draft(sessions: sessionmaker[Session], draft_id: int) -> ReportDraft:
    with session_scope(sessions) as session:
        draft = session.get(ReportDraft, draft_id)
        assert draft is not None
        return draft


def test_unauthenticated_requests_are_refused(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    client = TestClient(app)
    assert client.get("/api/worklist").status_code == 401
    assert client.get(f"/api/studies/{study.study_uid}").status_code == 401
    assert client.get(f"/api/studies/{study.study_uid}/fhir").status_code == 401
    page = client.get(f"/studies/{study.study_uid}", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=/studies/")
    assert client.get("/images/series/1.png", follow_redirects=False).status_code == 303
    refused = client.post(
        f"/api/studies/{study.study_uid}/accept",
        json={"draft_id": study.draft.draft_id},
        headers={"X-CSRF-Token": "x"},
    )
    assert refused.status_code == 403  # no session, so no CSRF token can match
    assert _draft(sessions, study.draft.draft_id).status in (ReportStatus.DRAFT, ReportStatus.SUPERSEDED)


def test_wrong_password_is_refused_and_audited(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, _ = env
    client = TestClient(app)
    before = len(_audit(sessions, "auth.login_failed"))
    response = _login_form(client, RADIOLOGIST[0], "not the password")
    assert response.status_code == 401 and "Wrong user name or password" in response.text
    assert client.post("/api/login", json={"username": "nobody", "password": "x"}).status_code == 401
    failed = _audit(sessions, "auth.login_failed")
    assert [e.actor for e in failed[before:]] == [RADIOLOGIST[0], "nobody"]
    assert client.get("/api/worklist").status_code == 401


def test_login_form_without_csrf_token_is_refused(app) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(app)
    client.get("/login")
    response = client.post("/login", data={"username": RADIOLOGIST[0], "password": RADIOLOGIST[2]})
    assert response.status_code == 403
    assert client.get("/api/worklist").status_code == 401


def test_worklist_lists_the_study_with_its_draft(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    client = TestClient(app)
    assert _login_form(client, RADIOLOGIST[0], RADIOLOGIST[2]).status_code == 200
    rows = client.get("/api/worklist").json()["studies"]
    assert [row["study_instance_uid"] for row in rows] == [study.study_uid]
    assert rows[0]["status"] == "draft" and rows[0]["patient_id"] == "PHANTOM-WL"
    page = client.get("/")
    assert study.study_uid in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert _audit(sessions, "worklist.view")[-1].actor == RADIOLOGIST[0]


def test_study_page_shows_draft_measurements_and_overlay_png(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    client = TestClient(app)
    _login_form(client, RADIOLOGIST[0], RADIOLOGIST[2])
    view = client.get(f"/api/studies/{study.study_uid}").json()
    assert view["draft"]["backend"] == DRAFTER.backend
    assert {m["finding_site"] for m in view["measurements"]} >= {"Right lung", "Left lung"}
    urls = [image["url"] for image in view["key_images"]]
    assert len(urls) == 2 and all(url.startswith("/images/seg/") for url in urls)  # right and left lung
    page = client.get(f"/studies/{study.study_uid}")
    assert page.status_code == 200 and 'id="accept-form"' in page.text and urls[0] in page.text
    response = client.get(urls[0])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (160, 160) and image.mode == "RGB"
    pixels = list(image.getdata())
    assert any(r > g + 40 for r, g, _ in pixels), "no overlay colour in the key image"  # segment 1 is red
    assert any(r == g == b and r > 0 for r, g, b in pixels), "no grey source image under the overlay"
    views = _audit(sessions, "report.view")
    assert views[-1].object_uid == study.study_uid and views[-1].actor == RADIOLOGIST[0]


def test_admins_read_the_metrics_and_radiologists_may_not(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, _ = env
    anonymous = TestClient(app).get("/admin/metrics", follow_redirects=False)
    assert anonymous.status_code in (401, 303) and "pacs_ai_" not in anonymous.text
    admin = TestClient(app)
    _login_api(admin, ADMIN[0], ADMIN[2])
    shown = admin.get("/admin/metrics")
    assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/plain")
    assert "# TYPE pacs_ai_ingest_instances_total counter" in shown.text
    assert _audit(sessions, "admin.view")[-1].detail == {"page": "metrics"}
    radiologist = TestClient(app)
    _login_api(radiologist, RADIOLOGIST[0], RADIOLOGIST[2])
    assert radiologist.get("/admin/metrics").status_code == 403


def test_admin_may_not_sign_and_radiologist_may_not_read_the_audit(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    draft_id = _new_draft(env)
    admin = TestClient(app)
    token = _login_api(admin, ADMIN[0], ADMIN[2])
    refused = admin.post(
        f"/api/studies/{study.study_uid}/accept", json={"draft_id": draft_id}, headers={"X-CSRF-Token": token}
    )
    assert refused.status_code == 403
    assert _draft(sessions, draft_id).status == ReportStatus.DRAFT
    assert _audit(sessions, "access.denied")[-1].actor == ADMIN[0]
    assert admin.get("/api/audit").status_code == 200
    admin_page = admin.get("/admin")
    assert admin_page.status_code == 200
    # AI drafts in use, per drafter and model (here the one open template draft of the study).
    assert 'id="drafts"' in admin_page.text and "pacs-ai-test-template-1" in admin_page.text
    radiologist = TestClient(app)
    _login_api(radiologist, RADIOLOGIST[0], RADIOLOGIST[2])
    assert radiologist.get("/api/audit").status_code == 403
    assert radiologist.get("/admin").status_code == 403


def test_api_accept_without_or_with_a_wrong_csrf_token_is_refused(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    draft_id = _new_draft(env)
    client = TestClient(app)
    token = _login_api(client, RADIOLOGIST[0], RADIOLOGIST[2])
    url = f"/api/studies/{study.study_uid}/accept"
    assert client.post(url, json={"draft_id": draft_id}).status_code == 403
    assert (
        client.post(url, json={"draft_id": draft_id}, headers={"X-CSRF-Token": token + "x"}).status_code
        == 403
    )
    form = client.post(
        f"/studies/{study.study_uid}/accept",
        data={"draft_id": draft_id, "findings": "x", "impression": "y", "csrf_token": "forged"},
    )
    assert form.status_code == 403
    assert _draft(sessions, draft_id).status == ReportStatus.DRAFT


def test_edit_and_accept_writes_the_signed_sr_queues_it_and_audits(app, env, fhir: FhirServer) -> None:  # type: ignore[no-untyped-def]
    settings, sessions, study = env
    draft_id = _new_draft(env)
    client = TestClient(app)
    _login_form(client, RADIOLOGIST[0], RADIOLOGIST[2])
    page = client.get(f"/studies/{study.study_uid}")
    token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    draft = _draft(sessions, draft_id)
    response = client.post(
        f"/studies/{study.study_uid}/accept",
        data={
            "draft_id": draft_id,
            "findings": draft.findings_text + "\n\nReviewed: agree with the automated volumes.",
            "impression": "No acute abnormality.",
            "csrf_token": token,
        },
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    signed = _draft(sessions, draft_id)
    assert signed.status == ReportStatus.ACCEPTED and signed.edited
    assert signed.signed_findings_text and signed.signed_findings_text.endswith("automated volumes.")
    with session_scope(sessions) as session:
        result = session.scalar(select(Result).where(Result.sop_instance_uid == signed.signed_sr_uid))
        assert result is not None
        deliveries = list(session.scalars(select(Delivery).where(Delivery.result_fk == result.id)))
        path = HostFiles(settings).local_path(result.path)  # the index records the storage key
    assert [(d.destination, d.state) for d in deliveries] == [(DESTINATION, DeliveryState.PENDING)]
    assert peers.dciodvfy_errors(path) == []
    dump = peers.dsrdump(path)
    assert dump.returncode == 0 and dump.stderr == "", dump.stderr
    sr = pydicom.dcmread(path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == RADIOLOGIST[1]
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == signed.draft_sr_uid
    assert {e.detail["draft"] for e in _audit(sessions, "report.edited")} >= {draft_id}
    assert _audit(sessions, "report.signed")[-1].actor == RADIOLOGIST[0]
    # The final DiagnosticReport went to the FHIR endpoint after the response.
    assert fhir.received and fhir.received[-1]["status"] == "final"
    assert fhir.received[-1]["resultsInterpreter"][0]["display"] == "Rita Radiologist"
    assert _audit(sessions, "report.fhir_sent")[-1].detail["draft"] == draft_id
    assert client.get(f"/api/studies/{study.study_uid}/fhir").json()["status"] == "final"
    # Deciding again is a conflict, not a second signature.
    again = client.post(
        f"/api/studies/{study.study_uid}/accept",
        json={"draft_id": draft_id},
        headers={"X-CSRF-Token": client.get("/api/session").json()["csrf_token"]},
    )
    assert again.status_code == 409


def test_reject_needs_a_reason_and_is_audited(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    draft_id = _new_draft(env)
    client = TestClient(app)
    token = _login_api(client, RADIOLOGIST[0], RADIOLOGIST[2])
    url = f"/api/studies/{study.study_uid}/reject"
    assert (
        client.post(
            url, json={"draft_id": draft_id, "reason": "  "}, headers={"X-CSRF-Token": token}
        ).status_code
        == 400
    )
    assert client.get(f"/api/studies/{study.study_uid}/fhir").json()["status"] == "partial"
    response = client.post(
        url, json={"draft_id": draft_id, "reason": "Volumes implausible"}, headers={"X-CSRF-Token": token}
    )
    assert response.status_code == 200 and response.json()["status"] == "rejected"
    assert _draft(sessions, draft_id).reject_reason == "Volumes implausible"
    assert _audit(sessions, "report.rejected")[-1].detail["reason"] == "Volumes implausible"


def test_a_disabled_user_is_logged_out_at_the_next_request(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, _ = env
    client = TestClient(app)
    _login_api(client, ADMIN[0], ADMIN[2])
    assert client.get("/api/worklist").status_code == 200
    with session_scope(sessions) as session:
        set_active(session, ADMIN[0], False)
    try:
        assert client.get("/api/worklist").status_code == 401
    finally:
        with session_scope(sessions) as session:
            set_active(session, ADMIN[0], True)


def test_fhir_post_retries_server_errors_and_stops_at_client_errors(fhir: FhirServer) -> None:
    report = {
        "resourceType": "DiagnosticReport",
        "id": "x",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2"}],
    }
    fhir.statuses[:] = [503, 201]
    count = len(fhir.received)
    assert (
        post_diagnostic_report(report, fhir.url, retries=2, backoff_seconds=0.01)
        == "/fhir/DiagnosticReport/1/_history/1"
    )
    assert len(fhir.received) == count + 2
    assert fhir.headers[-1]["If-None-Exist"] == "identifier=urn:dicom:uid|urn:oid:1.2"
    fhir.statuses[:] = [400]
    with pytest.raises(FhirDeliveryError, match="HTTP 400"):
        post_diagnostic_report(report, fhir.url, retries=3, backoff_seconds=0.01)
    assert len(fhir.received) == count + 3  # no retry after a 4xx


def test_the_recorded_draft_sr_is_valid_and_queued_with_the_analysis_results(env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    path = study.draft.sr_path
    assert path is not None and peers.dciodvfy_errors(path) == []
    draft = pydicom.dcmread(path)
    assert (draft.CompletionFlag, draft.VerificationFlag, draft.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    with session_scope(sessions) as session:
        kinds = {
            r.sop_instance_uid: r.kind
            for r in session.scalars(select(Result).where(Result.job_fk == study.job_id))
        }
        evidence = {
            instance.ReferencedSOPInstanceUID
            for series in draft.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for instance in series.ReferencedSOPSequence
        }
        # The SEG and the measurement SR of the analysis are the draft's evidence, next to the CT slices.
        assert {uid for uid, kind in kinds.items() if kind in ("SEG", "SR")} <= evidence
        assert kinds[str(draft.SOPInstanceUID)] == "SR-DRAFT"
        assert study.draft.delivery_ids
        delivery = session.get(Delivery, study.draft.delivery_ids[0])
        assert delivery is not None and delivery.destination == DESTINATION


FINDINGS = "There is no pneumothorax. Moderate centrilobular emphysema in the right upper lobe."


def test_findings_to_impression_in_the_api_and_on_the_study_page(app, env) -> None:  # type: ignore[no-untyped-def]
    _, sessions, study = env
    draft_id = _new_draft(env)
    url = f"/api/studies/{study.study_uid}/impression"

    admin = TestClient(app)
    admin_token = _login_api(admin, ADMIN[0], ADMIN[2])
    assert (
        admin.post(url, json={"findings": FINDINGS}, headers={"X-CSRF-Token": admin_token}).status_code == 403
    )

    client = TestClient(app)
    token = _login_api(client, RADIOLOGIST[0], RADIOLOGIST[2])
    assert client.post(url, json={"findings": FINDINGS}).status_code == 403  # no CSRF token
    assert client.post(url, json={"findings": ""}, headers={"X-CSRF-Token": token}).status_code == 422
    response = client.post(url, json={"findings": FINDINGS}, headers={"X-CSRF-Token": token})
    assert response.status_code == 200, response.text
    suggestion = response.json()
    assert suggestion["backend"] == "template" and suggestion["guardrails_passed"] is True
    assert suggestion["unverified"] is True and suggestion["fallback_reason"] is None
    assert "emphysema" in suggestion["impression"] and "right" in suggestion["impression"].lower()
    [event] = _audit(sessions, "report.impression_drafted")[-1:]
    assert event.actor == RADIOLOGIST[0] and event.object_uid == study.study_uid

    # The page: the findings as typed stay, the impression box holds the suggestion, marked unverified.
    page_token = CSRF.search(client.get(f"/studies/{study.study_uid}").text).group(1)  # type: ignore[union-attr]
    form = {"draft_id": draft_id, "findings": FINDINGS, "impression": "", "csrf_token": page_token}
    page = client.post(f"/studies/{study.study_uid}/impression", data=form)
    assert page.status_code == 200, page.text
    assert 'id="impression-suggestion"' in page.text and "UNVERIFIED AI output" in page.text
    impression_box = re.search(
        r'<textarea name="impression" id="impression"[^>]*>([^<]*)</textarea>', page.text
    )
    assert impression_box is not None and impression_box.group(1).strip() == suggestion["impression"]
    assert FINDINGS in page.text
    empty = client.post(f"/studies/{study.study_uid}/impression", data={**form, "findings": " "})
    assert empty.status_code == 400 and "Write findings first" in empty.text
    assert _draft(sessions, draft_id).status == ReportStatus.DRAFT  # a suggestion changes nothing stored
