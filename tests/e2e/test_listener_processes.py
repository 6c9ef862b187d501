"""Several listener processes share the DICOM port: new associations go to the least busy one."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
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
        time.sleep(0.5)  # the listener counts an association as over once its thread has ended
        for _ in range(3):
            held.append(_associate(service, "AGAIN"))
        again = _process_of_each_port(service, "AGAIN", 3)
        assert list(again.values()) == [emptied] * 3, again
    finally:
        for assoc in held:
            assoc.release()


def _resident_megabytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _loaded_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_killed_listener_process_is_replaced_and_listeners_stay_light(service_factory: Any) -> None:
    service = service_factory(extra_env=TWO_LISTENERS)
    state = service.run_state()
    assert state is not None
    first_pids = state["listener_pids"]
    assert len(first_pids) == 2
    for pid in first_pids:
        # A listener imports the receive path only: no worker libraries (Celery, torch), no web
        # app; with them it was about 165 MB.
        assert _resident_megabytes(pid) < 140, f"listener {pid}: {_resident_megabytes(pid):.0f} MB"
        assert "torch" not in _loaded_files(pid)

    os.kill(first_pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = service.run_state() or {}
        pids = state.get("listener_pids", first_pids)
        if pids[0] != first_pids[0]:
            break
        time.sleep(0.2)
    assert pids[0] != first_pids[0] and pids[1] == first_pids[1], pids
    assert "listener-0" in service.logs() and "restarting it" in service.logs()
    ready = f"DICOM listener pid {pids[0]}: AE"
    while ready not in service.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready in service.logs(), "the new listener process never became ready"

    # Both processes take associations again (the new one, being the least busy, the next one).
    held = [_associate(service, "AFTER") for _ in range(2)]
    try:
        process_of = _process_of_each_port(service, "AFTER", 2)
        assert sorted(process_of.values()) == sorted(str(pid) for pid in pids), process_of
    finally:
        for assoc in held:
            assoc.release()
