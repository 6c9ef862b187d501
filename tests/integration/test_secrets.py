"""Secrets: kept out of child environments, audit records and logs; webhooks signed with HMAC."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from pacs_ai.config import SETTINGS_FILE_ENV, Settings, load_settings
from pacs_ai.dispatch.webhook import SIGNATURE_HEADER, post_webhook, verify_signature, webhook_key
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent
from pacs_ai.redact import redact_text
from pacs_ai.report.drafters import DrafterConfig, DrafterError
from pacs_ai.report.pipeline import ReportPipeline
from pacs_ai.worklist.server import worklist_options
from tests.integration.test_drafter_backends import (  # noqa: F401 (the tiny model fixture)
    VOCABULARY,
    tiny_model_dir,
)
from tests.peers import caddy_bearer_proxy

DB_PASSWORD = "db-pw-7f3a9c"
BROKER_PASSWORD = "broker-pw-51be"
S3_SECRET = "s3-secret-0d2e8f"
FHIR_TOKEN = "fhir-token-a8c1"
STOW_PASSWORD = "stow-pw-93d7"
WEBHOOK_SECRET = "webhook-key-that-is-long-enough-4c2b"
SECRETS = (DB_PASSWORD, BROKER_PASSWORD, S3_SECRET, FHIR_TOKEN, STOW_PASSWORD, WEBHOOK_SECRET)


def _settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=f"postgresql+psycopg://pacs:{DB_PASSWORD}@127.0.0.1:5432/pacs",
        broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:6379/0",
        storage_s3_secret_access_key=S3_SECRET,
        worklist_fhir_bearer_token=FHIR_TOKEN,
        webhook_signing_secret=WEBHOOK_SECRET,
        destinations={
            "web": {
                "type": "dicomweb",
                "url": "https://pacs.example/dicom-web",
                "username": "u",
                "password": STOW_PASSWORD,
            }
        },
    )


def test_secrets_are_masked_in_the_settings_repr(tmp_path):
    text = repr(_settings(tmp_path)) + _settings(tmp_path).model_dump_json()
    assert not [secret for secret in SECRETS if secret in text]


def test_a_child_gets_identical_settings_without_secrets_in_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS_AI_DATABASE_URL", f"postgresql+psycopg://pacs:{DB_PASSWORD}@db/pacs")
    settings = _settings(tmp_path)
    env = settings.child_environment()
    settings_file = Path(env[SETTINGS_FILE_ENV])
    assert settings_file.stat().st_mode & 0o777 == 0o600
    assert "PACS_AI_DATABASE_URL" not in env and "PACS_AI_SETTINGS_JSON" not in env
    assert not [secret for secret in SECRETS if secret in json.dumps(env)]
    # A real child: once it has its settings it waits until the parent has read its /proc/PID/environ.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pacs_ai.config import load_settings; s = load_settings(); "
            "print('ready', flush=True); sys.stdin.readline(); print(s.effective_database_url)",
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    environ = Path(f"/proc/{child.pid}/environ").read_bytes().decode("utf-8", "replace")
    output, _ = child.communicate("go\n", timeout=60)
    assert child.returncode == 0
    assert SETTINGS_FILE_ENV in environ
    assert not [secret for secret in SECRETS if secret in environ]
    assert output.strip() == f"postgresql+psycopg://pacs:{DB_PASSWORD}@127.0.0.1:5432/pacs"
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(settings_file))
    assert load_settings() == settings  # SecretStr compares the secret values


def test_audit_details_are_redacted(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    upgrade_schema(url)
    sessions = make_session_factory(make_engine(url))
    with session_scope(sessions) as session:
        record_audit(
            session,
            actor="dispatcher",
            action="notify.failed",
            object_type="series",
            detail={
                "url": "https://ris.example/hooks/ai?token=hook-token-1",
                "error": "Max retries exceeded with url: /hooks/ai?token=hook-token-1",
                "bearer_token": FHIR_TOKEN,
                "guardrails_passed": True,
            },
        )
    with session_scope(sessions) as session:
        detail = session.scalars(select(AuditEvent.detail)).one()
    assert detail["url"] == "https://ris.example/hooks/ai?token=***"
    assert "hook-token-1" not in json.dumps(detail) and FHIR_TOKEN not in json.dumps(detail)
    assert detail["guardrails_passed"] is True


def test_url_passwords_and_query_values_are_redacted():
    assert redact_text("redis://:pw@host:6379/0 and https://u:pw2@h/p?a=1&token=x#f") == (
        "redis://:***@host:6379/0 and https://u:***@h/p?a=***&token=***#f"
    )


class _Receiver:
    """A webhook receiver on 127.0.0.1 that keeps each call's headers and raw body."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                calls.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ai?token=hook-token-2"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = _Receiver()
    yield receiver
    receiver.close()


