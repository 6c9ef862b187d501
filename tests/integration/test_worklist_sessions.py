"""Worklist sessions kept on the server: logout and disabling end them; logins throttled, locked out.

The real app on a real SQLite index (schema by the migrations), driven with
Starlette's TestClient; ``client=`` gives each client the address a proxy or
a browser would have.  The shared login throttle is tested on two real web
processes (uvicorn) sharing the index.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent
from pacs_ai.index.reports import WorklistSession
from pacs_ai.worklist import WorklistOptions, create_app
from pacs_ai.worklist.server import run_worklist
from pacs_ai.worklist.users import set_active
from tests.integration.worklist_study import ADMIN, RADIOLOGIST, add_users, make_settings
from tests.peers import free_port, wait_for

COOKIE = "pacs_ai_worklist"
Index = tuple[Path, sessionmaker[Session]]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    data_dir = tmp_path_factory.mktemp("sessions")
    settings = make_settings(data_dir)
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    add_users(sessions)
    return data_dir, sessions


def _app(index: tuple[Path, sessionmaker[Session]], **options: Any) -> FastAPI:
    data_dir, sessions = index
    return create_app(make_settings(data_dir), WorklistOptions(**options), sessions=sessions)


def _login(client: TestClient, user: tuple[str, str, str], password: str | None = None) -> Response:
    return client.post("/api/login", json={"username": user[0], "password": password or user[2]})


def _actions(sessions: sessionmaker[Session], actor: str) -> list[str]:
    with session_scope(sessions) as db:
        return list(
            db.scalars(select(AuditEvent.action).where(AuditEvent.actor == actor).order_by(AuditEvent.id))
        )


def test_logout_revokes_the_session_also_for_a_copy_of_the_cookie(index: Index) -> None:
    app = _app(index)
    browser, thief = TestClient(app), TestClient(app)
    token = _login(browser, RADIOLOGIST).json()["csrf_token"]
    thief.cookies.set(COOKIE, browser.cookies[COOKIE])
    assert thief.get("/api/worklist").status_code == 200
    assert browser.post("/api/logout", headers={"X-CSRF-Token": token}).status_code == 200
    assert thief.get("/api/worklist").status_code == 401
    with session_scope(index[1]) as db:
        reasons = db.scalars(
            select(WorklistSession.revoked_reason).where(WorklistSession.revoked_at.is_not(None))
        )
        assert "logout" in list(reasons)


def test_disabling_a_user_revokes_their_sessions_for_good(index: Index) -> None:
    app = _app(index)
    client = TestClient(app)
    assert _login(client, ADMIN).status_code == 200
    cookie = client.cookies[COOKIE]
    with session_scope(index[1]) as db:
        set_active(db, ADMIN[0], False)
    try:
        assert client.get("/api/worklist").status_code == 401
        with session_scope(index[1]) as db:
            set_active(db, ADMIN[0], True)
        replay = TestClient(app)
        replay.cookies.set(COOKIE, cookie)
        assert replay.get("/api/worklist").status_code == 401  # enabled again, the old session stays ended
    finally:
        with session_scope(index[1]) as db:
            set_active(db, ADMIN[0], True)


def test_repeated_failures_lock_the_user_name_for_a_while(index: Index) -> None:
    app = _app(index, lockout_failures=3, lockout_minutes=0.05)
    client = TestClient(app)
    for _ in range(3):
        assert _login(client, RADIOLOGIST, "not the password").status_code == 401
    locked = _login(client, RADIOLOGIST)  # the right password, while locked
    assert locked.status_code == 401 and "locked" in locked.json()["detail"]
    assert _actions(index[1], RADIOLOGIST[0])[-4:] == [
        "auth.login_failed",
        "auth.login_failed",
        "auth.locked_out",
        "auth.locked_out",
    ]
    time.sleep(3.5)
    assert _login(client, RADIOLOGIST).status_code == 200


def test_logins_from_one_address_are_throttled(index: Index) -> None:
    app = _app(index, login_attempts_per_minute=3)
    client = TestClient(app, client=("10.0.0.7", 40000))
    answers = [_login(client, ("nobody", "", "x")).status_code for _ in range(4)]
    assert answers == [401, 401, 401, 429]
    assert _login(client, RADIOLOGIST).status_code == 429  # the right password does not get through either
    assert _actions(index[1], "nobody")[-1] == "auth.throttled"
    assert _login(TestClient(app, client=("10.0.0.8", 40000)), RADIOLOGIST).status_code == 200


def test_the_cookie_is_secure_behind_a_trusted_tls_proxy_only(index: Index) -> None:
    app = _app(index, trusted_proxies=("127.0.0.0/8",))
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.2.3.4"}

    def cookie_of(client: TestClient, headers: dict[str, str]) -> str:
        response = client.post(
            "/api/login", json={"username": RADIOLOGIST[0], "password": RADIOLOGIST[2]}, headers=headers
        )
        assert response.status_code == 200
        return response.headers["set-cookie"].lower()

    assert "secure" in cookie_of(TestClient(app, client=("127.0.0.1", 1)), https)
    assert "secure" not in cookie_of(TestClient(app, client=("10.9.9.9", 1)), https)  # not a trusted proxy
    assert "secure" not in cookie_of(TestClient(app, client=("127.0.0.1", 1)), {})
    assert "secure" in cookie_of(TestClient(_app(index, secure_cookies=True), client=("10.9.9.9", 1)), {})


def test_the_login_limit_holds_across_two_web_processes(index: Index) -> None:
    """Two worklist processes (uvicorn, own ports, one index): one count per address for both."""
    data_dir, sessions = index
    ports = [free_port(), free_port()]
    # Behind a TLS proxy on this host, as in production: the address counted is the forwarded one.
    options = WorklistOptions(login_attempts_per_minute=4, trusted_proxies=("127.0.0.0/8",))
    # Fresh interpreters, as `pacs-ai worklist` starts them: a fork of this many-threaded test process
    # (torch, storage clients) can inherit a lock another thread held and hang (seen once in CI).
    spawn = multiprocessing.get_context("spawn")
    web = [
        spawn.Process(
            target=run_worklist,
            args=(make_settings(data_dir), options),
            kwargs={"host": "127.0.0.1", "port": port},
            daemon=True,
        )
        for port in ports
    ]
    for process in web:
        process.start()
    try:
        for port in ports:
            wait_for(lambda port=port: _answers(port), timeout=60, description=f"worklist on {port}")

        def login(attempt: int, user: tuple[str, str, str]) -> int:
            url = f"http://127.0.0.1:{ports[attempt % 2]}/api/login"
            body = {"username": user[0], "password": user[2]}
            forwarded = {"X-Forwarded-For": "10.66.0.1"}
            return httpx.post(url, json=body, headers=forwarded, timeout=30).status_code

        # Alternating between the processes: each saw only three, the address made six.
        answers = [login(attempt, ("intruder", "", "guess")) for attempt in range(6)]
        assert answers == [401, 401, 401, 401, 429, 429]
        assert login(0, RADIOLOGIST) == 429 and login(1, RADIOLOGIST) == 429
        assert _actions(sessions, "intruder")[-2:] == ["auth.throttled", "auth.throttled"]
    finally:
        for process in web:
            process.terminate()
        for process in web:
            process.join(15)
    assert not any(process.is_alive() for process in web)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/login", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
