"""Sending DICOM files to a peer with C-STORE (pynetdicom as SCU), optionally over TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from pacs_ai.dispatch.destinations import DicomDestination, TlsOptions
from pacs_ai.dispatch.errors import DeliveryError

log = logging.getLogger(__name__)


def tls_context(options: TlsOptions) -> ssl.SSLContext:
    """A client TLS context that verifies the peer (and presents our certificate when configured)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.ca_file)
    if options.cert_file is not None and options.key_file is not None:
        context.load_cert_chain(options.cert_file, options.key_file)
    return context


def send_files(
    destination: DicomDestination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout_seconds: float | None = None,
) -> None:
    """Send ``paths`` over one association; raise :class:`DeliveryError` unless all succeed.

    Warning statuses (0xB000, 0xB007, 0xB006) count as stored: the peer kept
    the instance, possibly coercing attributes.
    """
    datasets = [(path, dcmread(path)) for path in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds or destination.timeout_seconds
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        transfer_syntaxes = sorted(
            {str(ds.file_meta.TransferSyntaxUID) for _, ds in datasets if ds.SOPClassUID == sop_class}
            | {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
        )
        ae.add_requested_context(sop_class, transfer_syntaxes)

    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (tls_context(destination.tls), destination.tls.server_hostname or destination.host)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS settings of {destination.describe()} cannot be used: {exc}") from exc
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(
            f"association with {destination.describe()} was rejected, aborted or never connected"
        )
    try:
        for path, ds in datasets:
            response = assoc.send_c_store(ds)
            status = int(response.Status) if "Status" in response else None
            if status is None:
                raise DeliveryError(
                    f"no C-STORE response for {ds.SOPInstanceUID} (connection lost or timeout)"
                )
            if status != 0x0000 and (status & 0xF000) != 0xB000:
                raise DeliveryError(
                    f"{destination.ae_title} refused {ds.SOPInstanceUID} with status 0x{status:04X}", status
                )
            log.info(
                "sent %s (%s) to %s: status 0x%04X",
                ds.SOPInstanceUID,
                path.name,
                destination.ae_title,
                status,
            )
    finally:
        if assoc.is_established:
            assoc.release()
