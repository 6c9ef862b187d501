"""Sending DICOM files to a DICOMweb server with STOW-RS (dicomweb-client)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from pacs_ai.dispatch.errors import DeliveryError
from pacs_ai.peer_settings import DicomWebDestination

log = logging.getLogger(__name__)


def http_session(destination: DicomWebDestination) -> requests.Session:
    """A requests session with the destination's credentials and CA bundle."""
    session = requests.Session()
    if destination.username is not None and destination.password is not None:
        session.auth = (destination.username, destination.password.get_secret_value())
    if destination.bearer_token:
        session.headers["Authorization"] = f"Bearer {destination.bearer_token.get_secret_value()}"
    if destination.ca_file is not None:
        session.verify = str(destination.ca_file)
    return session


def stow_files(destination: DicomWebDestination, paths: Sequence[Path], *, calling_ae_title: str) -> None:
    """Store ``paths`` with one STOW-RS request; raise :class:`DeliveryError` unless all were stored.

    The response's Failed SOP Sequence names refused instances; an HTTP error
    carries the server's status code.  ``calling_ae_title`` is unused (HTTP has
    no AE titles) and accepted so every sender has the same signature.
    """
    datasets = [dcmread(path) for path in paths]
    client = DICOMwebClient(url=destination.url, session=http_session(destination))
    client.set_http_retry_params(retry=False)  # retries are scheduled by the index, not here
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise DeliveryError(f"{destination.describe()} answered HTTP {status}: {exc}", status) from exc
    except requests.RequestException as exc:
        raise DeliveryError(f"{destination.describe()} could not be reached: {exc}") from exc
    failed = list(response.get("FailedSOPSequence", [])) if response is not None else []
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')} (reason 0x{int(item.get('FailureReason', 0)):04X})"
            for item in failed
        )
        raise DeliveryError(f"{destination.describe()} refused {reasons}")
    for dataset in datasets:
        log.info("stored %s via %s", dataset.SOPInstanceUID, destination.describe())
