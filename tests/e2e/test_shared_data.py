"""Real scanner files from ../shared/data: each is received, stored and given a clear outcome."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.e2e.conftest import BACKENDS
from tests.peers import require_shared_data, storescu, wait_for
from tests.service import REPO_ROOT

pytestmark = pytest.mark.e2e

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

#: A site profile that sends every CT series of 20+ slices to the lung analyzer,
#: so the tilted head CT reaches volume assembly (and must be refused there).
ANY_CT_PROFILE = """
name: any-ct-volume
description: every CT volume to the lung analyzer (test site profile)
match:
  modality: [CT]
  min_instances: 20
analyzers:
  - name: ct-chest-lung
destinations: []
"""


def _series_row(service: Any, series_uid: str) -> tuple[str, str | None] | None:
    rows = service.query(
        "SELECT routing_state, routing_detail FROM series WHERE series_instance_uid = :uid", uid=series_uid
    )
    return rows[0] if rows and rows[0][0] != "RECEIVING" else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_files_are_stored_with_a_clear_outcome(
    backend: str, service_factory: Any, tmp_path: Path
) -> None:
    head_ct = require_shared_data("ct-head-ge")
    chest_slices = require_shared_data("ct-chest-slices")
    radiograph = require_shared_data("cxr-cr")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(REPO_ROOT / "dicom_profiles" / "ct-chest-lungs.yaml", profiles)
    (profiles / "any-ct-volume.yaml").write_text(ANY_CT_PROFILE)
    service = service_factory(backend=backend, profiles_dir=profiles)

    for folder in (head_ct, chest_slices, radiograph):
        sent = storescu("127.0.0.1", service.port, service.ae_title, [folder], calling_aet="MODALITY")
        assert sent.returncode == 0, sent.stderr

    all_files = sorted([*head_ct.glob("*.dcm"), *chest_slices.glob("*.dcm"), *radiograph.glob("*.dcm")])
    assert service.query("SELECT count(*) FROM instances")[0][0] == len(all_files)

    # Every stored file is the instance as sent: same UIDs, same pixel data, and the transfer
    # syntax it arrived in (storescu may send uncompressed files in another uncompressed syntax).
    for original_path in all_files:
        original = pydicom.dcmread(original_path)
        ((path, syntax),) = service.query(
            "SELECT path, transfer_syntax_uid FROM instances WHERE sop_instance_uid = :uid",
            uid=original.SOPInstanceUID,
        )
        stored = pydicom.dcmread(service.spool_file(path))
        assert syntax == stored.file_meta.TransferSyntaxUID
        if original.file_meta.TransferSyntaxUID.is_compressed:
            assert syntax == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData

    # The tilted, unevenly spaced GE head CT reaches the analyzer and is refused with the reason.
    head = pydicom.dcmread(next(head_ct.glob("*.dcm")), stop_before_pixels=True)
    wait_for(
        lambda: service.query("SELECT state FROM jobs WHERE state = 'FAILED'"),
        timeout=90,
        description="the head CT job to finish",
    )
    ((state, error),) = service.query(
        "SELECT j.state, j.error FROM jobs j JOIN series s ON s.id = j.series_fk "
        "WHERE s.series_instance_uid = :uid",
        uid=head.SeriesInstanceUID,
    )
    assert state == "FAILED"
    assert error.startswith("input:") and "tilt" in error

    # The chest slices without Modality: stored, and recorded as matching no profile, with why.
    chest = pydicom.dcmread(next(chest_slices.glob("*.dcm")), stop_before_pixels=True)
    routing_state, detail = wait_for(
        lambda: _series_row(service, chest.SeriesInstanceUID),
        timeout=30,
        description="the chest slices to be routed",
    )
    assert routing_state == "UNMATCHED"
    assert "Modality is missing" in detail

    # The JPEG radiograph: stored compressed as received, decodable, recorded as unmatched.
    cxr_original = pydicom.dcmread(next(radiograph.glob("*.dcm")))
    routing_state, detail = wait_for(
        lambda: _series_row(service, cxr_original.SeriesInstanceUID),
        timeout=30,
        description="the radiograph to be routed",
    )
    assert routing_state == "UNMATCHED"
    ((path, syntax),) = service.query(
        "SELECT path, transfer_syntax_uid FROM instances WHERE sop_instance_uid = :uid",
        uid=cxr_original.SOPInstanceUID,
    )
    assert syntax == JPEG_BASELINE
    pixels = pydicom.dcmread(service.spool_file(path)).pixel_array
    assert pixels.shape == (1024, 1024) and np.ptp(pixels) > 0

    audit = service.query("SELECT action, object_uid FROM audit_events WHERE action = 'series.unmatched'")
    assert {uid for _, uid in audit} >= {chest.SeriesInstanceUID, cxr_original.SeriesInstanceUID}