def test_webhooks_carry_a_verifiable_hmac_signature(tmp_path, receiver):
    settings = _settings(tmp_path)
    payload = {"series_instance_uid": "1.2.3", "rule": "chest-ct"}
    post_webhook(receiver.url, payload, webhook_key(settings))
    [(headers, body)] = receiver.calls
    assert json.loads(body) == payload
    assert headers[SIGNATURE_HEADER].startswith("sha256=")
    assert verify_signature(WEBHOOK_SECRET, headers, body)
    assert not verify_signature(WEBHOOK_SECRET, headers, body.replace(b"1.2.3", b"1.2.4"))
    assert not verify_signature("another key of at least thirty-two chars", headers, body)


def test_the_signing_key_is_kept_in_the_data_dir_when_not_set(tmp_path):
    settings = Settings(data_dir=tmp_path)
    key = webhook_key(settings)
    assert len(key) >= 32 and webhook_key(settings) == key
    assert (tmp_path / "webhook-signing.key").stat().st_mode & 0o777 == 0o600


def test_the_llm_api_key_setting_reaches_the_openai_endpoint_only(
    tmp_path,
    tiny_model_dir,  # noqa: F811 (the fixture imported above)
    model_server,
    caplog,
):
    """``transformers serve`` (the session's, tests/integration/conftest.py) behind Caddy, which passes on
    only requests that carry the key.

    The draft comes back through the proxy with the key of ``report_llm_api_key``, Caddy's access log
    shows the header it got, a wrong key is refused there (HTTP 401), and neither key is in our logs,
    the error that becomes the draft's fallback reason (stored and audited), the settings' repr or a
    child's environment.
    """
    key, wrong_key = "llm-key-5e0a", "another-key-77c1"
    proxy_dir = tmp_path / "caddy"
    proxy_dir.mkdir()

    def drafter(settings: Settings, base_url: str) -> Any:
        sessions = make_session_factory(make_engine(settings.effective_database_url))
        pipeline = ReportPipeline(settings, sessions)
        params = {"base_url": base_url, "model": str(tiny_model_dir), "max_tokens": 4, "max_retries": 0}
        return pipeline.drafter_for(DrafterConfig(backend="openai", params=params))

    settings = Settings(data_dir=tmp_path, report_llm_api_key=key)
    with (
        caddy_bearer_proxy(urlsplit(model_server).netloc, key, proxy_dir) as (proxy, access_log),
        caplog.at_level(logging.DEBUG),
    ):
        answer = drafter(settings, f"{proxy}/v1").complete("Small left pleural effusion.")
        wrong_settings = settings.model_copy(update={"report_llm_api_key": wrong_key})
        refused_drafter = drafter(wrong_settings, f"{proxy}/v1")
        with pytest.raises(DrafterError, match="HTTP 401") as refused:
            refused_drafter.complete("Small left pleural effusion.")
    assert answer.split() and set(answer.split()) <= set(VOCABULARY)  # the tiny model's own words
    seen = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert [(r["request"]["uri"], r["status"], r["request"]["headers"]["Authorization"]) for r in seen] == [
        ("/v1/chat/completions", 200, [f"Bearer {key}"]),
        ("/v1/chat/completions", 401, [f"Bearer {wrong_key}"]),
    ]
    assert "/v1/chat/completions" in caplog.text  # the requests were logged, without their key
    assert key not in caplog.text and wrong_key not in caplog.text and wrong_key not in str(refused.value)
    assert key not in repr(settings) and key not in json.dumps(settings.child_environment())


def test_the_worklist_takes_its_fhir_token_and_session_key_from_the_secret_settings(tmp_path):
    options = worklist_options(
        _settings(tmp_path).model_copy(update={"worklist_session_secret": WEBHOOK_SECRET})
    )
    assert (options.fhir_bearer_token, options.secret_key) == (FHIR_TOKEN, WEBHOOK_SECRET)
    assert FHIR_TOKEN not in repr(_settings(tmp_path))
