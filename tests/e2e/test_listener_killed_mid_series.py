"""``pacs-ai serve`` whose listener process is killed mid-association: the series is held, never routed.

The whole service runs (supervisor, listener process, scheduler); the test
SIGKILLs the listener process while pynetdicom holds an association with half
a series acknowledged.  ``serve`` starts a new listener; the series must be
marked interrupted (by that listener's start or the scheduler's routing pass),
held, then marked incomplete when the resend window ends, and routed only once
DCMTK ``storescu`` has sent it whole again.  The service's own profile asks
for 20 slices or more, so these small series are routed as ``unmatched``:
what matters here is whether and when the scheduler decides on a series.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from pacs_ai.index.associations import PROCESS_GONE_REASON
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.index.models import AuditEvent, Job, ReceivingSeries, RoutingState, Series
from tests.integration.test_receive_listener_killed import _series
from tests.peers import storescu, wait_for
from tests.service import PacsAiService

pytestmark = pytest.mark.e2e

#: Long enough for the control series to be routed well inside it, short enough to wait out.
RESEND_WINDOW = 20.0


def _storescu(service: PacsAiService, files: list[Path]) -> None:
    completed = storescu(
        "127.0.0.1", service.port, service.ae_title, files, calling_aet="MODALITY", timeout=120
    )
    assert completed.returncode == 0, completed.stderr


def test_a_series_cut_by_a_killed_listener_process_is_held_then_incomplete_until_resent(
    service_factory: Any, tmp_path: Path
) -> None:
    service: PacsAiService = service_factory(
        extra_env={
            "PACS_AI_WORKER_PROCESSES": "0",
            "PACS_AI_WORKLIST_ENABLED": "false",
            "PACS_AI_RESEND_WINDOW_SECONDS": str(RESEND_WINDOW),
            "PACS_AI_MIN_FREE_DISK_MB": "0",
            "PACS_AI_REFUSE_ASSOCIATIONS_BELOW_FREE_MB": "0",
        }
    )
    sessions = make_session_factory(make_engine(service.database_url))

    def state(series_uid: str) -> tuple[RoutingState | None, list[AuditEvent]]:
        with session_scope(sessions) as session:
            routing_state = session.scalar(
                select(Series.routing_state).where(Series.series_instance_uid == series_uid)
            )
            events = list(
                session.scalars(
                    select(AuditEvent).where(AuditEvent.object_uid == series_uid).order_by(AuditEvent.id)
                )
            )
            session.expunge_all()
        return routing_state, events

    def actions(series_uid: str) -> list[str]:
        return [event.action for event in state(series_uid)[1]]

    files, sop_class, series_uid = _series(tmp_path / "cut", slices=6, seed=0)
    run_state = service.run_state()
    assert run_state is not None
    (listener_pid,) = run_state["listener_pids"]

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    assert association.is_established
    for path in files[:3]:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count(ReceivingSeries.id))) == 1
    os.kill(listener_pid, signal.SIGKILL)
    association.abort()

    # serve starts a new listener; the series is found cut short (by it or by the routing pass).
    wait_for(
        lambda: "series.interrupted" in actions(series_uid),
        timeout=60,
        description="the series marked interrupted",
    )
    routing_state, events = state(series_uid)
    assert events[0].detail == {"instances": 3, "reason": PROCESS_GONE_REASON}

    # A control series sent afterwards, released, is routed after its quiet period; the cut one,
    # quiet for longer, is held in the same passes: never routed as it is.
    control, _, control_uid = _series(tmp_path / "control", slices=3, seed=1)
    _storescu(service, control)
    wait_for(
        lambda: state(control_uid)[0] == RoutingState.UNMATCHED,
        timeout=60,
        description="the control series routed",
    )
    assert state(series_uid)[0] in (RoutingState.RECEIVING, RoutingState.INCOMPLETE)
    assert actions(control_uid) == ["series.unmatched"]

    # The resend window ends: incomplete, not analysed.
    wait_for(
        lambda: state(series_uid)[0] == RoutingState.INCOMPLETE,
        timeout=RESEND_WINDOW + 60,
        description="the series marked incomplete",
    )
    assert actions(series_uid) == ["series.interrupted", "series.incomplete"]
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count(Job.id))) == 0

    # The modality sends it whole again: completed and routed.
    _storescu(service, files)
    wait_for(
        lambda: state(series_uid)[0] == RoutingState.UNMATCHED,
        timeout=60,
        description="the resent series routed",
    )
    assert actions(series_uid) == [
        "series.interrupted",
        "series.incomplete",
        "series.resent",
        "series.unmatched",
    ]
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count(ReceivingSeries.id))) == 0
        assert (
            session.scalar(select(Series.interrupted_at).where(Series.series_instance_uid == series_uid))
            is None
        )
