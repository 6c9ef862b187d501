"""From the modality to a signed report: the AI draft in the PACS, reviewed and signed in a browser.

A chest CT phantom is sent with DCMTK's storescu to the real ``pacs-ai serve``
(embedded broker and index, its Celery worker, and the worklist it runs);
Orthanc is the PACS.  The lung analysis finishes, the worker drafts the
study's report with the shipped profile's drafter (the template), and the
draft SR (TID 2000, PARTIAL / UNVERIFIED / PRELIMINARY) reaches Orthanc.  A
radiologist created with ``pacs-ai users add --password-stdin`` logs in with
headless Chromium (Debian's ``chromium`` driven by ``chromium-driver``), opens
the study, sees the overlay key image, edits the impression and signs; the
signed SR (COMPLETE / VERIFIED / FINAL, the draft as predecessor) then reaches
Orthanc too.  Both SRs pass dciodvfy without errors.  Requests without a login,
or from an admin (who may not sign), are refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from pacs_ai.encode.report_sr import read_report_text
from pacs_ai.synthetic.phantom import PhantomTruth
from tests.e2e.conftest import orthanc_destination
from tests.e2e.test_chest_ct_roundtrip import DRAFT_REPORT_SR
from tests.peers import OrthancServer, dciodvfy_errors, dsrdump, storescu, wait_for
from tests.service import PacsAiService

pytestmark = pytest.mark.e2e

TIMEOUT = 30
RADIOLOGIST = ("rad1", "Radiologist^Rita", "correct horse battery")
ADMIN = ("admin1", "Admin^Adam", "staple battery horse")
SIGNED_IMPRESSION = "Lung volumes within normal limits. Signed in the end-to-end test."


def _enhanced_srs(orthanc: OrthancServer, study_uid: str, into: Path) -> dict[str, Path]:
    """The Enhanced SR instances of the study in Orthanc, downloaded, by SOP Instance UID."""
    found: dict[str, Path] = {}
    for series in orthanc.series_of_study(study_uid):
        if DRAFT_REPORT_SR not in series["SOPClassUIDs"]:
            continue
        for instance in series["Instances"]:
            path = orthanc.download_instance(instance, into / f"{instance}.dcm")
            found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return found


def _valid_sr_in_orthanc(
    orthanc: OrthancServer, study_uid: str, sop_uid: str, into: Path, what: str
) -> pydicom.Dataset:
    """Wait for an Enhanced SR instance to reach Orthanc; check it with dciodvfy and dsrdump; read it."""
    srs = wait_for(
        lambda: (found := _enhanced_srs(orthanc, study_uid, into)) and sop_uid in found and found,
        timeout=120,
        interval=1.0,
        description=f"{what} in Orthanc",
    )
    assert dciodvfy_errors(srs[sop_uid]) == []
    assert dsrdump(srs[sop_uid]).returncode == 0
    return pydicom.dcmread(srs[sop_uid])


def _add_user(service: PacsAiService, user: tuple[str, str, str], role: str) -> None:
    username, name, password = user
    added = service.cli(
        "users", "add", username, "--role", role, "--name", name, "--password-stdin", input=password + "\n"
    )
    assert added.returncode == 0, added.stdout + added.stderr


def _wait_for_draft(service: PacsAiService, client: httpx.Client, study_uid: str) -> dict[str, Any]:
    def draft() -> dict[str, Any] | None:
        response = client.get(f"/api/studies/{study_uid}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()["draft"]

    return wait_for(draft, timeout=180, interval=1.0, description="the AI draft in the worklist")


def _api_login(base: str, user: tuple[str, str, str]) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=base, timeout=TIMEOUT)
    response = client.post("/api/login", json={"username": user[0], "password": user[2]})
    assert response.status_code == 200, response.text
    return client, response.json()["csrf_token"]


def test_study_is_drafted_reviewed_in_the_browser_signed_and_sent(
    chest_phantom: PhantomTruth,
    orthanc: OrthancServer,
    service_factory: Any,
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    service: PacsAiService = service_factory(destinations=orthanc_destination(orthanc))
    base = service.worklist_url
    study_uid = chest_phantom.study_uid

    # pacs-ai serve runs the worklist and says where.
    status = service.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["service"]["worklist"]["url"] == base + "/"
    assert f"worklist at {base}" in service.log_path.read_text()

    _add_user(service, RADIOLOGIST, "radiologist")
    _add_user(service, ADMIN, "admin")

    sent = storescu(
        "127.0.0.1", service.port, service.ae_title, chest_phantom.paths, calling_aet="CT_SCANNER"
    )
    assert sent.returncode == 0, sent.stderr

    # The draft reaches the worklist and the PACS.
    radiologist, _ = _api_login(base, RADIOLOGIST)
    draft = _wait_for_draft(service, radiologist, study_uid)
    assert draft["status"] == "draft" and draft["backend"] == "template", draft
    assert draft["guardrail"]["passed"] is True and draft["fallback_reason"] is None
    draft_uid = draft["draft_sr_uid"]
    draft_sr = _valid_sr_in_orthanc(orthanc, study_uid, draft_uid, tmp_path, "the draft SR")
    assert (draft_sr.CompletionFlag, draft_sr.VerificationFlag, draft_sr.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert draft_sr.StudyInstanceUID == study_uid

    # Without a login nothing is shown; an admin may look but not sign.
    anonymous = httpx.get(f"{base}/api/worklist", timeout=TIMEOUT)
    assert anonymous.status_code == 401
    page = httpx.get(f"{base}/studies/{study_uid}", timeout=TIMEOUT)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    admin, admin_csrf = _api_login(base, ADMIN)
    refused = admin.post(
        f"/api/studies/{study_uid}/accept",
        json={"draft_id": draft["id"]},
        headers={"X-CSRF-Token": admin_csrf},
    )
    assert refused.status_code == 403, refused.text

    # The radiologist reviews and signs in the browser.
    browser.set_window_size(1280, 1600)  # the whole study page in its screenshot
    wait = WebDriverWait(browser, TIMEOUT)
    browser.get(f"{base}/")
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    browser.find_element(By.ID, "username").send_keys(RADIOLOGIST[0])
    browser.find_element(By.ID, "password").send_keys(RADIOLOGIST[2])
    browser.find_element(By.ID, "login-submit").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "worklist")))
    browser.find_element(By.CSS_SELECTOR, "a.study-link").click()

    wait.until(expected_conditions.presence_of_element_located((By.ID, "accept-form")))
    assert "UNVERIFIED" in browser.find_element(By.ID, "unverified").text
    images = browser.find_elements(By.CSS_SELECTOR, "img.key-image")
    assert images, "no key image on the study page"
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete", img) for img in images))
    widths = [browser.execute_script("return arguments[0].naturalWidth", img) for img in images]
    assert all(width > 0 for width in widths), f"a key image did not load: widths {widths}"
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    png = httpx.get(images[0].get_attribute("src"), cookies=cookies, timeout=TIMEOUT)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n") and len(png.content) > 1000
    browser.save_screenshot(str(tmp_path / "study.png"))

    # Findings to impression: the page comes back with the impression drafted from the findings.
    findings_text = browser.find_element(By.ID, "findings").get_attribute("value")
    browser.find_element(By.ID, "draft-impression").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "impression-suggestion")))
    assert "UNVERIFIED" in browser.find_element(By.ID, "impression-suggestion").text
    assert browser.find_element(By.ID, "findings").get_attribute("value") == findings_text
    assert browser.find_element(By.ID, "impression").get_attribute("value").strip()

    impression = browser.find_element(By.ID, "impression")
    impression.clear()
    impression.send_keys(SIGNED_IMPRESSION)
    browser.find_element(By.ID, "accept").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "done")))
    assert "Report signed" in browser.find_element(By.ID, "done").text
    assert SIGNED_IMPRESSION in browser.find_element(By.ID, "signed-impression").text

    # The signed SR reaches the PACS, replacing the draft.
    signed = radiologist.get(f"/api/studies/{study_uid}").json()["draft"]
    assert signed["status"] == "accepted" and signed["edited"] is True
    signed_uid = signed["signed_sr_uid"]
    signed_sr = _valid_sr_in_orthanc(orthanc, study_uid, signed_uid, tmp_path, "the signed SR")
    assert (signed_sr.CompletionFlag, signed_sr.VerificationFlag, signed_sr.PreliminaryFlag) == (
        "COMPLETE",
        "VERIFIED",
        "FINAL",
    )
    predecessor = signed_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == draft_uid
    assert read_report_text(signed_sr).impression == SIGNED_IMPRESSION

    # One draft for one set of jobs, every report SR sent, and the story in the audit trail.
    assert service.query("SELECT count(*) FROM report_drafts")[0][0] == 1
    wait_for(
        lambda: {state for (state,) in service.query("SELECT state FROM deliveries")} == {"SENT"},
        timeout=30,
        description="every delivery sent",
    )
    audit = {action for (action,) in service.query("SELECT action FROM audit_events")}
    assert {"report.drafted", "report.edited", "report.signed", "access.denied"} <= audit

    # Logging out ends the session: the study page sends the browser back to the login page.
    browser.find_element(By.ID, "logout").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    started = time.monotonic()
    browser.get(f"{base}/studies/{study_uid}")
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    assert time.monotonic() - started < TIMEOUT
