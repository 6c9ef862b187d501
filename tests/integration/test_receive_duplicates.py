"""Duplicates through the listener: keep-first holds for copies arriving at once; a UID is filed once."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import decode

from pacs_ai.index.db import make_engine
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


def _finish_together(server: RunningServer, copies: list[Path]) -> list[int]:
    """Send each copy on its own association, all but the last byte; then every last byte at once."""
    connections, tails = [], []
    for path in copies:
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        connection.sendall(_associate_request(server.settings.ae_title, pydicom.dcmread(path).SOPClassUID))
        assert _read_pdu(connection)[0] == 0x02
        pdus = b"".join(_c_store_pdus(path))
        connection.sendall(pdus[:-1])
        connections.append(connection)
        tails.append(pdus[-1:])
    for connection, tail in zip(connections, tails, strict=True):
        connection.sendall(tail)
    statuses = []
    for connection in connections:
        _, body = _read_pdu(connection)
        statuses.append(int(decode(io.BytesIO(body[6:]), is_implicit_vr=True, is_little_endian=True).Status))
        connection.close()
    return statuses


def test_two_copies_at_once_with_different_content_keep_the_first(
    listener: RunningServer, ct_slice: Path, tmp_path: Path
) -> None:
    server = listener
    for round_number in range(12):
        uid = generate_uid(prefix=UID_PREFIX)
        copies = []
        for padding in (1, 200):  # same UID, different content (and length)
            dataset = pydicom.dcmread(ct_slice)
            dataset.SOPInstanceUID = uid
            dataset.ImageComments = "x" * (padding + round_number)
            copies.append(tmp_path / f"{round_number}-{padding}.dcm")
            dataset.save_as(copies[-1])
        assert _finish_together(server, copies) == [0, 0]
        ((size, copies_received),) = _rows(
            server, f"SELECT size_bytes, duplicates_received FROM instances WHERE sop_instance_uid = '{uid}'"
        )
        (file,) = server.handler.spool.root.rglob(f"{uid}.dcm")
        # The file is the copy the index recorded first, never overwritten by the second.
        assert file.stat().st_size == size and copies_received == 1
    assert list(server.handler.spool.tmp_dir.iterdir()) == []


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
