"""The dispatch task that sends a job's results together (``deliver_results``), run by Celery in-process.

A phantom CT is analysed by the real job runner into a real index.  Its SEG and SR each get a
delivery to a folder destination and one to a DICOM peer that accepts connections and never
answers.  The task is run by the real Celery app (``apply``: in this process, no broker); the
outcome is read back from the index, the folder and the silent peer's connections.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Delivery, DeliveryState, Result
from tests.integration.worklist_study import DESTINATION, UID_PREFIX, index_analysed_study
from workers.factory import create_app
from workers.tasks import DELIVER_MANY_TASK


class SilentPeer:
    """A TCP listener that accepts connections, reads what comes and never answers.

    Records when each connection was accepted and when its client closed it, so a test can
    tell whether two connections were open at the same time.
    """

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.opened: list[float] = []
        self.closed: list[float] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.opened.append(time.monotonic())
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection: socket.socket) -> None:
        with connection:
            while connection.recv(65536):
                pass
        with self._lock:
            self.closed.append(time.monotonic())

    def overlapped(self) -> bool:
        """Whether some connection was accepted before an earlier one was closed."""
        with self._lock:
            return (
                len(self.opened) >= 2 and len(self.closed) >= 1 and sorted(self.opened)[1] < min(self.closed)
            )

    def close(self) -> None:
        self.server.close()


def _deliveries(sessions: sessionmaker[Session], job_id: int) -> dict[tuple[str, str], Delivery]:
    with session_scope(sessions) as session:
        rows = session.execute(
            select(Result.kind, Delivery)
            .join(Delivery, Delivery.result_fk == Result.id)
            .where(Result.job_fk == job_id, Result.kind.in_(["SEG", "SR"]))
        ).all()
        session.expunge_all()
    return {(kind, delivery.destination): delivery for kind, delivery in rows}


def test_a_jobs_results_go_out_at_once_and_a_silent_peer_fails_only_its_own(tmp_path: Path) -> None:
    peer = SilentPeer()
    try:
        settings = Settings(
            data_dir=tmp_path / "data",
            fsync=False,
            uid_prefix=UID_PREFIX,
            destinations={  # type: ignore[arg-type]
                DESTINATION: {"type": "folder", "path": str(tmp_path / "pacs")},
                "silent": {
                    "ae_title": "SILENT",
                    "host": "127.0.0.1",
                    "port": peer.port,
                    "max_retries": 0,
                    "timeout_seconds": 2,
                },
            },
        )
        upgrade_schema(settings.effective_database_url)
        sessions = make_session_factory(make_engine(settings.effective_database_url))
        study = index_analysed_study(settings, sessions, tmp_path / "source")
        with session_scope(sessions) as session:
            for result in session.scalars(
                select(Result).where(Result.job_fk == study.job_id, Result.kind.in_(("SEG", "SR")))
            ):
                session.add(
                    Delivery(
                        result_fk=result.id, destination="silent", state=DeliveryState.PENDING, attempts=0
                    )
                )
        pending = _deliveries(sessions, study.job_id)
        assert sorted(pending) == [
            ("SEG", DESTINATION),
            ("SEG", "silent"),
            ("SR", DESTINATION),
            ("SR", "silent"),
        ]

        outcome = create_app(settings).tasks[DELIVER_MANY_TASK].apply(args=[[d.id for d in pending.values()]])
        assert outcome.successful(), outcome.traceback

        delivered = _deliveries(sessions, study.job_id)
        for kind in ("SEG", "SR"):
            sent, unanswered = delivered[(kind, DESTINATION)], delivered[(kind, "silent")]
            assert (sent.state, sent.attempts, sent.last_error) == (DeliveryState.SENT, 1, None)
            assert (unanswered.state, unanswered.attempts) == (DeliveryState.FAILED, 1)
            assert unanswered.last_error
        assert len(list((tmp_path / "pacs").rglob("*.dcm"))) == 2
        # Both unanswered associations were open at the same time: the results were sent together,
        # not one after another (which would have held the SR back by the SEG's whole timeout).
        assert peer.overlapped(), (peer.opened, peer.closed)
    finally:
        peer.close()
