"""The listener's promises: acknowledged means durable; bad input gets a status and a record."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.synthetic.phantom import PhantomTruth
from tests.e2e.conftest import BACKENDS
from tests.e2e.metrics_scrape import samples, value
from tests.peers import echoscu, storescu
from tests.service import PacsAiService

pytestmark = pytest.mark.e2e

#: The listener alone: no analysis worker, and no worklist web app (a process these tests never ask).
NO_WORKERS = {"PACS_AI_WORKER_PROCESSES": "0", "PACS_AI_WORKLIST_ENABLED": "false"}


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsAiService]:
    """One listener for the tests that send it what it must refuse (its start and stop cost more than
    the tests): each test calls from an AE title of its own and looks only at what that AE title did."""
    with PacsAiService(tmp_path_factory.mktemp("listener") / "pacs-ai", extra_env=NO_WORKERS) as service:
        yield service


def _rejection(service: PacsAiService, calling_ae: str) -> str:
    """The detail of the one refusal the index records of what ``calling_ae`` sent."""
    ((detail,),) = service.query(
        "SELECT detail FROM audit_events WHERE action = 'instance.rejected' AND actor = :actor",
        actor=f"dicom:{calling_ae}",
    )
    return str(detail)


def _association(service: PacsAiService, calling_ae: str = "TEST_SCU"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5  # a killed peer must not stall the test
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_instances_are_kept_once_and_recorded(
    backend: str, chest_phantom: PhantomTruth, service_factory: Any
) -> None:
    service = service_factory(backend=backend, extra_env=NO_WORKERS)
    first = chest_phantom.paths[:3]
    for _ in range(2):
        sent = storescu("127.0.0.1", service.port, service.ae_title, first)
        assert sent.returncode == 0, sent.stderr
    rows = service.query("SELECT sop_instance_uid, duplicates_received FROM instances")
    assert len(rows) == 3 and all(copies == 1 for _, copies in rows)
    audit = service.query("SELECT detail FROM audit_events WHERE action = 'instance.duplicate'")
    assert len(audit) == 3 and all("duplicate-kept-first" in str(detail) for (detail,) in audit)


def test_missing_type1_uid_is_refused_with_a_status_and_recorded(
    chest_phantom: PhantomTruth, listener: PacsAiService
) -> None:
    service = listener
    before = samples(service.scrape())
    dataset = pydicom.dcmread(chest_phantom.paths[0])
    dataset.SOPInstanceUID = generate_uid()
    del dataset.StudyInstanceUID

    assoc = _association(service, "TYPE1_SCU")
    status = assoc.send_c_store(dataset)
    assoc.release()

    assert status.Status == 0xA900
    assert service.query("SELECT count(*) FROM instances")[0][0] == 0
    assert "StudyInstanceUID" in _rejection(service, "TYPE1_SCU")
    assert echoscu("127.0.0.1", service.port, service.ae_title), "listener must survive bad input"
    assert not echoscu("127.0.0.1", service.port, "NOT_PACS_AI")
    # Prometheus sees the refusal by its status, the echo, and the association refused by its class.
    scraped = samples(service.scrape())

    def added(name: str, **labels: str) -> float:
        return value(scraped, name, **labels) - value(before, name, **labels)

    assert added("pacs_ai_dimse_responses_total", command="C-STORE", status="0xA900") == 1
    # The service's own readiness check echoes too.
    assert value(scraped, "pacs_ai_dimse_responses_total", command="C-ECHO", status="0x0000") >= 2
    assert value(scraped, "pacs_ai_ingest_instances_total") == 0
    assert added("pacs_ai_store_seconds_count") == 1
    assert value(scraped, "pacs_ai_associations_total", calling_ae="TYPE1_SCU") == 1
    assert added("pacs_ai_associations_rejected_total", reason="called-ae") == 1


def test_overlong_uid_is_refused_not_shortened(chest_phantom: PhantomTruth, listener: PacsAiService) -> None:
    service = listener
    dataset = pydicom.dcmread(chest_phantom.paths[0])
    dataset.SOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = dataset.SeriesInstanceUID + ".12345"  # 65+ characters: not a UID

    assoc = _association(service, "LONG_UID_SCU")
    status = assoc.send_c_store(dataset)
    assoc.release()

    assert status.Status == 0xC000
    assert service.query("SELECT count(*) FROM instances")[0][0] == 0
    detail = _rejection(service, "LONG_UID_SCU")
    assert "SeriesInstanceUID" in detail and "not a valid UID" in detail


def test_nearly_full_disk_refuses_with_out_of_resources(
    chest_phantom: PhantomTruth, service_factory: Any
) -> None:
    service = service_factory(extra_env={**NO_WORKERS, "PACS_AI_MIN_FREE_DISK_MB": str(10**9)})
    assoc = _association(service)
    status = assoc.send_c_store(pydicom.dcmread(chest_phantom.paths[0]))
    assoc.release()
    assert status.Status == 0xA700
    assert service.query("SELECT count(*) FROM instances")[0][0] == 0
    assert list((service.data_dir / "spool").rglob("*.dcm")) == []
    ((detail,),) = service.query("SELECT detail FROM audit_events WHERE action = 'instance.rejected'")
    assert "free" in str(detail)


def test_every_acknowledged_instance_survives_a_crash(
    chest_phantom: PhantomTruth, service_factory: Any, tmp_path: Path
) -> None:
    """SIGKILL the whole service mid-transfer; after restart every acknowledged instance is intact."""
    service = service_factory(extra_env=NO_WORKERS)
    acknowledged: list[str] = []
    killed = threading.Event()

    def kill_after_some() -> None:
        while len(acknowledged) < 10:
            threading.Event().wait(0.01)
        state = service.run_state()
        assert state is not None
        for pid in [*state["listener_pids"], state["service_pid"]]:
            os.kill(pid, signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_after_some, daemon=True)
    killer.start()
    assoc = _association(service)
    for path in chest_phantom.paths:
        if not assoc.is_established:
            break
        try:
            response = assoc.send_c_store(pydicom.dcmread(path))
        except RuntimeError:  # the association died with the service
            break
        if "Status" in response and response.Status == 0x0000:
            acknowledged.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    if assoc.is_established:
        assoc.abort()
    killer.join(timeout=30)
    assert killed.is_set() and len(acknowledged) >= 10

    # Orphaned children of the killed service (embedded redis) must not block the restart.
    restarted = PacsAiService(service.data_dir, extra_env=NO_WORKERS)
    restarted.port = service.port
    restarted.env["PACS_AI_LISTEN_PORT"] = str(service.port)
    with restarted:
        indexed = dict(restarted.query("SELECT sop_instance_uid, path FROM instances"))
        for uid in acknowledged:
            assert uid in indexed, f"acknowledged instance {uid} was lost"
            stored = pydicom.dcmread(restarted.spool_file(indexed[uid]))
            original = next(
                p
                for p in chest_phantom.paths
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == uid
            )
            assert stored.PixelData == pydicom.dcmread(original).PixelData


def test_a_silent_association_is_aborted_and_the_listener_serves_on(service_factory: Any) -> None:
    service = service_factory(
        backend="embedded",
        extra_env={
            **NO_WORKERS,
            "PACS_AI_ASSOCIATION_IDLE_TIMEOUT_SECONDS": "1",
            "PACS_AI_LISTENER_PROCESSES": "1",
        },
    )
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    for _ in range(3):  # messages 0.6 s apart: each re-arms the 1 s timer
        time.sleep(0.6)
        assert assoc.send_c_echo().Status == 0x0000
    started = time.monotonic()
    while assoc.is_established and time.monotonic() - started < 10:
        time.sleep(0.05)
    silent_for = time.monotonic() - started
    assert assoc.is_aborted, "a silent association was never aborted"
    assert 0.9 <= silent_for < 5, f"aborted after {silent_for:.1f} s of silence; the timeout is 1 s"
    assert "silent too long" in service.logs()
    assert echoscu("127.0.0.1", service.port, service.ae_title)
