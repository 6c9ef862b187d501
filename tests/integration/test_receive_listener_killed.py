"""A listener process killed mid-association, and a known peer that always ends with A-ABORT.

The listener runs as a real process of its own (``serve`` on a listening
socket this test opens and hands down, as ``pacs-ai serve`` does), the
senders are pynetdicom and DCMTK ``storescu``, and the router is
:func:`route_ready_series` on the same SQLite index, as the scheduler runs it.

A process killed with SIGKILL runs nothing when its associations end; the
``receiving_series`` row its association wrote at its first store of the
series is what tells the restarted listener (or a routing pass) that the
series was cut short.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from pacs_ai.config import Settings
from pacs_ai.index.associations import PROCESS_GONE_REASON
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import AuditEvent, Instance, ReceivingSeries, RoutingState, Series, utcnow
from pacs_ai.receive.listener import open_listening_socket
from pacs_ai.route.assembly import route_ready_series
from pacs_ai.route.profiles import Profile
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.peers import storescu, wait_for

PROFILE = Profile.model_validate(
    {"name": "chest-ct", "match": {"modality": ["CT"]}, "analyzers": [{"name": "ct-chest-lung"}]}
)
WINDOW = 600.0
QUIET = 1.0
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
AE_TITLE = "PACS_AI"

#: A listener process on the listening socket whose descriptor is argv[1]; settings from PACS_AI_*.
LISTENER = """
import logging, socket, sys
from pacs_ai.config import Settings
from pacs_ai.receive.listener import serve
logging.basicConfig(level=logging.INFO)
settings = Settings()
serve(settings, listening_socket=socket.socket(fileno=int(sys.argv[1])))
"""


class Listener:
    """Listener processes serving one loopback port and one data directory, started and killed at will."""

    def __init__(self, data_dir: Path, known_peers: list[dict[str, Any]] | None = None) -> None:
        self.data_dir = data_dir
        self.settings = Settings(
            data_dir=data_dir, fsync=False, uid_prefix=UID_PREFIX, min_free_disk_mb=0, ae_title=AE_TITLE
        )
        upgrade_schema(self.settings.effective_database_url)
        self.socket: socket.socket = open_listening_socket("127.0.0.1", 0)
        self.port: int = self.socket.getsockname()[1]
        self.environment = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
        self.environment.update(
            PACS_AI_DATA_DIR=str(data_dir),
            PACS_AI_FSYNC="false",
            PACS_AI_UID_PREFIX=UID_PREFIX,
            PACS_AI_MIN_FREE_DISK_MB="0",
            PACS_AI_REFUSE_ASSOCIATIONS_BELOW_FREE_MB="0",
            PACS_AI_AE_TITLE=AE_TITLE,
            PACS_AI_LISTEN_HOST="127.0.0.1",
            PACS_AI_KNOWN_PEERS=json.dumps(known_peers or []),
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.engine = make_engine(self.settings.effective_database_url)
        self.sessions = make_session_factory(self.engine)

    def start(self) -> None:
        fd = self.socket.fileno()
        log = (self.data_dir / "listener.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", LISTENER, str(fd)],
            pass_fds=(fd,),
            env=self.environment,
            stdout=log,
            stderr=log,
        )
        log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
            self.process = None

    def associate(self, calling_ae: str, sop_class: str) -> Association:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", self.port, ae_title=AE_TITLE)
        assert association.is_established
        return association

    def route(self, *, after: float) -> list[int]:
        """One router pass ``after`` seconds from now; the ids of the jobs it opened."""
        with session_scope(self.sessions) as session:
            routing = route_ready_series(
                session,
                [PROFILE],
                now=utcnow() + timedelta(seconds=after),
                default_quiet_seconds=QUIET,
                resend_window_seconds=WINDOW,
            )
        return [ticket.job_id for ticket in routing.new_jobs]

    def series(self, series_uid: str) -> Series:
        with session_scope(self.sessions) as session:
            series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one()
            session.expunge(series)
        return series

    def audit(self, **where: str) -> list[AuditEvent]:
        with session_scope(self.sessions) as session:
            query = select(AuditEvent).order_by(AuditEvent.id)
            for column, value in where.items():
                query = query.where(getattr(AuditEvent, column) == value)
            events = list(session.scalars(query))
            session.expunge_all()
        return events

    def actions(self, series_uid: str) -> list[str]:
        return [event.action for event in self.audit(object_uid=series_uid)]

    def marks(self) -> int:
        with session_scope(self.sessions) as session:
            return session.scalar(select(func.count(ReceivingSeries.id))) or 0

    def instances(self, series_uid: str) -> int:
        with session_scope(self.sessions) as session:
            return (
                session.scalar(
                    select(func.count(Instance.id))
                    .join(Series, Series.id == Instance.series_fk)
                    .where(Series.series_instance_uid == series_uid)
                )
                or 0
            )


@pytest.fixture
def listener_factory(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(known_peers: list[dict[str, Any]] | None = None) -> Listener:
        listener = Listener(tmp_path / f"data{len(made)}", known_peers)
        made.append(listener)
        listener.start()
        return listener

    try:
        yield make
    finally:
        for listener in made:
            listener.stop()
            listener.socket.close()
            listener.engine.dispose()


def _series(directory: Path, slices: int, seed: int = 0) -> tuple[list[Path], str, str]:
    """Files of a synthetic CT series, its SOP class and its Series Instance UID."""
    write_chest_phantom(
        directory, slices=slices, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0, seed=seed
    )
    files = sorted(directory.glob("*.dcm"))
    first = pydicom.dcmread(files[0])
    return files, str(first.SOPClassUID), str(first.SeriesInstanceUID)


def _send(association: Association, files: list[Path]) -> None:
    for path in files:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0x0000


def _storescu(listener: Listener, calling_ae: str, files: list[Path]) -> None:
    completed = storescu("127.0.0.1", listener.port, AE_TITLE, files, calling_aet=calling_ae, timeout=120)
    assert completed.returncode == 0, completed.stderr


def _kill_mid_series(listener: Listener, files: list[Path], sop_class: str, sent: int) -> None:
    """Send ``sent`` of ``files`` on one association, then SIGKILL the listener with it still open."""
    association = listener.associate("MODALITY", sop_class)
    _send(association, files[:sent])
    # Durable before the first instance was acknowledged: one row for the series, not one per instance.
    assert listener.marks() == 1
    listener.kill()
    association.abort()  # the connection is already gone; this ends pynetdicom's side


def test_a_series_cut_by_a_killed_listener_is_held_then_incomplete_and_a_resend_completes_it(
    listener_factory: Callable[..., Listener], tmp_path: Path
) -> None:
    listener = listener_factory()
    files, sop_class, series_uid = _series(tmp_path / "ct", slices=6)
    _kill_mid_series(listener, files, sop_class, sent=3)
    # Nothing ran when the association ended: the series looks as a complete one would.
    assert listener.series(series_uid).interrupted_at is None
    assert listener.actions(series_uid) == []

    listener.start()  # the service restarts its listener
    wait_for(
        lambda: "series.interrupted" in listener.actions(series_uid),
        timeout=60,
        description="the restarted listener marks the series interrupted",
    )
    series = listener.series(series_uid)
    assert series.interrupted_at is not None and series.interrupted_instances == 3
    (interrupted,) = listener.audit(object_uid=series_uid, action="series.interrupted")
    assert interrupted.detail == {"instances": 3, "reason": PROCESS_GONE_REASON}
    assert listener.marks() == 0

    # Quiet for longer than the quiet period, but within the resend window: held, nothing analysed.
    assert listener.route(after=QUIET + 5) == []
    assert listener.series(series_uid).routing_state == RoutingState.RECEIVING
    # No resend within the window: incomplete, never analysed as it is.
    assert listener.route(after=WINDOW + 5) == []
    series = listener.series(series_uid)
    assert series.routing_state == RoutingState.INCOMPLETE
    assert "association aborted after 3 instance(s)" in (series.routing_detail or "")
    assert listener.actions(series_uid) == ["series.interrupted", "series.incomplete"]

    # The modality sends the whole series again (DCMTK storescu, released): complete, routed.
    _storescu(listener, "MODALITY", files)
    wait_for(lambda: "series.resent" in listener.actions(series_uid), timeout=30, description="resent")
    assert listener.instances(series_uid) == 6 and listener.marks() == 0
    jobs = listener.route(after=QUIET + 5)
    assert len(jobs) == 1
    series = listener.series(series_uid)
    assert series.routing_state == RoutingState.ROUTED and series.interrupted_at is None


def test_a_routing_pass_finds_the_series_of_a_killed_listener_before_any_listener_restarts(
    listener_factory: Callable[..., Listener], tmp_path: Path
) -> None:
    listener = listener_factory()
    files, sop_class, series_uid = _series(tmp_path / "ct", slices=5)
    _kill_mid_series(listener, files, sop_class, sent=2)
    # The scheduler comes back before the listener (a reboot after a power loss): not routed.
    assert listener.route(after=QUIET + 5) == []
    series = listener.series(series_uid)
    assert series.interrupted_at is not None and series.interrupted_instances == 2
    assert series.routing_state == RoutingState.RECEIVING
    assert listener.actions(series_uid) == ["series.interrupted"]
    assert listener.marks() == 0


def test_series_of_live_and_released_associations_are_routed_as_before(
    listener_factory: Callable[..., Listener], tmp_path: Path
) -> None:
    listener = listener_factory()
    files, sop_class, series_uid = _series(tmp_path / "ct", slices=4)
    # An association still open on a live listener process: a routing pass leaves its mark alone.
    association = listener.associate("MODALITY", sop_class)
    _send(association, files[:2])
    assert listener.route(after=0) == []  # within the quiet period
    assert listener.marks() == 1
    assert listener.series(series_uid).interrupted_at is None
    _send(association, files[2:])
    association.release()
    wait_for(lambda: listener.marks() == 0, timeout=30, description="the release deletes the mark")

    assert len(listener.route(after=QUIET + 5)) == 1
    series = listener.series(series_uid)
    assert series.routing_state == RoutingState.ROUTED and series.interrupted_at is None
    assert listener.actions(series_uid) == ["job.created"]


def test_a_known_peer_whose_abort_ends_its_series_normally(
    listener_factory: Callable[..., Listener], tmp_path: Path
) -> None:
    listener = listener_factory(
        [{"ae_title": "ABORTER", "abort_ends_series_normally": True}, {"ae_title": "MODALITY"}]
    )
    files, sop_class, series_uid = _series(tmp_path / "ct1", slices=3)
    association = listener.associate("ABORTER", sop_class)
    _send(association, files)
    association.abort()
    wait_for(
        lambda: listener.audit(actor="dicom:ABORTER", action="association.aborted"),
        timeout=30,
        description="the abort audited",
    )
    (aborted,) = listener.audit(actor="dicom:ABORTER", action="association.aborted")
    assert aborted.detail is not None
    assert aborted.detail["reason"] == "the peer sent A-ABORT"
    assert aborted.detail["treated_as"] == "released (known peer: abort_ends_series_normally)"
    wait_for(lambda: listener.marks() == 0, timeout=30, description="the mark deleted")
    assert listener.series(series_uid).interrupted_at is None
    assert len(listener.route(after=QUIET + 5)) == 1
    assert listener.series(series_uid).routing_state == RoutingState.ROUTED

    # Another known peer without the setting: its abort still interrupts its series.
    other_files, _, other_uid = _series(tmp_path / "ct2", slices=3, seed=1)
    association = listener.associate("MODALITY", sop_class)
    _send(association, other_files[:2])
    association.abort()
    wait_for(
        lambda: "series.interrupted" in listener.actions(other_uid), timeout=30, description="interrupted"
    )
    (aborted,) = listener.audit(actor="dicom:MODALITY", action="association.aborted")
    assert aborted.detail is not None and "treated_as" not in aborted.detail
    assert listener.route(after=QUIET + 5) == []
    assert listener.series(other_uid).routing_state == RoutingState.RECEIVING
