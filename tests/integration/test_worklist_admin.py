"""The admin console against a real index and a real Redis broker: pages, roles, CSRF, actions, audit.

Three studies in one index (SQLite, and a PostgreSQL server's database):

* analysed: a phantom CT analysed by the real job runner, with a report draft
  (``worklist_study.py``);
* failed: a phantom CT whose job the real job runner fails (its stored
  priority rules cannot be read), so the job has a failure reason;
* unmatched: a phantom CT the real router (``route_ready_series``) finds no
  profile for, so its series is unmatched with the router's reason.

The app is the real FastAPI app on that index (Starlette's TestClient); retry
and cancel hand their work to a real Redis (a database of its own), where the
message is looked for.

Every test runs on SQLite; on PostgreSQL those that touch what differs there:
the login throttle's upsert (every test logs in), the counts and timestamps of
status and the timeline, the jobs' state changes, the audit search's prefix and
date filters, and the locked draft a signature takes.  Pages that only read
what those wrote (the 403s, the worklist's failure reason, the rules tester)
run on SQLite only.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Instance, Job, JobState, RoutingState, Series, Study, utcnow
from pacs_ai.jobs.run import run_job
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.synthetic.phantom import write_chest_phantom
from pacs_ai.worklist import WorklistOptions, create_app
from tests.integration.worklist_study import (
    ADMIN,
    RADIOLOGIST,
    UID_PREFIX,
    _index_series,
    _open_job,
    add_users,
    index_analysed_study,
)
from tests.service import REDIS_TEST_URL, PostgresDatabase

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')

#: A test that reads what the dialect-specific code wrote, and runs on SQLite only (module docstring).
sqlite_only = pytest.mark.parametrize("env", ["sqlite"], indirect=True)


@dataclass(frozen=True)
class Env:
    settings: Settings
    sessions: sessionmaker[Session]
    analysed: str
    analysed_job: int
    failed: str
    failed_job: int
    unmatched: str
    broker: str


def _phantom_series(sessions: sessionmaker[Session], directory: Path, patient_id: str) -> int:
    write_chest_phantom(
        directory, slices=6, size=64, pixel_spacing_mm=5.0, slice_spacing_mm=30.0, patient_id=patient_id
    )
    return _index_series(sessions, sorted(directory.glob("*.dcm")))


def _study_of_series(sessions: sessionmaker[Session], series_id: int) -> str:
    with session_scope(sessions) as session:
        series = session.get(Series, series_id)
        assert series is not None
        return series.study.study_instance_uid


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("admin")
    broker = f"{REDIS_TEST_URL}/{random.randint(1, 15)}"
    redis.Redis.from_url(broker).flushdb()
    profiles = base / "profiles"
    profiles.mkdir()
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(PostgresDatabase()).url if request.param == "postgresql" else None
        yield _populate(base, broker, profiles, database)


def _populate(base: Path, broker: str, profiles: Path, database_url: str | None) -> Env:
    """The three studies of the module docstring in a fresh index."""
    settings = Settings(
        data_dir=base / "data",
        fsync=False,
        uid_prefix=UID_PREFIX,
        broker_url=broker,
        profiles_dir=profiles,
        database_url=database_url,
    )
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    analysed = index_analysed_study(settings, sessions, base / "analysed", patient_id="PHANTOM-ADM-1")
    add_users(sessions)

    failed_series = _phantom_series(sessions, base / "failed", "PHANTOM-ADM-2")
    failed_job = _open_job(sessions, failed_series)
    with session_scope(sessions) as session:  # what the profile stored cannot be read: the job fails
        session.execute(update(Job).where(Job.id == failed_job).values(priority_rules=[{"when": "never"}]))
    run_job(settings, sessions, failed_job)

    unmatched_series = _phantom_series(sessions, base / "unmatched", "PHANTOM-ADM-3")
    with session_scope(sessions) as session:
        session.execute(update(Instance).where(Instance.series_fk == unmatched_series).values(routed=False))
    with session_scope(sessions) as session:  # the real router, with no profile that matches
        route_ready_series(session, [], now=utcnow() + timedelta(minutes=10), default_quiet_seconds=1)
    env = Env(
        settings,
        sessions,
        analysed.study_uid,
        analysed.job_id,
        _study_of_series(sessions, failed_series),
        failed_job,
        _study_of_series(sessions, unmatched_series),
        broker,
    )
    with session_scope(sessions) as session:
        assert session.get(Job, failed_job).state == JobState.FAILED  # type: ignore[union-attr]
        routing = session.scalar(select(Series.routing_state).where(Series.id == unmatched_series))
        assert routing == RoutingState.UNMATCHED
    return env


@pytest.fixture(scope="module")
def app(env: Env):  # type: ignore[no-untyped-def]
    # Every TestClient comes from one address: no login throttle here (test_worklist_sessions.py has it).
    return create_app(env.settings, WorklistOptions(login_attempts_per_minute=10_000), sessions=env.sessions)


def _login(app, user: tuple[str, str, str]) -> tuple[TestClient, str]:  # type: ignore[no-untyped-def]
    client = TestClient(app)
    page = client.get("/login")
    token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    response = client.post(
        "/login", data={"username": user[0], "password": user[2], "csrf_token": token, "next": "/"}
    )
    assert response.status_code == 200, response.text
    return client, CSRF.search(response.text).group(1)  # type: ignore[union-attr]  # a fresh one per login


def _events(env: Env, action: str) -> list[AuditEvent]:
    with session_scope(env.sessions) as session:
        events = list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )
        session.expunge_all()
        return events


def _job_state(env: Env, job_id: int) -> JobState:
    with session_scope(env.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


@sqlite_only
def test_a_radiologist_gets_403_on_every_admin_page_and_action(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    client, token = _login(app, RADIOLOGIST)
    for path in (
        "/admin",
        "/admin/status",
        "/admin/studies",
        f"/admin/studies/{env.failed}",
        "/admin/jobs",
        f"/admin/rules?study={env.failed}",
        "/admin/audit",
        "/api/audit",
        "/api/admin/status",
        f"/api/admin/studies/{env.failed}/timeline",
    ):
        assert client.get(path).status_code == 403, path
    refused = client.post(f"/admin/jobs/{env.failed_job}/retry", data={"csrf_token": token})
    assert refused.status_code == 403 and "admin" in refused.text
    assert _job_state(env, env.failed_job) == JobState.FAILED
    denied = _events(env, "access.denied")[-1]
    assert denied.actor == RADIOLOGIST[0] and denied.detail["path"] == f"/admin/jobs/{env.failed_job}/retry"
    assert TestClient(app).get("/admin/studies", follow_redirects=False).status_code == 303  # not logged in


def test_status_studies_and_timeline_read_as_text(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    client, _ = _login(app, ADMIN)
    status = client.get("/admin/status")
    assert status.status_code == 200
    assert "Not running: no live" in status.text and "the service is not running" in status.text
    assert "AE title PACSAI" in status.text or "AE title" in status.text
    assert "{'" not in status.text and "\\u0027" not in status.text  # no Python or JSON reprs
    assert "0 series held for a resend, 0 incomplete (0 in the last 24 h)" in status.text
    assert client.get("/api/admin/status").json()["healthy"] is False

    everything = client.get("/admin/studies").text
    assert all(uid in everything for uid in (env.analysed, env.failed, env.unmatched))
    unmatched = client.get("/admin/studies", params={"show": "unmatched"}).text
    assert env.unmatched in unmatched and env.failed not in unmatched and env.analysed not in unmatched
    assert "no profiles are configured" in unmatched  # the router's reason, as it recorded it
    failed = client.get("/admin/studies", params={"show": "failed"}).text
    assert env.failed in failed and env.unmatched not in failed and "priority rules cannot be read" in failed

    page = client.get(f"/admin/studies/{env.analysed}").text
    stages = re.findall(r'class="timeline-step stage-([a-z-]+)', page)
    for stage in ("received", "routed", "queued", "analysed", "encoded", "drafted"):
        assert stage in stages, (stage, stages)
    assert (
        stages.index("received") < stages.index("queued") < stages.index("analysed") < stages.index("drafted")
    )
    timeline = client.get(f"/api/admin/studies/{env.analysed}/timeline").json()["timeline"]
    analysed = next(step for step in timeline if step["stage"] == "analysed")
    assert analysed["took_seconds"] > 0 and "analyze" in analysed["what"]

    failed_page = client.get(f"/admin/studies/{env.failed}").text
    assert f'id="retry-{env.failed_job}"' in failed_page and "priority rules cannot be read" in failed_page
    assert "stage-failed" in failed_page
    assert _events(env, "admin.study_view")[-1].actor == ADMIN[0]


@sqlite_only
def test_a_failed_study_says_why_on_the_worklist(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    client, _ = _login(app, RADIOLOGIST)
    worklist = client.get("/").text
    assert "priority rules cannot be read" in worklist
    page = client.get(f"/studies/{env.failed}").text
    assert 'id="analysis-failed"' in page and "priority rules cannot be read" in page
    assert "No report draft for this study yet." not in page


@sqlite_only
def test_the_rules_tester_explains_each_series(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    client, _ = _login(app, ADMIN)
    assert "No rules file" in client.get("/admin/rules", params={"study": env.unmatched}).text
    (env.settings.profiles_dir / "rules.yaml").write_text(
        "rules:\n"
        "  - name: chest-ct\n"
        "    when: {attribute: Modality, equals: CT}\n"
        "    actions: [{forward_originals: [pacs]}]\n"
        "  - name: never-mr\n"
        "    when: {attribute: Modality, equals: MR}\n"
        '    actions: [{discard: "no MR service"}]\n',
        encoding="utf-8",
    )
    try:
        page = client.get("/admin/rules", params={"study": env.unmatched}).text
        assert "Rules that apply: <strong>chest-ct</strong>" in page and "never-mr" in page
        missing = client.get("/admin/rules", params={"study": "1.2.3.4.nothing"}).text
        assert "No study 1.2.3.4.nothing" in missing
    finally:
        (env.settings.profiles_dir / "rules.yaml").unlink()


def test_retry_cancel_and_reprocess_are_csrf_checked_audited_and_reach_the_broker(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    client, token = _login(app, ADMIN)
    retry = f"/admin/jobs/{env.failed_job}/retry"
    assert client.post(retry, data={"csrf_token": "forged"}).status_code == 403
    assert client.post(retry).status_code == 403
    assert _job_state(env, env.failed_job) == JobState.FAILED

    broker = redis.Redis.from_url(env.broker)
    done = client.post(retry, data={"csrf_token": token})
    assert (
        done.status_code == 200 and f"Job {env.failed_job}: analysis" in done.text
    )  # back on the study page
    assert _job_state(env, env.failed_job) == JobState.QUEUED
    retried = _events(env, "job.retried")[-1]
    assert retried.actor == ADMIN[0] and retried.object_uid == str(env.failed_job)
    queued = broker.keys("cpu*")
    assert queued, broker.keys()  # the job's message waits in the cpu queue

    cancel = f"/admin/jobs/{env.failed_job}/cancel"
    assert client.post(cancel, data={"csrf_token": "forged"}).status_code == 403
    cancelled = client.post(cancel, data={"csrf_token": token})
    assert cancelled.status_code == 200 and f"Job {env.failed_job}: cancelled." in cancelled.text
    assert _job_state(env, env.failed_job) == JobState.CANCELLED
    assert _events(env, "job.cancelled")[-1].actor == ADMIN[0]
    again = client.post(cancel, data={"csrf_token": token})
    assert "not cancelled: job is cancelled" in again.text

    reprocess = f"/admin/studies/{env.unmatched}/reprocess"
    assert client.post(reprocess, data={"csrf_token": "forged"}).status_code == 403
    reopened = client.post(reprocess, data={"csrf_token": token})
    assert reopened.status_code == 200 and "Reopened 1 series (6 instances)" in reopened.text
    event = _events(env, "study.reprocess")[-1]
    assert event.actor == ADMIN[0] and event.object_uid == env.unmatched
    with session_scope(env.sessions) as session:
        series_ids = select(Series.id).join(Study).where(Study.study_instance_uid == env.unmatched)
        assert not any(session.scalars(select(Instance.routed).where(Instance.series_fk.in_(series_ids))))


def test_audit_search_is_written_for_people(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    radiologist, _ = _login(app, RADIOLOGIST)
    assert radiologist.get("/admin/audit").status_code == 403  # an access.denied event to search for
    client, token = _login(app, ADMIN)
    # A reason with quotes, as a job error or a rejection reason may have.
    with session_scope(env.sessions) as session:
        record_audit(
            session,
            actor="worker",
            action="job.failed",
            object_type="series",
            object_uid="1.2.3.quoted",
            detail={"job": 99, "reason": "input: the series' slices can't be <stacked>"},
        )
    page = client.get("/admin/audit", params={"action": "job.*", "object": "1.2.3.quoted"})
    assert page.status_code == 200
    rows = re.findall(r'<tr class="audit-event">(.*?)</tr>', page.text, re.S)
    assert len(rows) == 1
    assert "job: 99; reason: input: the series&#39; slices can&#39;t be &lt;stacked&gt;" in rows[0]
    assert "\\u0027" not in page.text and "{&#34;" not in page.text and '{"' not in rows[0]
    by_user = client.get("/admin/audit", params={"actor": RADIOLOGIST[0], "action": "access.denied"}).text
    assert by_user.count('class="audit-event"') >= 1 and "path: /admin" in by_user
    later = (utcnow() + timedelta(days=1)).strftime("%Y-%m-%d")
    assert 'class="audit-event"' not in client.get("/admin/audit", params={"since": later}).text
    bad = client.get("/admin/audit", params={"since": "yesterday"})
    assert bad.status_code == 400 and "is not a date" in bad.text
    api = client.get("/api/audit", params={"action": "job.failed", "object": "1.2.3.quoted"}).json()["events"]
    assert [e["detail"]["job"] for e in api] == [99]
    assert _events(env, "audit.view")[-1].actor == ADMIN[0]


def test_the_timeline_ends_with_the_signature(app, env: Env) -> None:  # type: ignore[no-untyped-def]
    radiologist = TestClient(app)
    token = radiologist.post(
        "/api/login", json={"username": RADIOLOGIST[0], "password": RADIOLOGIST[2]}
    ).json()
    draft = radiologist.get(f"/api/studies/{env.analysed}").json()["draft"]
    signed = radiologist.post(
        f"/api/studies/{env.analysed}/accept",
        json={"draft_id": draft["id"]},
        headers={"X-CSRF-Token": token["csrf_token"]},
    )
    assert signed.status_code == 200, signed.text
    admin, _ = _login(app, ADMIN)
    timeline = admin.get(f"/api/admin/studies/{env.analysed}/timeline").json()["timeline"]
    assert timeline[-1]["stage"] == "signed" and f"signed by {RADIOLOGIST[0]}" in timeline[-1]["what"]
    assert timeline[-1]["took_seconds"] > 0  # from the draft to the signature
