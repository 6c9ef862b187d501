"""Smoke tests proving the real-peer helpers in ``tests.peers`` work against Orthanc and DCMTK.

Every other integration test builds on these helpers, so a failure here points at the environment
(Orthanc, DCMTK, dicom3tools, shared data) rather than at pacs-ai code.  Nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.peers import (
    ORTHANC_BINARY,
    OrthancServer,
    PeerError,
    StoreScp,
    dciodvfy_errors,
    dcmtk,
    echoscu,
    forward_lua,
    require_shared_data,
    storescu,
    wait_for,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
CT_HEAD_FILES = 28


@pytest.fixture(autouse=True)
def _require_peers() -> None:
    """Skip (with the reason) when Orthanc or DCMTK is not installed on this machine."""
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc not installed ({ORTHANC_BINARY}); apt-get install orthanc")
    try:
        dcmtk("storescu")
    except PeerError as exc:
        pytest.skip(str(exc))


def _study_uid(path: Path) -> str:
    """StudyInstanceUID of a DICOM file (header only)."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_orthanc_echo_store_find_download(tmp_path: Path) -> None:
    """C-ECHO and C-STORE into Orthanc with DCMTK, find the study over REST, download and verify it."""
    source = require_shared_data("ct-head-ge") / "01.dcm"
    with OrthancServer(aet="SMOKE") as orthanc:
        assert echoscu(orthanc.host, orthanc.dicom_port, "SMOKE")

        result = storescu(orthanc.host, orthanc.dicom_port, "SMOKE", [source])
        assert result.returncode == 0, result.stderr

        study_id = orthanc.find_study(_study_uid(source))
        assert study_id is not None and study_id in orthanc.studies()
        (series,) = orthanc.series_of_study(_study_uid(source))
        assert series["Modality"] == "CT"
        assert series["SOPClassUIDs"] == [CT_IMAGE_STORAGE]
        (instance,) = orthanc.instances_of_series(series["ID"])

        downloaded = orthanc.download_instance(instance["ID"], tmp_path / "downloaded.dcm")
        original = pydicom.dcmread(source)
        copy = pydicom.dcmread(downloaded)
        assert copy.SOPInstanceUID == original.SOPInstanceUID
        assert copy.PixelData == original.PixelData
        # dciodvfy runs on both; Orthanc storage must not introduce new IOD errors.
        assert set(dciodvfy_errors(downloaded)) <= set(dciodvfy_errors(source))

        orthanc.delete_study(study_id)
        assert orthanc.find_study(_study_uid(source)) is None


def test_storescu_keeps_compressed_transfer_syntax() -> None:
    """A JPEG Baseline file reaches Orthanc as JPEG (storescu proposes the file's own syntax)."""
    source = require_shared_data("cxr-cr") / "siim_cr.dcm"
    with OrthancServer() as orthanc:
        result = storescu(orthanc.host, orthanc.dicom_port, orthanc.aet, [source])
        assert result.returncode == 0, result.stderr
        (series,) = orthanc.series_of_study(_study_uid(source))
        (instance_id,) = series["Instances"]
        assert (
            orthanc.get_json(f"/instances/{instance_id}/metadata?expand")["TransferSyntax"] == JPEG_BASELINE
        )


def test_lua_forwards_ct_received_over_dicom() -> None:
    """Orthanc A forwards CT (not CR) instances received over DICOM to Orthanc B via forward_lua."""
    ct_dir = require_shared_data("ct-head-ge")
    cr_file = require_shared_data("cxr-cr") / "siim_cr.dcm"
    with OrthancServer(aet="PACS_B") as pacs_b:
        modalities = {"pacs_b": ("PACS_B", pacs_b.host, pacs_b.dicom_port)}
        lua = forward_lua("pacs_b", only_modality="CT", skip_from_aets=["PACS_B"])
        with OrthancServer(aet="PACS_A", modalities=modalities, lua=lua) as pacs_a:
            # The CR goes first: Lua events are handled in order, so once all CT slices reached B,
            # a wrongly forwarded CR would already be there too.
            result = storescu(
                pacs_a.host, pacs_a.dicom_port, "PACS_A", [cr_file, ct_dir], calling_aet="MODALITY"
            )
            assert result.returncode == 0, result.stderr
            assert len(pacs_a.studies()) == 2

            ct_uid = _study_uid(ct_dir / "01.dcm")

            def forwarded_count() -> int:
                return sum(len(s["Instances"]) for s in pacs_b.series_of_study(ct_uid))

            wait_for(
                lambda: forwarded_count() == CT_HEAD_FILES,
                timeout=60,
                interval=0.5,
                description=f"{CT_HEAD_FILES} CT instances forwarded to PACS_B",
            )
            assert pacs_b.find_study(_study_uid(cr_file)) is None
            assert pacs_b.studies() == [pacs_b.find_study(ct_uid)]


def test_storescp_receives_files_over_parallel_associations() -> None:
    """DCMTK storescp (--fork) receives a series sent over 4 concurrent associations, plus a JPEG file."""
    ct_dir = require_shared_data("ct-head-ge")
    cr_file = require_shared_data("cxr-cr") / "siim_cr.dcm"
    with StoreScp() as scp:
        result = storescu(scp.host, scp.port, scp.aet, [ct_dir], associations=4)
        assert result.returncode == 0, result.stderr
        assert len(result.args) == 4
        assert len(scp.received_files()) == CT_HEAD_FILES

        scp.clear()
        result = storescu(scp.host, scp.port, scp.aet, [cr_file])
        assert result.returncode == 0, result.stderr
        (received,) = scp.received_files()
        meta = pydicom.filereader.read_file_meta_info(received)
        assert meta.TransferSyntaxUID == JPEG_BASELINE
