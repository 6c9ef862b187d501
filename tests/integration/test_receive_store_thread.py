"""Where a listener process files a received data set: on its event loop when it serves one
association, on a worker thread when it serves more (so the others keep being read meanwhile).

Real spool and SQLite index; the data set goes through the same ``_DataSetFile`` the network
loop writes into.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import pydicom
import pytest

from pacs_ai.config import Settings
from pacs_ai.index.db import upgrade_schema
from pacs_ai.index.ingest import Sender
from pacs_ai.receive.dimse import C_STORE_RQ, Command
from pacs_ai.receive.headers import STATUS_SUCCESS
from pacs_ai.receive.listener import acceptor_policy
from pacs_ai.receive.server import AssociationServer, _DataSetFile
from pacs_ai.receive.store import StoreHandler
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.peers import data_set_bytes

UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@pytest.fixture
def handler(tmp_path: Path) -> StoreHandler:
    settings = Settings(data_dir=tmp_path / "data", fsync=False, uid_prefix=UID_PREFIX, min_free_disk_mb=0)
    upgrade_schema(settings.effective_database_url)
    return StoreHandler(settings)


def _store_while_serving(handler: StoreHandler, source: Path, associations: int) -> tuple[int, str]:
    """Store ``source`` through an AssociationServer serving ``associations`` associations.

    Returns the status and the name of the thread that filed it (from the store's log record).
    """
    header = pydicom.dcmread(source, stop_before_pixels=True)
    command = Command(C_STORE_RQ, 1, True, str(header.SOPClassUID), str(header.SOPInstanceUID))
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    store_log = logging.getLogger("pacs_ai.receive.store")
    collect, level = Collect(), store_log.level
    store_log.addHandler(collect)
    store_log.setLevel(logging.DEBUG)

    async def serve() -> int:
        with socket.socket() as unused:
            server = AssociationServer(handler, acceptor_policy(handler.settings), unused)
            others = [asyncio.create_task(asyncio.sleep(60)) for _ in range(associations)]
            server.associations.update(others)
            try:
                data_set = _DataSetFile(handler.spool, command, str(header.file_meta.TransferSyntaxUID))
                data_set.write(data_set_bytes(source))
                status, _ = await server.store(data_set, Sender("STORESCU", "127.0.0.1"))
            finally:
                for task in others:
                    task.cancel()
                server._executor.shutdown(wait=True)
            return status

    try:
        status = asyncio.run(serve())
    finally:
        store_log.removeHandler(collect)
        store_log.setLevel(level)
    stored = [record for record in records if record.getMessage().startswith("stored ")]
    assert len(stored) == 1, [record.getMessage() for record in records]
    return status, stored[0].threadName or ""


@pytest.mark.parametrize("associations", [1, 2, 4])
def test_a_store_goes_to_a_worker_thread_only_when_other_associations_share_the_process(
    handler: StoreHandler, tmp_path: Path, associations: int
) -> None:
    source_dir = tmp_path / "ct"
    write_chest_phantom(source_dir, slices=3, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)
    source = sorted(source_dir.glob("*.dcm"))[0]

    status, thread = _store_while_serving(handler, source, associations)

    assert status == STATUS_SUCCESS
    if associations == 1:
        assert thread == threading.main_thread().name  # the event loop's own thread
    else:
        assert thread.startswith("store")
    stored = list(handler.spool.root.glob("*/*/*.dcm"))
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID
    assert list(handler.spool.tmp_dir.iterdir()) == []
