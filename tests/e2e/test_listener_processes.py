"""Several listener processes share the DICOM port: new associations go to the least busy one."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.service import PacsAiService

pytestmark = pytest.mark.e2e

TWO_LISTENERS = {
    "PACS_AI_LISTENER_PROCESSES": "2",
    "PACS_AI_WORKER_PROCESSES": "0",
    "PACS_AI_WORKLIST_ENABLED": "false",
    "PACS_AI_LOG_LEVEL": "INFO",
}


def _associate(service: PacsAiService, calling_ae: str) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    assert assoc.is_established
    return assoc


def _local_port(assoc: Association) -> int:
    return int(assoc.dul.socket.socket.getsockname()[1])  # type: ignore[union-attr]


def _process_of_each_port(service: PacsAiService, calling_ae: str, expected: int) -> dict[int, str]:
    """Client port -> pid of the listener process that logged the association as established."""
    pattern = re.compile(
        rf"\[(\d+)\] pacs_ai\.receive\.server: association established from {calling_ae} "
        rf"\(127\.0\.0\.1:(\d+)\)"
    )
    log_path = service.data_dir / "logs" / "pacs-ai.log"
    deadline = time.monotonic() + 10
    while True:
        found = {int(port): pid for pid, port in pattern.findall(log_path.read_text())}
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_associations_held_open_are_spread_evenly(service_factory: Any) -> None:
    service = service_factory(extra_env=TWO_LISTENERS)
    held: list[Association] = []
    try:
        # One at a time, each held open: every new one must go to the process serving fewer.
        for _ in range(6):
            held.append(_associate(service, "SPREAD"))
            assert held[-1].send_c_echo().Status == 0x0000
        process_of = _process_of_each_port(service, "SPREAD", 6)
        assert sorted(Counter(process_of.values()).values()) == [3, 3], process_of

        # Associations that end stop counting: once every association of one process is
        # released, that process serves none and takes each of the next three.
        emptied = process_of[_local_port(held[0])]
        for assoc in [a for a in held if process_of[_local_port(a)] == emptied]:
            assoc.release()
            held.remove(assoc)
        time.sleep(0.5)  # the listener counts an association as over once its task has ended
        for _ in range(3):
            held.append(_associate(service, "AGAIN"))
        again = _process_of_each_port(service, "AGAIN", 3)
        assert list(again.values()) == [emptied] * 3, again
    finally:
        for assoc in held:
            assoc.release()
