"""The admin console in headless Chromium: an administrator sees why a job failed and retries it.

The worklist app is served by uvicorn on a loopback port over a real SQLite
index, with a real Redis as the broker (a database of its own).  The study is
a small phantom CT indexed as the listener records it, whose job the real job
runner fails (its stored priority rules cannot be read).  The browser logs in
as an admin, opens the failed jobs, the study's timeline (received, queued,
failed, with the reason), clicks Retry, and sees the job queued; the index
has the retry audited with the admin's name and Redis has the job's message.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select, update

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Job, JobState
from pacs_ai.jobs.run import run_job
from pacs_ai.synthetic.phantom import write_chest_phantom
from pacs_ai.worklist import WorklistOptions, create_app
from tests.integration.worklist_study import ADMIN, UID_PREFIX, _index_series, _open_job, add_users
from tests.peers import free_port, wait_for
from tests.service import REDIS_TEST_URL


@pytest.fixture
def console(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The worklist on http://127.0.0.1:PORT with one study whose job failed."""
    broker = f"{REDIS_TEST_URL}/{random.randint(1, 15)}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(data_dir=tmp_path / "data", fsync=False, uid_prefix=UID_PREFIX, broker_url=broker)
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    add_users(sessions)
    write_chest_phantom(
        tmp_path / "ct", slices=6, size=64, pixel_spacing_mm=5.0, slice_spacing_mm=30.0, patient_id="E2E-ADM"
    )
    job_id = _open_job(sessions, _index_series(sessions, sorted((tmp_path / "ct").glob("*.dcm"))))
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(priority_rules=[{"when": "never"}]))
    run_job(settings, sessions, job_id)
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED
        study_uid = job.series.study.study_instance_uid

    port = free_port()
    app = create_app(settings, WorklistOptions(), sessions=sessions)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, description="the worklist to listen")
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "sessions": sessions,
            "job_id": job_id,
            "study_uid": study_uid,
            "broker": broker,
        }
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _appears(browser: Any, by: str, what: str) -> Any:
    """The element once the page that shows it has loaded (up to 20 s on a loaded machine)."""
    return WebDriverWait(browser, 20).until(expected_conditions.presence_of_element_located((by, what)))


def test_an_admin_sees_why_a_job_failed_in_the_timeline_and_retries_it(
    browser: Any, console: dict[str, Any], tmp_path: Path
) -> None:
    base, job_id = console["url"], console["job_id"]
    browser.get(f"{base}/admin/jobs?state=failed")  # not logged in: the login page, then back here
    browser.find_element(By.ID, "username").send_keys(ADMIN[0])
    browser.find_element(By.ID, "password").send_keys(ADMIN[2])
    browser.find_element(By.ID, "login-submit").click()
    # A click that submits a form returns before the next page is there: wait for what it shows.
    jobs = _appears(browser, By.ID, "job-list").text
    assert "priority rules cannot be read" in jobs

    browser.find_element(By.CSS_SELECTOR, "#job-list a").click()  # the study
    _appears(browser, By.ID, "timeline")
    rows = browser.find_elements(By.CSS_SELECTOR, "#timeline tr.timeline-step")
    stages = [row.find_elements(By.TAG_NAME, "td")[2].text for row in rows]
    assert stages[:1] == ["received"] and "queued" in stages and "failed" in stages, stages
    failed = rows[stages.index("failed")].text
    assert "priority rules cannot be read" in failed and f"job {job_id}" in failed
    browser.save_screenshot(str(tmp_path / "admin-study.png"))

    browser.find_element(By.ID, f"retry-{job_id}").click()
    assert f"Job {job_id}: analysis" in _appears(browser, By.CSS_SELECTOR, "p.flash").text
    assert browser.find_element(By.ID, f"job-{job_id}").get_attribute("class") == "job job-queued"
    with session_scope(console["sessions"]) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED and job.error is None
        retried = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.retried")).all()
        assert [(e.actor, e.object_uid) for e in retried] == [(ADMIN[0], str(job_id))]
    assert redis.Redis.from_url(console["broker"]).keys("cpu*"), "the retried job was not sent to the broker"
