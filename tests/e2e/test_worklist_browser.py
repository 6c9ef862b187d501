"""The worklist in headless Chromium: log in, open the study, see the overlay, edit, sign.

The study is a phantom CT analysed by the real job runner with a draft
recorded through ``create_draft_record`` (``tests/integration/worklist_study.py``);
the worklist runs in a real uvicorn server on a free loopback port, and
Debian's ``chromium`` is driven through ``chromium-driver`` by Selenium (no
browser download).  The test ends with the signed SR on disk, referencing the
draft, and its delivery to the study's destination queued.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Delivery, DeliveryState, Result
from pacs_ai.index.reports import ReportDraft, ReportStatus
from pacs_ai.worklist import create_app
from tests.integration.worklist_study import (
    DESTINATION,
    RADIOLOGIST,
    add_users,
    index_analysed_study,
    make_settings,
)
from tests.peers import LOOPBACK, free_port, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 30


def _require(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is missing: install the Debian package {package} (scripts/test installs it)")


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture()
def worklist(tmp_path: Path) -> Iterator[tuple[str, object, object]]:
    settings = make_settings(tmp_path / "data")
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    study = index_analysed_study(settings, sessions, tmp_path / "source")
    add_users(sessions)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, sessions=sessions), host=LOOPBACK, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: _healthy(base), timeout=20, description="the worklist server")
    try:
        yield base, sessions, study
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    _require(CHROMIUM, "chromium")
    _require(CHROMEDRIVER, "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def test_radiologist_logs_in_sees_the_overlay_edits_and_signs(worklist, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, sessions, study = worklist
    wait = WebDriverWait(browser, TIMEOUT)

    browser.get(f"{base}/")
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "username").send_keys(RADIOLOGIST[0])
    browser.find_element(By.ID, "password").send_keys(RADIOLOGIST[2])
    browser.find_element(By.ID, "login-submit").click()

    wait.until(expected_conditions.presence_of_element_located((By.ID, "worklist")))
    assert browser.find_element(By.ID, "current-user").text.startswith(RADIOLOGIST[0])
    browser.find_element(By.CSS_SELECTOR, "a.study-link").click()

    wait.until(expected_conditions.presence_of_element_located((By.ID, "accept-form")))
    images = browser.find_elements(By.CSS_SELECTOR, "img.key-image")
    assert len(images) == 2
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete", img) for img in images))
    widths = [browser.execute_script("return arguments[0].naturalWidth", img) for img in images]
    assert widths == [160, 160], "a key image did not load"
    # The same PNG, fetched with the browser's session cookie.
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    png = httpx.get(images[0].get_attribute("src"), cookies=cookies, timeout=TIMEOUT)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n") and len(png.content) > 1000
    browser.save_screenshot(str(tmp_path / "study.png"))

    findings = browser.find_element(By.ID, "findings")
    findings.send_keys("\n\nReviewed in the browser: volumes confirmed.")
    impression = browser.find_element(By.ID, "impression")
    impression.clear()
    impression.send_keys("No acute abnormality. Signed in the browser test.")
    browser.find_element(By.ID, "accept").click()

    wait.until(expected_conditions.presence_of_element_located((By.ID, "done")))
    assert "Report signed" in browser.find_element(By.ID, "done").text
    assert "volumes confirmed" in browser.find_element(By.ID, "signed-findings").text

    with session_scope(sessions) as session:  # type: ignore[attr-defined]
        draft = session.get(ReportDraft, study.draft.draft_id)
        assert draft is not None
        assert draft.status == ReportStatus.ACCEPTED and draft.edited
        result = session.scalar(select(Result).where(Result.sop_instance_uid == draft.signed_sr_uid))
        assert result is not None
        deliveries = [
            (d.destination, d.state)
            for d in session.scalars(select(Delivery).where(Delivery.result_fk == result.id))
        ]
        signed_path, draft_uid = Path(result.path), draft.draft_sr_uid
    assert deliveries == [(DESTINATION, DeliveryState.PENDING)]
    signed = pydicom.dcmread(signed_path)
    assert signed.VerificationFlag == "VERIFIED" and signed.PreliminaryFlag == "FINAL"
    reference = signed.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == draft_uid

    # Logging out ends the session: the study page sends the browser back to the login page.
    browser.find_element(By.ID, "logout").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    started = time.monotonic()
    browser.get(f"{base}/studies/{study.study_uid}")
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    assert time.monotonic() - started < TIMEOUT
