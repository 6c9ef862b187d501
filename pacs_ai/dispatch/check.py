"""Is a destination there?  A cheap, harmless probe per kind, for ``pacs-ai echo`` and ``status``."""

from __future__ import annotations

import os
import tempfile

import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.dispatch.associate import request_association
from pacs_ai.dispatch.cstore import tls_context
from pacs_ai.dispatch.stow import http_session
from pacs_ai.peer_settings import Destination, DicomDestination, DicomWebDestination


def check_destination(destination: Destination, *, calling_ae_title: str) -> str | None:
    """None when the destination answers; otherwise what went wrong, in words."""
    if isinstance(destination, DicomDestination):
        return _echo(destination, calling_ae_title)
    if isinstance(destination, DicomWebDestination):
        return _qido(destination)
    return _writable(destination.path)


def _echo(destination: DicomDestination, calling_ae_title: str) -> str | None:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_seconds
    ae.add_requested_context(Verification)
    tls_args = None
    if destination.tls is not None:
        tls_args = (tls_context(destination.tls), destination.tls.server_hostname or destination.host)
    requested = request_association(ae, destination.host, destination.port, destination.ae_title, tls_args)
    assoc = requested.association
    refusal = requested.refusal()
    if refusal is not None:
        return f"{destination.describe()} {refusal} (check the AE titles, host, port and firewall)"
    try:
        response = assoc.send_c_echo()
        status = int(response.Status) if "Status" in response else None
    finally:
        assoc.release()
    if status != 0x0000:
        return "no C-ECHO response" if status is None else f"C-ECHO status 0x{status:04X}"
    return None


def _qido(destination: DicomWebDestination) -> str | None:
    try:
        response = http_session(destination).get(
            f"{destination.url.rstrip('/')}/studies",
            params={"limit": "1"},
            headers={"Accept": "application/dicom+json"},
            timeout=destination.timeout_seconds,
        )
    except requests.RequestException as exc:
        return f"not reachable: {exc}"
    if response.status_code not in (200, 204):
        return f"QIDO-RS answered HTTP {response.status_code}"
    return None


def _writable(path: os.PathLike[str]) -> str | None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pacs-ai-check-"):
            pass
    except OSError as exc:
        return f"cannot write there: {exc}"
    return None
