"""Duplicates through the listener: keep-first holds for copies arriving at once; a UID is filed once.

The concurrent case is forced into its worst interleaving (the first copy's
index insert held back by a table lock on a PostgreSQL index) rather than hoped
for in many rounds: with ``wait_for_first_copy`` made a no-op the test fails
(the second copy's content is kept).
"""

from __future__ import annotations

import io
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import decode

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, upgrade_schema
from pacs_ai.receive.listener import acceptor_policy, open_listening_socket
from pacs_ai.receive.server import AssociationServer, ServerOptions
from pacs_ai.receive.store import GroupCommit, StoreHandler, wait_for_first_copy
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.integration.test_receive_server import (
    UID_PREFIX,
    RunningServer,
    ServerFactory,
    _associate_request,
    _c_store_pdus,
    _read_pdu,
    server_factory,  # noqa: F401 - a fixture
)
from tests.peers import wait_for
from tests.service import PostgresDatabase


@pytest.fixture
def listener(server_factory: ServerFactory) -> RunningServer:  # noqa: F811 - the fixture imported above
    return server_factory()


@pytest.fixture
def ct_slice(tmp_path: Path) -> Path:
    write_chest_phantom(tmp_path / "ct", slices=3, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)
    return sorted((tmp_path / "ct").glob("*.dcm"))[0]


def _send(server: RunningServer, dataset: pydicom.Dataset) -> int:
    ae = AE(ae_title="DUPLICATOR")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", server.port, ae_title=server.settings.ae_title)
    assert association.is_established
    try:
        return int(association.send_c_store(dataset).Status)
    finally:
        association.release()


def _rows(server: RunningServer, sql: str) -> list[tuple[object, ...]]:
    with make_engine(server.settings.effective_database_url).connect() as connection:
        return [tuple(row) for row in connection.exec_driver_sql(sql).all()]


def test_a_uid_held_in_another_study_is_refused_and_leaves_nothing_behind(
    listener: RunningServer, ct_slice: Path
) -> None:
    server = listener
    first = pydicom.dcmread(ct_slice)
    assert _send(server, first) == 0
    moved = pydicom.dcmread(ct_slice)
    moved.StudyInstanceUID = generate_uid(prefix=UID_PREFIX)
    moved.SeriesInstanceUID = generate_uid(prefix=UID_PREFIX)
    assert _send(server, moved) == 0xC000

    assert _rows(server, "SELECT count(*) FROM instances") == [(1,)]
    assert _rows(server, "SELECT count(*) FROM series") == [(1,)], "no empty series left behind"
    assert len(list(server.handler.spool.root.rglob("*.dcm"))) == 1, "no unindexed file left behind"
    ((detail,),) = _rows(server, "SELECT detail FROM audit_events WHERE action = 'instance.rejected'")
    assert "already held" in str(detail)


@pytest.fixture
def listener_on_postgres(tmp_path: Path) -> Iterator[RunningServer]:
    """The listener on a throwaway PostgreSQL index: its inserts can be held back by a table lock."""
    with PostgresDatabase() as database:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database.url,
            fsync=False,
            uid_prefix=UID_PREFIX,
            min_free_disk_mb=0,
        )
        upgrade_schema(settings.effective_database_url)
        handler = StoreHandler(settings)
        listening = open_listening_socket("127.0.0.1", 0)
        server = AssociationServer(
            handler, acceptor_policy(settings), listening, ServerOptions(acse_timeout=10, idle_timeout=30)
        )
        stop = threading.Event()
        serving = threading.Thread(target=server.serve, args=(stop, 2.0), daemon=True)
        serving.start()
        try:
            yield RunningServer(listening.getsockname()[1], settings, handler, [], stop, serving)
        finally:
            stop.set()
            serving.join(15)
            listening.close()
            handler.gate.engine.dispose()


def _waiting_on_a_lock(server: RunningServer) -> int:
    """Backends of the listener's database waiting for a lock (its inserts, behind the test's LOCK)."""
    with make_engine(server.settings.effective_database_url).connect() as connection:
        return int(
            connection.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).scalar_one()
        )


