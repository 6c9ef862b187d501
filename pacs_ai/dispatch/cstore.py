"""Sending DICOM files to a peer with C-STORE (pynetdicom as SCU), optionally over TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as _pynetdicom_config

from pacs_ai.dispatch.associate import request_association
from pacs_ai.dispatch.errors import DeliveryError
from pacs_ai.peer_settings import DicomDestination, TlsOptions

log = logging.getLogger(__name__)


# Files named by path are streamed from disk as they are, never decoded: a
# 15 MB SEG goes out without being parsed and encoded again.
_pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class _FileToSend:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @classmethod
    def read(cls, path: Path) -> _FileToSend:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        return cls(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )


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

    Files go out as they are on disk, streamed by pynetdicom without decoding
    them, when the peer accepts their transfer syntax; otherwise (an old PACS
    that only takes Implicit VR, say) the data set is read and pynetdicom
    converts it between the uncompressed syntaxes.
    """
    files = [_FileToSend.read(path) for path in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds or destination.timeout_seconds
    for sop_class in sorted({f.sop_class_uid for f in files}):
        transfer_syntaxes = sorted(
            {f.transfer_syntax_uid for f in files if f.sop_class_uid == sop_class}
            | {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
        )
        ae.add_requested_context(sop_class, transfer_syntaxes)

    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (tls_context(destination.tls), destination.tls.server_hostname or destination.host)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS settings of {destination.describe()} cannot be used: {exc}") from exc
    requested = request_association(ae, destination.host, destination.port, destination.ae_title, tls_args)
    assoc = requested.association
    refusal = requested.refusal()
    if refusal is not None:
        raise DeliveryError(f"{destination.describe()} {refusal}")
    try:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        for item in files:
            as_is = (item.sop_class_uid, item.transfer_syntax_uid) in accepted
            response = assoc.send_c_store(item.path if as_is else dcmread(item.path))
            status = int(response.Status) if "Status" in response else None
            if status is None:
                raise DeliveryError(
                    f"no C-STORE response for {item.sop_instance_uid} (connection lost or timeout)"
                )
            if status != 0x0000 and (status & 0xF000) != 0xB000:
                raise DeliveryError(
                    f"{destination.ae_title} refused {item.sop_instance_uid} with status 0x{status:04X}",
                    status,
                )
            log.info(
                "sent %s (%s) to %s: status 0x%04X",
                item.sop_instance_uid,
                item.path.name,
                destination.ae_title,
                status,
            )
    finally:
        if assoc.is_established:
            assoc.release()
