"""A series whose association was cut: held for a resend, completed by one, else marked incomplete.

Real requestors end the associations: pynetdicom's ``abort()`` (an A-ABORT
after some instances) and DCMTK ``storescu`` killed with SIGKILL in the middle
of a series (the connection just drops).  The listener is the real one
(:class:`AssociationServer` on a loopback port, SQLite index) and the router
is :func:`route_ready_series` run on that index, as the scheduler runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select
from typer.testing import CliRunner

from pacs_ai.cli.main import app
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import AuditEvent, Instance, Job, RoutingState, Series, utcnow
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.route.profiles import Profile
from pacs_ai.route.reprocess import reopen_series
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.test_receive_server import (
    RunningServer,
    ServerFactory,
    server_factory,  # noqa: F401 - a fixture
)
from tests.peers import STORESCU_PROFILE, dcmtk, wait_for, write_storescu_profile

PROFILE = Profile.model_validate(
    {"name": "chest-ct", "match": {"modality": ["CT"]}, "analyzers": [{"name": "ct-chest-lung"}]}
)
WINDOW = 600.0
QUIET = 1.0


@pytest.fixture
def listener(server_factory: ServerFactory) -> RunningServer:  # noqa: F811 - the fixture imported above
    # A long idle timeout: the requestors here are slow on purpose, never silent.
    return server_factory(idle_timeout=30.0, acse_timeout=10.0)


def _series(tmp_path: Path, slices: int) -> list[Path]:
    write_chest_phantom(tmp_path / "ct", slices=slices, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)
    return sorted((tmp_path / "ct").glob("*.dcm"))


def _associate(server: RunningServer, sop_class: str) -> object:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", server.port, ae_title=server.settings.ae_title)
    assert association.is_established
    return association


def _route(server: RunningServer, *, after: float) -> list[int]:
    """One router pass ``after`` seconds from now; the ids of the jobs it opened."""
    sessions = make_session_factory(make_engine(server.settings.effective_database_url))
    with session_scope(sessions) as session:
        routing = route_ready_series(
            session,
            [PROFILE],
            now=utcnow() + timedelta(seconds=after),
            default_quiet_seconds=QUIET,
            resend_window_seconds=WINDOW,
        )
    return [ticket.job_id for ticket in routing.new_jobs]


def _state(server: RunningServer) -> tuple[Series, list[str], int]:
    """The one series, the audit actions about it, and its instance count."""
    sessions = make_session_factory(make_engine(server.settings.effective_database_url))
    with session_scope(sessions) as session:
        series = session.scalars(select(Series)).one()
        actions = list(
            session.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.object_uid == series.series_instance_uid)
                .order_by(AuditEvent.id)
            )
        )
        count = session.scalar(select(func.count(Instance.id))) or 0
        session.expunge(series)
    return series, actions, count


def _cli(server: RunningServer, *args: str) -> str:
    """``pacs-ai ARGS`` on the listener's data directory, in this process (start-up is not under test)."""
    environment = {name: None for name in os.environ if name.startswith("PACS_AI_")}
    result = CliRunner().invoke(
        app, list(args), env={**environment, "PACS_AI_DATA_DIR": str(server.settings.data_dir)}
    )
    assert result.exit_code == 0, result.output
    return result.output


def _wait_for_audit(server: RunningServer, action: str) -> None:
    wait_for(lambda: action in _state(server)[1], timeout=20, description=f"audit event {action}")


def test_an_aborted_series_waits_for_its_resend_and_is_then_routed_whole(
    listener: RunningServer, tmp_path: Path
) -> None:
    files = _series(tmp_path, slices=6)
    sop_class = pydicom.dcmread(files[0]).SOPClassUID
    association = _associate(listener, sop_class)
    for path in files[:3]:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0  # type: ignore[attr-defined]
    association.abort()  # type: ignore[attr-defined]
    _wait_for_audit(listener, "series.interrupted")

    series, actions, count = _state(listener)
    assert count == 3 and series.interrupted_instances == 3 and series.interrupted_at is not None
    # Quiet for longer than the quiet period, but within the resend window: held, nothing analysed.
    assert _route(listener, after=QUIET + 5) == []
    assert _state(listener)[0].routing_state == RoutingState.RECEIVING

    # The sender sends the whole series again and releases: complete, routed as usual.
    association = _associate(listener, sop_class)
    for path in files:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0  # type: ignore[attr-defined]
    association.release()  # type: ignore[attr-defined]
    _wait_for_audit(listener, "series.resent")
    series, actions, count = _state(listener)
    assert count == 6 and series.interrupted_at is None
    jobs = _route(listener, after=QUIET + 5)
    assert len(jobs) == 1
    series, actions, _ = _state(listener)
    assert series.routing_state == RoutingState.ROUTED
    assert actions == ["series.interrupted", "series.resent", "job.created"]
    sessions = make_session_factory(make_engine(listener.settings.effective_database_url))
    with session_scope(sessions) as session:
        assert session.get_one(Job, jobs[0]).instance_count == 6
        # The resent copies of what the aborted association stored were duplicates, kept first.
        assert session.scalar(select(func.sum(Instance.duplicates_received))) == 3