def _threads_in(function: Callable[..., object]) -> int:
    """How many threads of this process (the listener's among them) are inside ``function`` now."""
    return sum(_in_function(frame, function.__code__) for frame in sys._current_frames().values())


def _second_copy_is_waiting(server: RunningServer) -> bool:
    """The second copy waits: for the first's file lock (keep-first at work), or behind its insert.

    Without the file lock it would have replaced the file by now and wait for
    the index, behind the first copy's commit (in the group commit or for the
    table lock).
    """
    return (
        _threads_in(wait_for_first_copy) == 1
        or _threads_in(GroupCommit.insert) == 2
        or _waiting_on_a_lock(server) == 2
    )


def _in_function(frame: object, code: object) -> bool:
    while frame is not None:
        if frame.f_code is code:  # type: ignore[attr-defined]
            return True
        frame = frame.f_back  # type: ignore[attr-defined]
    return False


def test_the_second_copy_waits_for_the_first_to_be_indexed_even_when_it_is_slow(
    listener_on_postgres: RunningServer, tmp_path: Path
) -> None:
    """Keep-first under the worst interleaving, forced rather than hoped for.

    The first copy's index insert is held back (the test holds ``LOCK TABLE
    instances``) after its file took the final name; the second copy then
    finds the name taken and no row yet.  Without the lock on the first copy's
    file (``wait_for_first_copy``) the second would take it for a leftover of
    a crash, replace the file and be recorded in the first's place; with it,
    it waits and is recorded as a duplicate.  Which way it went is observed
    (the second copy waiting in ``wait_for_first_copy``, or its insert waiting
    behind the first's) before the table lock is let go: no timing is guessed.
    """
    server = listener_on_postgres
    slices = sorted(_phantom(tmp_path).glob("*.dcm"))
    assert _send(server, pydicom.dcmread(slices[1])) == 0  # the series is known: only instances wait
    uid = generate_uid(prefix=UID_PREFIX)
    copies = []
    for label in ("first", "second"):
        dataset = pydicom.dcmread(slices[0])
        dataset.SOPInstanceUID = uid
        dataset.ImageComments = f"{label} copy " + "x" * (1 if label == "first" else 300)
        copies.append(tmp_path / f"{label}.dcm")
        dataset.save_as(copies[-1])
    connections, tails = [], []
    for path in copies:
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        connection.sendall(_associate_request(server.settings.ae_title, pydicom.dcmread(path).SOPClassUID))
        assert _read_pdu(connection)[0] == 0x02
        pdus = b"".join(_c_store_pdus(path))
        connection.sendall(pdus[:-1])
        connections.append(connection)
        tails.append(pdus[-1:])

    holder = make_engine(server.settings.effective_database_url).connect()
    transaction = holder.begin()
    holder.exec_driver_sql("LOCK TABLE instances IN EXCLUSIVE MODE")  # reads go on, inserts wait
    try:
        connections[0].sendall(tails[0])
        wait_for(lambda: _waiting_on_a_lock(server) == 1, timeout=30, interval=0.05, description="1st insert")
        connections[1].sendall(tails[1])
        wait_for(
            lambda: _second_copy_is_waiting(server),
            timeout=30,
            interval=0.05,
            description="the second copy to wait for the first, or for the table",
        )
    finally:
        transaction.commit()
        holder.close()
    statuses = []
    for connection in connections:
        _, body = _read_pdu(connection)
        statuses.append(int(decode(io.BytesIO(body[6:]), is_implicit_vr=True, is_little_endian=True).Status))
        connection.close()

    assert statuses == [0, 0]
    ((size, copies_received),) = _rows(
        server, f"SELECT size_bytes, duplicates_received FROM instances WHERE sop_instance_uid = '{uid}'"
    )
    (file,) = server.handler.spool.root.rglob(f"{uid}.dcm")
    assert str(pydicom.dcmread(file).ImageComments).startswith("first copy"), "keep-first: the first stays"
    assert file.stat().st_size == size and copies_received == 1
    assert list(server.handler.spool.tmp_dir.iterdir()) == []


def _phantom(tmp_path: Path) -> Path:
    write_chest_phantom(tmp_path / "ct", slices=3, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)
    return tmp_path / "ct"
