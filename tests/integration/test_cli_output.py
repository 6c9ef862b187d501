"""Listings can be copied from (issue 23, item 5): whole UIDs through a pipe, ``status`` in words."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import RoutingState, Series, Study, utcnow
from tests.integration.test_cli import pacs_ai, pacs_ai_in_process

#: 64 characters, the longest a UID may be: far wider than the 80 columns rich assumes for a pipe.
LONG_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"


def test_piped_listing_keeps_whole_uids_and_status_reads_as_text(tmp_path: Path) -> None:
    assert len(LONG_UID) == 64
    assert pacs_ai_in_process("db", "upgrade", PACS_AI_DATA_DIR=str(tmp_path)).returncode == 0
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}"))
    with session_scope(sessions) as session:
        session.add(Study(study_instance_uid=LONG_UID, study_description="x" * 60))

    # Through a real pipe once; --wide and status in this process (also not a terminal, seconds saved).
    for run, args in ((pacs_ai, ("studies", "list")), (pacs_ai_in_process, ("--wide", "studies", "list"))):
        listed = run(*args, PACS_AI_DATA_DIR=str(tmp_path))
        assert listed.returncode == 0, listed.stderr
        assert LONG_UID in listed.stdout, listed.stdout  # on one line, not cut or folded

    status = pacs_ai_in_process("status", PACS_AI_DATA_DIR=str(tmp_path))
    assert status.returncode == 1, status.stdout + status.stderr  # no service running: unhealthy
    assert "index: 1 studies, 0 series, 0 instances (0 purged)" in status.stdout, status.stdout
    assert "jobs: none" in status.stdout and "deliveries: none" in status.stdout
    for repr_mark in ("{'", "['", "{}", "[]"):
        assert repr_mark not in status.stdout, status.stdout


def test_status_counts_series_cut_short_by_an_aborted_association(tmp_path: Path) -> None:
    """Held and incomplete series are counted; recent incomplete ones are a warning, not a problem.

    In this process: what status counts is under test here, its output through a pipe in the test above.
    """
    assert pacs_ai_in_process("db", "upgrade", PACS_AI_DATA_DIR=str(tmp_path)).returncode == 0
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}"))
    now = utcnow()
    with session_scope(sessions) as session:
        study = Study(study_instance_uid="1.2.3")
        session.add(study)
        session.flush()
        for n, (state, aborted) in enumerate(
            [
                (RoutingState.RECEIVING, now - timedelta(seconds=30)),  # held: waiting for a resend
                (RoutingState.INCOMPLETE, now - timedelta(hours=2)),  # needs a person
                (RoutingState.INCOMPLETE, now - timedelta(hours=3)),
                (RoutingState.INCOMPLETE, now - timedelta(days=3)),  # counted, no longer a warning
                (RoutingState.RECEIVING, None),  # an ordinary series still arriving
                (RoutingState.ROUTED, None),
            ]
        ):
            session.add(
                Series(
                    series_instance_uid=f"1.2.3.{n}",
                    study_fk=study.id,
                    routing_state=state,
                    interrupted_at=aborted,
                    interrupted_instances=3 if aborted else None,
                    last_received_at=aborted or now,
                )
            )

    report = json.loads(pacs_ai_in_process("status", "--json", PACS_AI_DATA_DIR=str(tmp_path)).stdout)
    assert report["series_attention"] == {
        "held_for_resend": 1,
        "incomplete": 3,
        "incomplete_recent": 2,
        "recent_hours": 24,
    }
    [warning] = report["warnings"]
    assert warning.startswith("needs attention: 2 series incomplete (association aborted)")
    assert "pacs-ai studies list" in warning
    assert not any("series" in problem for problem in report["problems"])  # a warning, not a problem

    text = pacs_ai_in_process("status", PACS_AI_DATA_DIR=str(tmp_path)).stdout
    assert "1 held for a resend, 3 incomplete (2 in the last 24 h)" in text, text
    assert "warning needs attention: 2 series incomplete (association aborted)" in text, text
