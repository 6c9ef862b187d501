"""The listener's own command-set codec and association answers, checked against pynetdicom's."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ

from pacs_ai.receive.acceptor import AcceptorPolicy, command_pdus, negotiate
from pacs_ai.receive.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    CommandSetError,
    decode_command,
    encode_response,
)
from tests.e2e.dicom_wire import associate_request

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PRIVATE_SOP_CLASS = "1.2.3.4.5.6.7"
INSTANCE = "1.2.826.0.1.3680043.8.498.1"


def _encoded_request(primitive: C_STORE | C_ECHO) -> bytes:
    from pynetdicom.dimse_messages import C_ECHO_RQ as EchoMessage
    from pynetdicom.dimse_messages import C_STORE_RQ as StoreMessage

    message = StoreMessage() if isinstance(primitive, C_STORE) else EchoMessage()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def test_c_store_request_is_decoded() -> None:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = INSTANCE
    request.Priority = 0
    request.DataSet = BytesIO(b"x")  # only marks that a data set follows

    command = decode_command(_encoded_request(request))

    assert command.command_field == C_STORE_RQ
    assert command.message_id == 7
    assert command.has_data_set
    assert command.affected_sop_class_uid == CT_IMAGE_STORAGE
    assert command.affected_sop_instance_uid == INSTANCE


def test_store_response_reads_back_as_pynetdicom_encodes_it() -> None:
    request = C_STORE()
    request.MessageID = 65535
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = INSTANCE
    request.Priority = 0
    request.DataSet = BytesIO(b"x")
    command = decode_command(_encoded_request(request))

    encoded = encode_response(command, 0xA900, include_instance=True, error_comment="odd")
    response = decode(BytesIO(encoded), True, True)

    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 65535
    assert response.CommandDataSetType == 0x0101
    assert response.Status == 0xA900
    assert response.ErrorComment == "odd"
    assert response.AffectedSOPInstanceUID == INSTANCE
    assert response.AffectedSOPClassUID == CT_IMAGE_STORAGE
    assert response.CommandGroupLength == len(encoded) - 12


def test_echo_has_no_data_set_and_its_response_no_instance() -> None:
    request = C_ECHO()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    command = decode_command(_encoded_request(request))
    assert command.command_field == C_ECHO_RQ and not command.has_data_set

    response = decode(BytesIO(encode_response(command, 0, include_instance=False)), True, True)
    assert response.CommandField == 0x8030 and response.Status == 0
    assert "AffectedSOPInstanceUID" not in response


@pytest.mark.parametrize("encoded", [b"\x00\x00\x00\x01", b"\x08\x00\x18\x00\x04\x00\x00\x00abcd", b""])
def test_malformed_command_sets_are_refused(encoded: bytes) -> None:
    with pytest.raises(CommandSetError):
        decode_command(encoded)


def test_command_pdus_fragment_to_the_peer_limit() -> None:
    command_set = bytes(range(200))
    pdus = command_pdus(3, command_set, peer_maximum_pdu_length=100)
    # Each PDU: 6-byte header, PDV item of at most 100 bytes (4 length + context + control + data).
    fragments = []
    offset = 0
    while offset < len(pdus):
        length = int.from_bytes(pdus[offset + 2 : offset + 6], "big")
        assert pdus[offset] == 0x04 and length <= 100
        item = pdus[offset + 6 : offset + 6 + length]
        assert item[4] == 3
        fragments.append((item[5], item[6:]))
        offset += 6 + length
    assert b"".join(data for _, data in fragments) == command_set
    assert [control for control, _ in fragments] == [0x01] * (len(fragments) - 1) + [0x03]


def _association_request(called: str, contexts: list[tuple[str, list[str]]]) -> bytes:
    return associate_request(called, "SCU", contexts)


def test_storage_private_and_verification_contexts_are_accepted_as_proposed() -> None:
    request = _association_request(
        "PACS_AI",
        [
            (CT_IMAGE_STORAGE, [JPEGBaseline8Bit, ExplicitVRLittleEndian]),
            (PRIVATE_SOP_CLASS, [ImplicitVRLittleEndian]),
            ("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),
            ("1.2.840.10008.5.1.4.1.2.2.1", [ImplicitVRLittleEndian]),  # Study Root Q/R FIND: not offered
        ],
    )
    negotiation = negotiate(request, AcceptorPolicy(ae_title="PACS_AI"))

    assert negotiation.accepted and negotiation.calling_ae_title == "SCU"
    assert negotiation.peer_maximum_pdu_length == 16384
    assert negotiation.contexts == {
        1: (CT_IMAGE_STORAGE, JPEGBaseline8Bit),  # stored as received: the first proposed syntax
        3: (PRIVATE_SOP_CLASS, ImplicitVRLittleEndian),
        5: ("1.2.840.10008.1.1", ImplicitVRLittleEndian),
    }
    reply = A_ASSOCIATE_AC()
    reply.decode(negotiation.reply)
    assert reply.to_primitive().maximum_length_received == 0


@pytest.mark.parametrize(
    ("called", "policy", "diagnostic", "reason_class"),
    [
        ("OTHER", AcceptorPolicy(ae_title="PACS_AI"), 0x07, "called-ae"),
        (
            "PACS_AI",
            AcceptorPolicy(ae_title="PACS_AI", allowed_calling_ae_titles=("MODALITY",)),
            0x03,
            "calling-ae",
        ),
    ],
)
def test_wrong_ae_titles_are_rejected(
    called: str, policy: AcceptorPolicy, diagnostic: int, reason_class: str
) -> None:
    negotiation = negotiate(
        _association_request(called, [(CT_IMAGE_STORAGE, [ImplicitVRLittleEndian])]), policy
    )
    assert not negotiation.accepted
    assert negotiation.reason_class == reason_class  # the label of pacs_ai_associations_rejected_total
    reply = A_ASSOCIATE_RJ()
    reply.decode(negotiation.reply)
    assert (reply.result, reply.source, reply.reason_diagnostic) == (0x01, 0x01, diagnostic)


@pytest.mark.parametrize(
    ("limits", "reason_class"),
    [({"over_limit": True}, "association-limit"), ({"low_disk": "spool disk nearly full"}, "low-disk")],
)
def test_local_limits_are_transient_rejections_with_their_class(
    limits: dict[str, Any], reason_class: str
) -> None:
    request = _association_request("PACS_AI", [(CT_IMAGE_STORAGE, [ImplicitVRLittleEndian])])
    negotiation = negotiate(request, AcceptorPolicy(ae_title="PACS_AI"), **limits)
    assert not negotiation.accepted and negotiation.reason_class == reason_class
    reply = A_ASSOCIATE_RJ()
    reply.decode(negotiation.reply)
    assert (reply.result, reply.source, reply.reason_diagnostic) == (0x02, 0x03, 0x02)
