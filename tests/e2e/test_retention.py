"""Retention on a running service, and the listener refusing associations when the disk is nearly full."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.dispatch.associate import RequestedAssociation, request_association
from pacs_ai.synthetic.phantom import write_chest_phantom
from tests.peers import storescu, wait_for
from tests.retention_setup import RULES, archive_and_down_destinations
from tests.service import REPO_ROOT, PacsAiService

pytestmark = pytest.mark.e2e


def _study(directory: Path, accession: str) -> str:
    study_uid = generate_uid()
    write_chest_phantom(
        directory,
        slices=4,
        size=64,
        pixel_spacing_mm=4.0,
        slice_spacing_mm=5.0,
        accession_number=accession,
        study_uid=study_uid,
    )
    return study_uid


def _spool_files(service: PacsAiService, study_uid: str) -> list[Path]:
    return [
        service.spool_file(key)
        for (key,) in service.query(
            "SELECT i.path FROM instances i JOIN series s ON s.id = i.series_fk "
            "JOIN studies t ON t.id = s.study_fk WHERE t.study_instance_uid = :uid",
            uid=study_uid,
        )
    ]


def test_age_retention_purges_a_delivered_study_and_keeps_an_undelivered_one(
    service_factory: Any, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO_ROOT / "dicom_profiles", profiles)
    (profiles / "rules.yaml").write_text(RULES, encoding="utf-8")
    destinations = archive_and_down_destinations(tmp_path)
    service = service_factory(
        destinations=destinations,
        profiles_dir=profiles,
        extra_env={
            "PACS_AI_RETENTION_DAYS": str(5 / 86400),  # 5 seconds
            "PACS_AI_RETENTION_INTERVAL_MINUTES": str(1 / 60),  # every second
            "PACS_AI_WORKLIST_ENABLED": "false",
        },
    )
    delivered = _study(tmp_path / "delivered", "ACC-OLD-SENT")
    undelivered = _study(tmp_path / "undelivered", "ACC-OLD-FAILED")
    for directory, ae in (("delivered", "ARCHIVED_SCU"), ("undelivered", "NO_PACS_SCU")):
        sent = storescu("127.0.0.1", service.port, service.ae_title, [tmp_path / directory], calling_aet=ae)
        assert sent.returncode == 0, sent.stderr

    purged = wait_for(
        lambda: service.query("SELECT object_uid, detail FROM audit_events WHERE action = 'study.purged'"),
        timeout=120,
        description="the delivered study purged by age",
    )
    assert [uid for uid, _ in purged] == [delivered]
    assert json.loads(purged[0][1])["limit"] == f"older than {5 / 86400:g} days"
    assert not any(path.exists() for path in _spool_files(service, delivered))
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 4, "delivered before it was purged"
    states = service.query("SELECT state FROM deliveries d JOIN results r ON r.id = d.result_fk")
    assert sorted(s for (s,) in states) == ["FAILED"] * 4 + ["SENT"] * 4

    # Several more retention passes later, the study with undelivered results is still whole.
    wait_for(
        lambda: "undelivered" in service.cli("purge", "--dry-run").stdout,
        timeout=30,
        description="purge --dry-run explaining the kept study",
    )
    assert all(path.is_file() for path in _spool_files(service, undelivered))
    rows = service.query("SELECT purged_at IS NOT NULL FROM instances ORDER BY id")
    assert [bool(flag) for (flag,) in rows].count(True) == 4
    shown = json.loads(service.cli("studies", "show", delivered, "--json").stdout)
    assert shown["series"][0]["purged_instances"] == 4


def _associate(service: PacsAiService) -> RequestedAssociation:
    ae = AE(ae_title="TEST_SCU")
    # Generous: the assertions are on the answer (rejected or accepted), not its speed.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    return request_association(ae, "127.0.0.1", service.port, service.ae_title)


class _RefusingService(PacsAiService):
    """Ready when its listener runs: the usual readiness check (a C-ECHO) cannot pass while it refuses."""

    def is_ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"pacs-ai exited with {self.process.returncode}:\n{self.stderr_tail()}")
        return self.run_state() is not None and "DICOM listener pid" in self.logs()


NO_WORKERS = {"PACS_AI_WORKER_PROCESSES": "0", "PACS_AI_WORKLIST_ENABLED": "false"}


def test_nearly_full_disk_rejects_associations_and_accepts_again_when_not(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "pacs-ai"
    refusing = _RefusingService(
        data_dir, extra_env={**NO_WORKERS, "PACS_AI_REFUSE_ASSOCIATIONS_BELOW_FREE_MB": str(10**9)}
    )
    with refusing:
        # Read from the A-ASSOCIATE-RJ received: pynetdicom's is_rejected can miss it (see
        # pacs_ai.dispatch.associate).
        assert _associate(refusing).refusal() == (
            "rejected the association: Rejected (Transient), "
            "DUL service-provider (presentation related): Local limit exceeded"
        )

        ((actor, detail),) = wait_for(
            lambda: refusing.query(
                "SELECT actor, detail FROM audit_events WHERE action = 'association.refused'"
            ),
            timeout=10,
            description="the refusal audited",
        )
        assert actor == "dicom:TEST_SCU" and "nearly full" in json.loads(detail)["reason"]
        assert "rejected: spool disk nearly full" in refusing.logs()
        status = refusing.cli("status", "--json")
        assert status.returncode == 1
        listener = json.loads(status.stdout)["listener"]
        assert listener["running"] is True and listener["accepting"] is False
        assert "nearly full" in listener["refusing_reason"]

    # The same data directory with a threshold the disk meets: associations are accepted again.
    with PacsAiService(data_dir, extra_env=NO_WORKERS) as restarted:
        assoc = _associate(restarted).association
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        report = json.loads(restarted.cli("status", "--json").stdout)
        assert report["listener"]["accepting"] is True and report["listener"]["refusing_reason"] is None
