"""The listener's association threads, on a real socket with a real spool and SQLite index.

Each association is read, and its instances stored, on a thread of its own; a peer that keeps
sending, however slowly, is never cut off, and one silent past the idle timeout is aborted.
The requestors are pynetdicom's (its association, or its PDU and DIMSE encoders on a raw
socket where the test needs to control the timing of every byte).
"""

from __future__ import annotations

import io
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

from pacs_ai.config import Settings
from pacs_ai.dispatch.associate import request_association
from pacs_ai.index.db import make_engine, upgrade_schema
from pacs_ai.receive.listener import acceptor_policy, open_listening_socket
from pacs_ai.receive.server import AssociationServer, ServerOptions
from pacs_ai.receive.store import StoreHandler
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.peers import data_set_bytes

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
IDLE_TIMEOUT = 1.0


@dataclass
class RunningServer:
    port: int
    settings: Settings
    handler: StoreHandler
    #: Log records of the store ("stored ..." at DEBUG), with the thread that wrote each.
    store_records: list[logging.LogRecord]
    #: Set to stop the server; ``serving`` is the thread running it.
    stop: threading.Event
    serving: threading.Thread


ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts AssociationServers on free loopback ports (``ServerOptions`` fields as keywords)."""
    settings = Settings(data_dir=tmp_path / "data", fsync=False, uid_prefix=UID_PREFIX, min_free_disk_mb=0)
    upgrade_schema(settings.effective_database_url)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    store_log = logging.getLogger("pacs_ai.receive.store")
    collect, level = Collect(), store_log.level
    store_log.addHandler(collect)
    store_log.setLevel(logging.DEBUG)
    started: list[tuple[RunningServer, socket.socket]] = []

    def start(shutdown_grace: float = 2.0, **options: float) -> RunningServer:
        handler = StoreHandler(settings)
        listening = open_listening_socket("127.0.0.1", 0)
        server_options = ServerOptions(
            **{"acse_timeout": IDLE_TIMEOUT, "idle_timeout": IDLE_TIMEOUT, **options}
        )
        association_server = AssociationServer(handler, acceptor_policy(settings), listening, server_options)
        stop = threading.Event()
        serving = threading.Thread(target=association_server.serve, args=(stop, shutdown_grace), daemon=True)
        serving.start()
        running = RunningServer(listening.getsockname()[1], settings, handler, records, stop, serving)
        started.append((running, listening))
        return running

    try:
        yield start
    finally:
        for running, listening in started:
            running.stop.set()
            running.serving.join(15)
            listening.close()
        store_log.removeHandler(collect)
        store_log.setLevel(level)
    assert not any(running.serving.is_alive() for running, _ in started), "a server did not stop"


@pytest.fixture
def server(server_factory: ServerFactory) -> RunningServer:
    return server_factory()


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    write_chest_phantom(tmp_path / "ct", slices=3, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)
    return sorted((tmp_path / "ct").glob("*.dcm"))[:2]


def _indexed_instance_uids(settings: Settings) -> set[str]:
    with make_engine(settings.effective_database_url).connect() as connection:
        rows = connection.exec_driver_sql("SELECT sop_instance_uid FROM instances").all()
    return {row[0] for row in rows}


def test_each_association_is_stored_on_its_own_thread(server: RunningServer, ct_files: list[Path]) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(pydicom.dcmread(ct_files[0]).SOPClassUID, ExplicitVRLittleEndian)
    associations = [
        ae.associate("127.0.0.1", server.port, ae_title=server.settings.ae_title) for _ in ct_files
    ]
    try:
        assert all(association.is_established for association in associations)
        local_ports = [association.dul.socket.socket.getsockname()[1] for association in associations]  # type: ignore[union-attr]
        for association, path in zip(associations, ct_files, strict=True):
            assert association.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        for association in associations:
            association.release()

    stored = [record for record in server.store_records if record.getMessage().startswith("stored ")]
    threads = sorted(record.threadName or "" for record in stored)
    # Each instance was stored by the thread reading its own association, named after its peer.
    assert threads == sorted(f"association-127.0.0.1:{port}" for port in local_ports)
    sent_uids = {str(pydicom.dcmread(path).SOPInstanceUID) for path in ct_files}
    assert _indexed_instance_uids(server.settings) == sent_uids
    assert len(list(server.handler.spool.root.glob("*/*/*.dcm"))) == len(ct_files)
    assert list(server.handler.spool.tmp_dir.iterdir()) == []


def _associate_request(called_ae: str, sop_class: str) -> bytes:
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "TRICKLE"
    request.called_ae_title = called_ae
    context = build_context(sop_class, ExplicitVRLittleEndian)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    maximum_length = MaximumLengthNotification()
    maximum_length.maximum_length_received = 0
    request.user_information = [maximum_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return bytes(pdu.encode())


def _c_store_pdus(path: Path) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ for ``path``, as pynetdicom encodes them (one PDU each)."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = header.SOPClassUID
    primitive.AffectedSOPInstanceUID = header.SOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(data_set_bytes(path))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for p_data in message.encode_msg(1, 0):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(bytes(pdu.encode()))
    return pdus


def _read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(connection, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    return pdu_type, _read_exactly(connection, length)


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def test_a_peer_sending_slowly_is_served_and_a_silent_one_aborted(
    server: RunningServer, ct_files: list[Path]
) -> None:
    source = ct_files[0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(_associate_request(server.settings.ae_title, pydicom.dcmread(source).SOPClassUID))
        assert _read_pdu(connection)[0] == 0x02, "association not accepted"
        command_pdu, data_set_pdu = _c_store_pdus(source)
        connection.sendall(command_pdu)
        # The data set in six pieces 0.4 s apart: 2 s in all, twice the idle timeout, but the peer
        # is never silent for longer than 0.4 s.
        pieces = 6
        step = -(-len(data_set_pdu) // pieces)
        for start in range(0, len(data_set_pdu), step):
            time.sleep(0.4)
            connection.sendall(data_set_pdu[start : start + step])
        pdu_type, body = _read_pdu(connection)
        assert pdu_type == 0x04
        # One PDV: length (4), context (1), control header (1), then the command set.
        response = decode(io.BytesIO(body[6:]), is_implicit_vr=True, is_little_endian=True)
        assert response.Status == 0x0000
        assert response.AffectedSOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID

        silent_since = time.monotonic()
        pdu_type, _ = _read_pdu(connection)
        silent_for = time.monotonic() - silent_since
        assert pdu_type == 0x07, "expected an A-ABORT after the peer fell silent"
        assert 0.9 * IDLE_TIMEOUT <= silent_for < 5 * IDLE_TIMEOUT
    assert _indexed_instance_uids(server.settings) == {str(pydicom.dcmread(source).SOPInstanceUID)}


def _storage_ae(sop_class: str) -> AE:
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    return ae


def test_associations_over_the_limit_are_rejected_until_one_ends(
    server_factory: ServerFactory, ct_files: list[Path]
) -> None:
    server = server_factory(maximum_associations=1)
    ae = _storage_ae(pydicom.dcmread(ct_files[0]).SOPClassUID)
    first = ae.associate("127.0.0.1", server.port, ae_title=server.settings.ae_title)
    assert first.is_established
    # Read from the A-ASSOCIATE-RJ received: pynetdicom's is_rejected can miss it (see
    # pacs_ai.dispatch.associate).
    second = request_association(ae, "127.0.0.1", server.port, server.settings.ae_title)
    assert second.refusal() == (
        "rejected the association: Rejected (Transient), "
        "DUL service-provider (presentation related): Local limit exceeded"
    )
    first.release()

    deadline = time.monotonic() + 5
    while True:  # the first association's thread ends just after it answered the release
        third = ae.associate("127.0.0.1", server.port, ae_title=server.settings.ae_title)
        if third.is_established or time.monotonic() > deadline:
            break
    assert third.is_established
    assert third.send_c_store(pydicom.dcmread(ct_files[0])).Status == 0x0000
    third.release()


def test_a_stopping_server_lets_associations_finish_then_aborts_them(
    server_factory: ServerFactory, ct_files: list[Path]
) -> None:
    grace = 1.5
    server = server_factory(shutdown_grace=grace, idle_timeout=30.0)
    ae = _storage_ae(pydicom.dcmread(ct_files[0]).SOPClassUID)
    association = ae.associate("127.0.0.1", server.port, ae_title=server.settings.ae_title)
    assert association.is_established

    stopping_since = time.monotonic()
    server.stop.set()
    time.sleep(grace / 2)  # within the grace period the association is still served
    assert association.send_c_store(pydicom.dcmread(ct_files[0])).Status == 0x0000
    server.serving.join(10)
    stopped_after = time.monotonic() - stopping_since

    assert not server.serving.is_alive()
    assert grace <= stopped_after < grace + 5
    deadline = time.monotonic() + 5
    while association.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert association.is_aborted


def test_the_listener_leaves_closing_to_the_requestor_after_a_rejection_or_a_release(
    server: RunningServer, ct_files: list[Path]
) -> None:
    """PS3.8 Sta13: after an A-ASSOCIATE-RJ or A-RELEASE-RP the requestor closes the connection.

    A listener closing first can make the requestor lose that PDU (pynetdicom's did, under load).
    """
    sop_class = pydicom.dcmread(ct_files[0]).SOPClassUID
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(_associate_request("SOMEONE_ELSE", sop_class))
        assert _read_pdu(connection)[0] == 0x03  # A-ASSOCIATE-RJ: the called AE title is not ours
        connection.settimeout(0.5)
        with pytest.raises(TimeoutError):
            connection.recv(1)  # still open: b"" would mean the listener closed it

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(_associate_request(server.settings.ae_title, sop_class))
        assert _read_pdu(connection)[0] == 0x02
        connection.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
        assert _read_pdu(connection)[0] == 0x06  # A-RELEASE-RP
        connection.settimeout(0.5)
        with pytest.raises(TimeoutError):
            connection.recv(1)
