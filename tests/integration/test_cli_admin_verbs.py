"""CLI output (text and ``--json``) and exit codes of ``status``, ``studies``, ``jobs``, ``purge`` and the
administrator verbs, on an index filled by the real components (no running service).

The index holds four studies:

* ``delivered``: received by the listener's store handler from ``ARCHIVED_SCU``, routed by a rule that
  forwards the originals to a folder destination, delivered (SENT);
* ``undelivered``: from ``NO_PACS_SCU``, forwarded to a DICOM destination nobody listens on (FAILED);
* ``receiving``: from ``LATE_SCU``, stored but not routed yet;
* ``analysed``: a phantom CT analysed by the real job runner, with an AI report draft awaiting sign-off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_ai.config import Settings
from pacs_ai.dispatch.delivery import attempt_delivery
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.ingest import Sender
from pacs_ai.index.models import AuditEvent, Delivery, Instance, Series, Study, utcnow
from pacs_ai.receive.store import StoreHandler
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.route.rules import load_rules
from pacs_ai.storage.files import HostFiles
from pacs_ai.storage.keys import spool_path
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.test_cli import REPO_ROOT, pacs_ai_in_process
from tests.integration.worklist_study import UID_PREFIX, index_analysed_study
from tests.retention_setup import RULES_WITH_DISCARD_FALLBACK, archive_and_down_destinations


@dataclass(frozen=True)
class Index:
    data_dir: Path
    env: dict[str, str]
    delivered: str
    undelivered: str
    receiving: str
    analysed: str
    analysed_job: int

    def run(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """``pacs-ai ARGS`` in this process, with only this index's settings in the environment.

        The verbs' output and exit codes are under test, not the interpreter's start-up (seconds of
        CPU a run; tests/integration/test_cli.py runs the real process, ``status`` among its verbs).
        """
        return pacs_ai_in_process(*args, **self.env, **extra_env)


def _receive(handler: StoreHandler, source: Path, ae_title: str, accession: str) -> str:
    """Write a small phantom study and store each file through the listener's store handler."""
    study_uid = generate_uid(prefix=UID_PREFIX)
    write_chest_phantom(
        source,
        slices=3,
        size=64,
        pixel_spacing_mm=4.0,
        slice_spacing_mm=5.0,
        accession_number=accession,
        study_uid=study_uid,
    )
    for path in sorted(source.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        temporary = handler.spool.tmp_dir / path.name
        shutil.copyfile(path, temporary)
        status, comment = handler.store(
            temporary,
            sender=Sender(ae_title, "127.0.0.1"),
            sop_class=str(header.SOPClassUID),
            sop_instance=str(header.SOPInstanceUID),
        )
        temporary.unlink(missing_ok=True)
        assert status == 0, comment
    return study_uid


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    root = tmp_path_factory.mktemp("cli-admin")
    data_dir = root / "data"
    profiles = root / "profiles"
    shutil.copytree(REPO_ROOT / "dicom_profiles", profiles)
    (profiles / "rules.yaml").write_text(RULES_WITH_DISCARD_FALLBACK, encoding="utf-8")
    destinations = {
        **archive_and_down_destinations(root),
        "pacs": {"type": "folder", "path": str(root / "pacs")},
    }
    settings = Settings(
        data_dir=data_dir,
        fsync=False,
        uid_prefix=UID_PREFIX,
        profiles_dir=profiles,
        destinations=destinations,  # type: ignore[arg-type]
        min_free_disk_mb=0,
    )
    upgrade_schema(settings.effective_database_url)
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    handler = StoreHandler(settings)
    delivered = _receive(handler, root / "src-delivered", "ARCHIVED_SCU", "ACC-DELIVERED")
    undelivered = _receive(handler, root / "src-undelivered", "NO_PACS_SCU", "ACC-UNDELIVERED")
    with session_scope(sessions) as session:
        routing = route_ready_series(
            session,
            [],
            now=utcnow() + timedelta(seconds=5),
            default_quiet_seconds=1,
            rules=load_rules(profiles / "rules.yaml"),
            files=HostFiles(settings),
        )
    assert len(routing.new_deliveries) == 6
    for delivery_id in routing.new_deliveries:
        attempt_delivery(settings, sessions, delivery_id)
    receiving = _receive(handler, root / "src-receiving", "LATE_SCU", "ACC-RECEIVING")
    analysed = index_analysed_study(settings, sessions, root / "src-analysed", patient_id="PHANTOM-CLI")
    env = {
        "PACS_AI_DATA_DIR": str(data_dir),
        "PACS_AI_PROFILES_DIR": str(profiles),
        "PACS_AI_DESTINATIONS": json.dumps(destinations),
        "PACS_AI_FSYNC": "false",
        "PACS_AI_UID_PREFIX": UID_PREFIX,
        "COLUMNS": "300",  # whole UIDs in rich tables
    }
    return Index(data_dir, env, delivered, undelivered, receiving, analysed.study_uid, analysed.job_id)


def as_json(result: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert result.returncode == code, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_studies_list_and_show(index: Index) -> None:
    listed = as_json(index.run("studies", "list", "--json"))
    assert {row["study_instance_uid"] for row in listed} == {
        index.delivered,
        index.undelivered,
        index.receiving,
        index.analysed,
    }
    text = index.run("studies", "list")
    assert text.returncode == 0 and "ACC-DELIVERED" in text.stdout and "Phantom" not in text.stdout

    shown = as_json(index.run("studies", "show", "ACC-UNDELIVERED", "--json"))
    assert shown["study"]["study_instance_uid"] == index.undelivered
    [series] = shown["series"]
    assert series["routing_state"] == "routed" and series["instances"] == 3
    assert "no-pacs" in series["routing_detail"]
    [job] = shown["jobs"]
    assert job["analyzer"] == "forward" and job["state"] == "succeeded" and job["rule"] == "no-pacs"
    assert [r["kind"] for r in shown["results"]] == ["ORIGINAL"] * 3
    assert {d["state"] for r in shown["results"] for d in r["deliveries"]} == {"failed"}
    assert shown["drafts"] == []
    assert "Phantom" not in json.dumps(shown), "no patient name"

    analysed = as_json(index.run("studies", "show", index.analysed, "--json"))
    [job] = analysed["jobs"]
    assert job["state"] == "succeeded" and job["timings"] and job["started_at"]
    assert {r["kind"] for r in analysed["results"]} >= {"SEG"}
    assert [d["status"] for d in analysed["drafts"]] == ["draft"]
    text = index.run("studies", "show", index.analysed)
    assert text.returncode == 0
    for heading in ("Series", "Jobs", "Results", "Report drafts", "ai_priority"):
        assert heading in text.stdout

    unknown = index.run("studies", "show", "1.2.3.999")
    assert unknown.returncode == 1 and "no study" in unknown.stdout


def test_jobs_list_retry_cancel_send_echo_audit(index: Index) -> None:
    failed = as_json(index.run("jobs", "list", "--state", "failed", "--json"))
    assert [row["deliveries"] for row in failed] == [{"failed": 3}]
    assert "delivery to down failed" in failed[0]["error"]
    assert "forward" in index.run("jobs", "list").stdout

    assert index.run("retry", "4242").returncode == 1
    assert as_json(index.run("retry", "4242", "--json"), 1)["unknown_jobs"] == [4242]
    cancelled = as_json(index.run("cancel", str(index.analysed_job), "--json"), 1)
    assert cancelled == [{"job": index.analysed_job, "cancelled": False, "reason": "job is succeeded"}]
    assert "not cancelled" in index.run("cancel", "999").stdout

    assert index.run("send", "1.2.3.4.5").returncode == 1
    assert index.run("send", "ACC-DELIVERED", "--to", "nowhere").returncode == 1

    ok = as_json(index.run("echo", "archive", "--json"))
    assert ok["ok"] is True and ok["error"] is None
    assert "ok" in index.run("echo", "archive").stdout
    down = as_json(index.run("echo", "down", "--json"), 1)
    assert down["ok"] is False and down["error"]
    assert index.run("echo", "neither-a-name-nor-an-address").returncode == 2

    forwarded = as_json(index.run("audit", "--action", "series.forwarded", "--json"))
    assert len(forwarded) == 2 and {e["actor"] for e in forwarded} == {"router"}
    assert "series.forwarded" in index.run("audit", "--action", "series.*").stdout


def test_models_list_on_an_empty_registry(index: Index) -> None:
    assert as_json(index.run("models", "list", "--json")) == []
    assert index.run("models", "list").returncode == 0


def test_status_when_the_service_is_not_running(index: Index) -> None:
    result = index.run("status", "--json")
    report = as_json(result, 1)
    assert report["healthy"] is False and report["service"] is None
    assert any("not running" in problem for problem in report["problems"])
    assert report["listener"]["running"] is False and report["listener"]["accepting"] is False
    assert report["broker"]["reachable"] is False and report["broker"]["error"]
    assert report["queues"] == {"cpu": None, "gpu": None, "dispatch": None}
    assert report["index"]["studies"] == 4
    assert report["deliveries"]["failed"] == 3 and report["deliveries"]["sent"] == 3
    assert report["disk"]["refuse_associations_below_mb"] == 1024
    assert report["disk"]["free_mb"] == report["free_disk_mb"] > 0
    text = index.run("status")
    assert text.returncode == 1
    assert "not running" in text.stdout and "broker:" in text.stdout and "problem" in text.stdout

    refusing = index.run("status", "--json", PACS_AI_REFUSE_ASSOCIATIONS_BELOW_FREE_MB=str(10**9))
    reason = as_json(refusing, 1)["listener"]["refusing_reason"]
    assert "nearly full" in reason


def test_purge_dry_run_then_purge_keeps_what_is_still_needed(index: Index) -> None:
    assert index.run("purge").returncode == 2, "no retention limit configured or given"

    dry = as_json(index.run("purge", "--older-than", "0", "--dry-run", "--json"))
    assert dry["dry_run"] is True
    assert [s["study_instance_uid"] for s in dry["purged"]] == [index.delivered]
    kept = {s["study_instance_uid"]: s["kept_because"] for s in dry["kept"]}
    assert kept[index.undelivered] == ["undelivered results (3 failed deliveries)"]
    assert kept[index.receiving] == ["still receiving (3 instance(s) not routed yet)"]
    assert any("awaiting sign-off" in reason for reason in kept[index.analysed])
    spool_files = sorted((index.data_dir / "spool").rglob("*.dcm"))
    assert len(spool_files) == 9, "a dry run deletes nothing"
    text = index.run("purge", "--older-than", "0", "--dry-run")
    assert text.returncode == 0 and "would purge" in text.stdout and "undelivered results" in text.stdout

    # One file of the delivered study cannot be deleted (a directory took its name): exit 1, the rest goes.
    engine = make_engine(f"sqlite:///{index.data_dir / 'index.sqlite3'}")
    with engine.connect() as connection:
        paths = [
            spool_path(index.data_dir / "spool", key)
            for key in connection.execute(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_fk)
                .join(Study, Study.id == Series.study_fk)
                .where(Study.study_instance_uid == index.delivered)
                .order_by(Instance.id)
            ).scalars()
        ]
    blocked = paths[0]
    blocked.unlink()
    blocked.mkdir()
    result = index.run("purge", "--older-than", "0", "--json")
    run = as_json(result, 1)
    [purged] = run["purged"]
    assert purged["study_instance_uid"] == index.delivered and purged["instances"] == 2
    assert purged["problems"] and str(blocked) in purged["problems"][0]
    assert not any(Path(p).exists() for p in paths[1:])
    assert all(Path(p).exists() for p in _paths_of(engine, index.undelivered))

    blocked.rmdir()
    again = index.run("purge", "--older-than", "0")
    assert again.returncode == 0, again.stdout
    assert "purged " + index.delivered in again.stdout and "3 kept" in again.stdout

    with make_session_factory(engine)() as session:
        rows = session.execute(
            select(Instance.purged_at, Instance.path)
            .join(Series, Series.id == Instance.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .where(Study.study_instance_uid == index.delivered)
        ).all()
        assert len(rows) == 3 and all(at is not None for at, _ in rows), "rows stay, marked purged"
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "study.purged")))
        assert [e.object_uid for e in events] == [index.delivered, index.delivered]
        assert sorted(e.detail["instances"] for e in events if e.detail) == [1, 2]
        assert session.scalar(select(Delivery.state).where(Delivery.destination == "archive")) == "sent"
    assert not (index.data_dir / "spool" / index.delivered).exists(), "empty study directory removed"

    shown = as_json(index.run("studies", "show", index.delivered, "--json"))
    assert shown["series"][0]["purged_instances"] == 3
    assert as_json(index.run("status", "--json"), 1)["purged_instances"] == 3
    nothing = as_json(index.run("purge", "--older-than", "0", "--json"))
    assert nothing["purged"] == [] and len(nothing["kept"]) == 3


def _paths_of(engine: Any, study_uid: str) -> list[Path]:
    """The spool files of a study's instances (the index records their storage keys)."""
    spool = Path(str(engine.url.database)).parent / "spool"
    with engine.connect() as connection:
        return [
            spool_path(spool, key)
            for key in connection.execute(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_fk)
                .join(Study, Study.id == Series.study_fk)
                .where(Study.study_instance_uid == study_uid)
            ).scalars()
        ]
