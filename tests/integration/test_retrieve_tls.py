"""C-MOVE retrieval over DICOM TLS: the request and the C-STORE sub-operations both on mutual TLS.

What ``pacs-ai reprocess`` does to fetch a study the spool lost
(:class:`QueryRetrieveClient`), against Orthanc 1.10 with its DICOM TLS on
(``DicomTlsEnabled``, client certificates required) and pacs-ai's listener on
TLS only, requiring client certificates from the same CA: Orthanc answers the
C-MOVE on its TLS port and opens the sub-operations' association to the
listener's TLS port (its modality entry has ``UseDicomTls``).  Nothing here is
plain TCP, and a request without TLS, or with a certificate of another CA, is
refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_ai.config import Settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope, upgrade_schema
from pacs_ai.index.models import Instance
from pacs_ai.peer_settings import ListenerTls, QueryRetrievePeer, TlsOptions
from pacs_ai.receive.listener import acceptor_policy, open_listening_socket
from pacs_ai.receive.retrieve import QueryRetrieveClient, RetrieveError
from pacs_ai.receive.security import server_tls_context
from pacs_ai.receive.server import AssociationServer, ServerOptions
from pacs_ai.receive.store import StoreHandler
from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.peers import OrthancServer
from tests.tls_certificates import Pair, certificate_authority, issue

UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass
class TlsListener:
    port: int
    settings: Settings


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Pair]:
    ca = certificate_authority(tmp_path / "pki")
    return {
        "ca": ca,
        "listener": issue(ca, tmp_path / "pki", "pacs-ai", server=True),
        "orthanc": issue(ca, tmp_path / "pki", "orthanc", server=True, client_too=True),
        "scu": issue(ca, tmp_path / "pki", "pacs-ai-scu", server=False),
    }


@pytest.fixture
def tls_listener(tmp_path: Path, certificates: dict[str, Pair]) -> Iterator[TlsListener]:
    """pacs-ai's listener with TLS only on its port, client certificates from the test CA required."""
    settings = Settings(data_dir=tmp_path / "data", fsync=False, uid_prefix=UID_PREFIX, min_free_disk_mb=0)
    upgrade_schema(settings.effective_database_url)
    tls = ListenerTls(
        certificate_file=certificates["listener"].certificate,
        private_key_file=certificates["listener"].key,
        ca_file=certificates["ca"].certificate,
    )
    handler = StoreHandler(settings)
    listening = open_listening_socket("127.0.0.1", 0)
    server = AssociationServer(
        handler,
        acceptor_policy(settings),
        listening,
        ServerOptions(acse_timeout=10, idle_timeout=30),
        tls_context=server_tls_context(tls),
    )
    stop = threading.Event()
    serving = threading.Thread(target=server.serve, args=(stop, 2.0), daemon=True)
    serving.start()
    try:
        yield TlsListener(listening.getsockname()[1], settings)
    finally:
        stop.set()
        serving.join(15)
        listening.close()
    assert not serving.is_alive()


@pytest.fixture
def study(tmp_path: Path) -> PhantomTruth:
    return write_chest_phantom(tmp_path / "ct", slices=4, size=64, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)


def test_c_move_and_its_sub_operations_run_over_mutual_tls(
    tls_listener: TlsListener, certificates: dict[str, Pair], study: PhantomTruth
) -> None:
    orthanc_tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certificates["orthanc"].certificate),
        "DicomTlsPrivateKey": str(certificates["orthanc"].key),
        "DicomTlsTrustedCertificates": str(certificates["ca"].certificate),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {
            "pacsai": {
                "AET": tls_listener.settings.ae_title,
                "Host": "127.0.0.1",
                "Port": tls_listener.port,
                "UseDicomTls": True,
            }
        },
    }
    with OrthancServer(extra_config=orthanc_tls) as orthanc:
        for path in study.paths:
            orthanc._request("POST", "/instances", data=path.read_bytes())
        (series,) = orthanc.series_of_study(study.study_uid)
        assert len(series["Instances"]) == len(study.paths)

        peer = QueryRetrievePeer(
            ae_title=orthanc.aet,
            host=orthanc.host,
            port=orthanc.dicom_port,
            timeout_seconds=30,
            tls=TlsOptions(
                ca_file=certificates["ca"].certificate,
                cert_file=certificates["scu"].certificate,
                key_file=certificates["scu"].key,
            ),
        )
        client = QueryRetrieveClient(peer, calling_ae_title=tls_listener.settings.ae_title)
        (found,) = client.find_series(study.study_uid)
        outcome = client.move_series(
            study.study_uid, found.series_instance_uid, destination=tls_listener.settings.ae_title
        )
        assert outcome.ok, outcome
        assert outcome.progress.completed == len(study.paths)
        assert _indexed(tls_listener) == {str(pydicom.dcmread(path).SOPInstanceUID) for path in study.paths}

        # Refused: the C-MOVE request on plain TCP, and one with a client certificate of another CA.
        plain = QueryRetrieveClient(
            peer.model_copy(update={"tls": None, "timeout_seconds": 5}), calling_ae_title="PACS_AI"
        )
        with pytest.raises(RetrieveError):
            plain.find_series(study.study_uid)
        stranger_ca = certificate_authority(certificates["ca"].certificate.parent / "other", "other-ca")
        stranger = issue(stranger_ca, stranger_ca.certificate.parent, "stranger", server=False)
        foreign = peer.model_copy(
            update={
                "timeout_seconds": 5,
                "tls": TlsOptions(
                    ca_file=certificates["ca"].certificate,
                    cert_file=stranger.certificate,
                    key_file=stranger.key,
                ),
            }
        )
        with pytest.raises(RetrieveError):
            QueryRetrieveClient(foreign, calling_ae_title="PACS_AI").find_series(study.study_uid)


def _indexed(listener: TlsListener) -> set[str]:
    sessions = make_session_factory(make_engine(listener.settings.effective_database_url))
    with session_scope(sessions) as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))
