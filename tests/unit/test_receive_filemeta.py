"""The hand-encoded File Meta Information is byte for byte what pydicom writes for the same values."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from pynetdicom.dsutils import create_file_meta

from pacs_ai.receive.filemeta import encode_file_meta
from pacs_ai.receive.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def _pydicom_encoding(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        out,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=sop_class,  # type: ignore[arg-type]
            sop_instance_uid=sop_instance,  # type: ignore[arg-type]
            transfer_syntax=transfer_syntax,  # type: ignore[arg-type]
            implementation_uid=IMPLEMENTATION_CLASS_UID,  # type: ignore[arg-type]
            implementation_version=IMPLEMENTATION_VERSION_NAME,
        ),
    )
    return out.getvalue()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian),  # even-length UIDs
        (CTImageStorage, "1.2.3.45", JPEGBaseline8Bit),  # odd-length instance UID: padded
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.826.0.1.3680043.8.498." + "9" * 37, RLELossless),  # 64 chars
        (CTImageStorage, "1.2.3", "1.2.840.10008.1.2"),  # odd transfer syntax UID
    ],
)
def test_file_meta_matches_pydicom(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    assert encode_file_meta(sop_class, sop_instance, transfer_syntax) == _pydicom_encoding(
        sop_class, sop_instance, transfer_syntax
    )


def test_file_meta_reads_back() -> None:
    encoded = encode_file_meta(CTImageStorage, "1.2.3.45", JPEGBaseline8Bit)
    meta = dcmread(BytesIO(encoded), force=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert meta.FileMetaInformationGroupLength == len(encoded) - 132 - 12