def test_a_series_cut_by_a_killed_storescu_is_marked_incomplete_and_analysed_only_when_forced(
    listener: RunningServer, tmp_path: Path
) -> None:
    files = _series(tmp_path, slices=60)
    profile = write_storescu_profile(files, tmp_path / "storescu.cfg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    # 60 slices take storescu far longer to send than the test takes to notice the second one
    # stored and kill it: it is surely in the middle of the series.
    sender = subprocess.Popen(
        [
            dcmtk("storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            listener.settings.ae_title,
            "-xf",
            str(profile),
            STORESCU_PROFILE,
            "127.0.0.1",
            str(listener.port),
            *map(str, files),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    engine = make_engine(listener.settings.effective_database_url)

    def stored() -> int:
        with engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT count(*) FROM instances").scalar_one())

    try:
        wait_for(lambda: stored() >= 2, timeout=15, interval=0.02, description="2 instances stored")
    finally:
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait(10)
    _wait_for_audit(listener, "series.interrupted")
    series, _, count = _state(listener)
    assert 2 <= count < len(files) and series.interrupted_instances == count

    # The resend window passes without a resend: incomplete, no job, the reason recorded.
    assert _route(listener, after=QUIET + 5) == []
    assert _route(listener, after=WINDOW + 5) == []
    series, actions, _ = _state(listener)
    assert series.routing_state == RoutingState.INCOMPLETE
    assert f"association aborted after {series.interrupted_instances} instance(s)" in (
        series.routing_detail or ""
    )
    assert actions[-1] == "series.incomplete" and "job.created" not in actions
    assert _route(listener, after=WINDOW + 60) == [], "decided once, not every pass"

    # Visible in pacs-ai studies list and show.
    (study,) = json.loads(_cli(listener, "studies", "list", "--json"))
    assert study["incomplete_series"] == 1
    (shown_series,) = json.loads(_cli(listener, "studies", "show", study["study_instance_uid"], "--json"))[
        "series"
    ]
    assert shown_series["routing_state"] == "incomplete"
    assert shown_series["interrupted_instances"] == series.interrupted_instances

    # Forced by reprocess (the CLI reopens a study's series this way): analysed as it is.
    sessions = make_session_factory(make_engine(listener.settings.effective_database_url))
    with session_scope(sessions) as session:
        reopen_series(session, study["study_instance_uid"], [series.id], actor="test", detail={})
    assert len(_route(listener, after=QUIET + 5)) == 1
    assert _state(listener)[0].routing_state == RoutingState.ROUTED


def test_a_complete_resend_after_the_window_reopens_an_incomplete_series(
    listener: RunningServer, tmp_path: Path
) -> None:
    files = _series(tmp_path, slices=4)
    sop_class = pydicom.dcmread(files[0]).SOPClassUID
    association = _associate(listener, sop_class)
    assert association.send_c_store(pydicom.dcmread(files[0])).Status == 0  # type: ignore[attr-defined]
    association.abort()  # type: ignore[attr-defined]
    _wait_for_audit(listener, "series.interrupted")
    assert _route(listener, after=WINDOW + 5) == []
    assert _state(listener)[0].routing_state == RoutingState.INCOMPLETE

    completed = subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            listener.settings.ae_title,
            "127.0.0.1",
            str(listener.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    _wait_for_audit(listener, "series.resent")
    assert len(_route(listener, after=QUIET + 5)) == 1
    series, _, count = _state(listener)
    assert count == 4 and series.routing_state == RoutingState.ROUTED and series.interrupted_at is None


def test_a_series_sent_on_a_released_association_is_routed_after_the_quiet_period_as_before(
    listener: RunningServer, tmp_path: Path
) -> None:
    files = _series(tmp_path, slices=3)
    association = _associate(listener, pydicom.dcmread(files[0]).SOPClassUID)
    for path in files:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0  # type: ignore[attr-defined]
    association.release()  # type: ignore[attr-defined]
    _, actions, count = _state(listener)
    assert count == 3 and actions == []
    assert len(_route(listener, after=QUIET + 5)) == 1
