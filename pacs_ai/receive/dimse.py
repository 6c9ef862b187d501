"""DIMSE command sets: decoding requests and encoding the responses the listener sends.

A command set is always Implicit VR Little Endian and holds only group 0000
elements (PS3.7 6.3.1, E.1), a handful of them per message, so it is read and
written here with :mod:`struct` directly: building pydicom datasets for every
C-STORE would cost more than the rest of the receive path's Python work.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: Command Field values (PS3.7 E.1-1).
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
#: Command Data Set Type: no data set follows the command.
NO_DATA_SET = 0x0101
#: Status for a command the listener does not perform ("Unrecognized Operation", PS3.7 Annex C).
STATUS_UNRECOGNIZED_OPERATION = 0x0211

_AFFECTED_SOP_CLASS_UID = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
_COMMAND_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE_UID = 0x00001000

_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")


class CommandSetError(ValueError):
    """A command set that cannot be decoded; the association is aborted."""


@dataclass(frozen=True)
class Command:
    """The parts of a request command set the listener acts on."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str


def decode_command(encoded: bytes | bytearray | memoryview) -> Command:
    """Decode a request's command set; raises :class:`CommandSetError` if it is malformed."""
    view = memoryview(encoded)
    elements: dict[int, memoryview] = {}
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 8:
            raise CommandSetError(f"command set ends inside an element header at byte {offset}")
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += 8
        if group != 0 or length == 0xFFFFFFFF or offset + length > end:
            raise CommandSetError(f"invalid command set element ({group:04X},{element:04X}) length {length}")
        elements[element] = view[offset : offset + length]
        offset += length

    def unsigned_short(tag: int) -> int:
        value = elements.get(tag)
        if value is None or len(value) != 2:
            raise CommandSetError(f"command set lacks (0000,{tag:04X}) or it is not a US value")
        return int(_US.unpack(value)[0])

    def uid(tag: int) -> str:
        value = elements.get(tag)
        return "" if value is None else bytes(value).rstrip(b"\x00 ").decode("ascii", "replace")

    return Command(
        command_field=unsigned_short(_COMMAND_FIELD),
        message_id=unsigned_short(_MESSAGE_ID),
        has_data_set=unsigned_short(_COMMAND_DATA_SET_TYPE) != NO_DATA_SET,
        affected_sop_class_uid=uid(_AFFECTED_SOP_CLASS_UID),
        affected_sop_instance_uid=uid(_AFFECTED_SOP_INSTANCE_UID),
    )


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid_value(uid: str) -> bytes:
    # A request's UID may be anything a sender wrote (non-ASCII, 65,536 bytes): the response
    # echoes it as the 64 ASCII characters a UI value can hold, never failing to encode.
    value = uid.encode("ascii", "replace")[:64]
    return value + b"\x00" if len(value) % 2 else value


def _text_value(text: str) -> bytes:
    value = text.encode("ascii", "replace")[:64]  # Error Comment is LO: 64 characters
    return value + b" " if len(value) % 2 else value


def encode_response(
    request: Command, status: int, *, include_instance: bool, error_comment: str | None = None
) -> bytes:
    """The response command set (no data set) to ``request`` with ``status``.

    ``include_instance`` adds the Affected SOP Instance UID (C-STORE-RSP has it,
    C-ECHO-RSP has none).  An error comment tells the sender why it failed.
    """
    body = [
        _element(_AFFECTED_SOP_CLASS_UID, _uid_value(request.affected_sop_class_uid)),
        _element(_COMMAND_FIELD, _US.pack(request.command_field | RESPONSE_BIT)),
        _element(_MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(request.message_id)),
        _element(_COMMAND_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        _element(_STATUS, _US.pack(status)),
    ]
    if error_comment:
        body.append(_element(_ERROR_COMMENT, _text_value(error_comment)))
    if include_instance and request.affected_sop_instance_uid:
        body.append(_element(_AFFECTED_SOP_INSTANCE_UID, _uid_value(request.affected_sop_instance_uid)))
    encoded = b"".join(body)
    return _element(0x00000000, struct.pack("<I", len(encoded))) + encoded
