"""Each kind of destination against a real receiver: Orthanc by STOW-RS and by C-STORE over TLS, a folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pacs_ai.dispatch.check import check_destination
from pacs_ai.dispatch.errors import DeliveryError
from pacs_ai.dispatch.senders import send
from pacs_ai.peer_settings import DicomDestination, DicomWebDestination, FolderDestination, TlsOptions
from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.peers import (
    OrthancServer,
    free_port,
    orthanc_dicomweb_config,
    orthanc_tls_config,
    self_signed_certificate,
)


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    return write_chest_phantom(tmp_path_factory.mktemp("ct"), slices=3, size=128, pixel_spacing_mm=2.0)


def test_stow_rs_stores_in_orthanc_and_reports_http_errors(slices: PhantomTruth) -> None:
    with OrthancServer(extra_config=orthanc_dicomweb_config()) as orthanc:
        web = DicomWebDestination(type="dicomweb", url=f"{orthanc.url}/dicom-web")
        send(web, slices.paths, calling_ae_title="PACS_AI")
        [series] = orthanc.series_of_study(slices.study_uid)
        assert len(series["Instances"]) == len(slices.paths)

        wrong = DicomWebDestination(type="dicomweb", url=f"{orthanc.url}/no-such-root")
        with pytest.raises(DeliveryError) as raised:
            send(wrong, slices.paths[:1], calling_ae_title="PACS_AI")
        assert raised.value.status == 404
    with pytest.raises(DeliveryError, match="could not be reached"):
        send(web, slices.paths[:1], calling_ae_title="PACS_AI")


def test_c_store_over_tls_verifies_the_peer(slices: PhantomTruth, tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    with OrthancServer(extra_config=orthanc_tls_config(cert, key)) as orthanc:
        secure = DicomDestination(
            ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port, tls=TlsOptions(ca_file=cert)
        )
        send(secure, slices.paths[:1], calling_ae_title="PACS_AI")
        [series] = orthanc.series_of_study(slices.study_uid)
        assert len(series["Instances"]) == 1

        # A peer whose certificate we do not trust is never sent to, and plain DICOM is not accepted.
        (tmp_path / "other").mkdir()
        untrusted_ca, _ = self_signed_certificate(tmp_path / "other")
        distrustful = secure.model_copy(update={"tls": TlsOptions(ca_file=untrusted_ca)})
        with pytest.raises(DeliveryError, match="could not be reached"):
            send(distrustful, slices.paths[1:2], calling_ae_title="PACS_AI")
        plain = secure.model_copy(update={"tls": None, "timeout_seconds": 5})
        with pytest.raises(DeliveryError):
            send(plain, slices.paths[1:2], calling_ae_title="PACS_AI")
        assert len(orthanc.series_of_study(slices.study_uid)[0]["Instances"]) == 1


def test_folder_destination_writes_whole_files_atomically(slices: PhantomTruth, tmp_path: Path) -> None:
    share = FolderDestination(type="folder", path=tmp_path / "share")
    send(share, slices.paths, calling_ae_title="PACS_AI")
    study_dir = tmp_path / "share" / slices.study_uid
    written = sorted(study_dir.iterdir())
    assert len(written) == len(slices.paths)
    assert not [p for p in written if p.name.startswith(".")]
    assert {p.read_bytes() for p in written} == {p.read_bytes() for p in slices.paths}

    send(share, slices.paths[:1], calling_ae_title="PACS_AI")  # again: replaced, not doubled
    assert len(list(study_dir.iterdir())) == len(slices.paths)

    if os.geteuid() != 0:  # root ignores directory permissions
        study_dir.chmod(0o500)
        with pytest.raises(DeliveryError, match="cannot write"):
            send(share, slices.paths[:1], calling_ae_title="PACS_AI")
    blocked = FolderDestination(type="folder", path=slices.paths[0])  # a file where a folder should be
    with pytest.raises(DeliveryError, match="cannot write"):
        send(blocked, slices.paths[:1], calling_ae_title="PACS_AI")


def test_a_pacs_that_refuses_is_named_with_its_reason(slices: PhantomTruth) -> None:
    """What an IT team setting up a peer needs to read: who refused, and the standard's reason."""
    with OrthancServer(extra_config={"DicomCheckCalledAet": True}) as orthanc:
        misnamed = DicomDestination(ae_title="NOT_ORTHANC", host=orthanc.host, port=orthanc.dicom_port)
        said = rf"NOT_ORTHANC@{orthanc.host}:{orthanc.dicom_port} rejected the association: "
        reason = r"Rejected \(Permanent\), DUL service-user: Called AE title not recognised"
        with pytest.raises(DeliveryError, match=said + reason):
            send(misnamed, slices.paths[:1], calling_ae_title="PACS_AI")
        echoed = check_destination(misnamed, calling_ae_title="PACS_AI")
        assert echoed is not None and re.match(said + reason, echoed)
        assert orthanc.series_of_study(slices.study_uid) == []

    nobody = DicomDestination(ae_title="NOBODY", host="127.0.0.1", port=free_port(), timeout_seconds=5)
    unreachable = r"NOBODY@127.0.0.1:\d+ could not be reached \(connection refused"
    with pytest.raises(DeliveryError, match=unreachable):
        send(nobody, slices.paths[:1], calling_ae_title="PACS_AI")


def test_a_pacs_that_takes_none_of_the_proposed_contexts_is_named_with_them(slices: PhantomTruth) -> None:
    """An association accepted with every presentation context refused (an archive that does not
    store the SOP class, or only compressed transfer syntaxes) says which SOP classes were offered."""
    jpeg_only = {"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2.4.50"]}
    with OrthancServer(extra_config=jpeg_only) as orthanc:
        picky = DicomDestination(ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port)
        offered = r"accepted the association but none of the presentation contexts proposed \(does it store "
        with pytest.raises(DeliveryError, match=offered + r"CT Image Storage, in one of"):
            send(picky, slices.paths[:1], calling_ae_title="PACS_AI")
