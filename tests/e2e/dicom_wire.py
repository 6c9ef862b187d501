"""A DICOM requestor on a raw socket, for tests that must send what no well-behaved library would.

PDUs that are valid are built with pynetdicom's PDU classes; everything else
(command sets with hostile UIDs, lying lengths) is put together byte by byte
here, on purpose.  Every read has a timeout: an exchange never waits forever.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030


def associate_request(
    called: str,
    calling: str,
    contexts: list[tuple[str, str]] | list[tuple[str, list[str]]],
    *,
    application_context: str = APPLICATION_CONTEXT,
    maximum_length: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (abstract, transfer syntax or syntaxes) as IDs 1, 3, 5..."""
    request = A_ASSOCIATE()
    request.application_context_name = application_context
    request.calling_ae_title = calling
    request.called_ae_title = called
    proposed = []
    for index, (abstract, transfer) in enumerate(contexts):
        context = build_context(abstract, transfer)
        context.context_id = 2 * index + 1
        proposed.append(context)
    request.presentation_context_definition_list = proposed
    item = MaximumLengthNotification()
    item.maximum_length_received = maximum_length
    request.user_information = [item]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return bytes(pdu.encode())


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return raw + b"\x00" if len(raw) % 2 else raw


def command_set(
    command_field: int,
    sop_class: str | bytes,
    sop_instance: str | bytes | None = None,
    *,
    message_id: int = 1,
    has_data_set: bool = True,
) -> bytes:
    """An Implicit VR LE command set, UIDs written as given (non-ASCII, 64 KB long: whatever)."""
    body = _element(0, 0x0002, _uid(sop_class))
    body += _element(0, 0x0100, struct.pack("<H", command_field))
    body += _element(0, 0x0110, struct.pack("<H", message_id))
    if command_field == C_STORE_RQ:
        body += _element(0, 0x0700, struct.pack("<H", 0))
    body += _element(0, 0x0800, struct.pack("<H", 0x0000 if has_data_set else 0x0101))
    if sop_instance is not None:
        body += _element(0, 0x1000, _uid(sop_instance))
    return _element(0, 0x0000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, fragment: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF PDU with one PDV item."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def data_set_pdus(context_id: int, data_set: bytes, *, fragment: int = 16000) -> bytes:
    """The P-DATA-TF PDUs of a data set, in fragments of at most ``fragment`` bytes."""
    pieces = [data_set[start : start + fragment] for start in range(0, len(data_set), fragment)] or [b""]
    return b"".join(
        p_data(context_id, piece, command=False, last=index == len(pieces) - 1)
        for index, piece in enumerate(pieces)
    )


RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])


@dataclass
class Reply:
    """What came back: ``kind`` is ac, rj, abort, status, release, closed or timeout."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.detail}" if self.detail else self.kind


class Wire:
    """One connection to the listener (plain or TLS) with bounded reads."""

    def __init__(
        self,
        port: int,
        *,
        timeout: float = 10.0,
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        raw = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.socket: socket.socket = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        self.socket.settimeout(timeout)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()

    def send(self, data: bytes) -> bool:
        """Send ``data``; False if the listener already closed the connection."""
        try:
            self.socket.sendall(data)
            return True
        except OSError:
            return False

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.socket.recv(min(size - len(data), 65536))
            if not chunk:
                return None
            data += chunk
        return data

    def reply(self) -> Reply:
        """The next PDU, classified (a P-DATA-TF is read as a response command set's Status)."""
        try:
            header = self._exactly(6)
            if header is None:
                return Reply("closed")
            pdu_type, _, length = struct.unpack(">BBI", header)
            if length > 1024 * 1024:  # not a PDU the listener would send (TLS bytes, say)
                return Reply("closed" if pdu_type > 0x07 else "pdu", f"0x{pdu_type:02X} of {length} bytes")
            body = self._exactly(length)
        except TimeoutError:
            return Reply("timeout")
        except (ssl.SSLError, ConnectionError, OSError):
            return Reply("closed")
        if body is None:
            return Reply("closed")
        if pdu_type == 0x02:
            return Reply("ac")
        if pdu_type == 0x03:
            return Reply("rj", f"{body[1]}-{body[2]}-{body[3]}")
        if pdu_type == 0x07:
            return Reply("abort")
        if pdu_type == 0x06:
            return Reply("release")
        if pdu_type == 0x04:
            return Reply("status", f"0x{_status(body[6:]):04X}")
        return Reply("pdu", f"0x{pdu_type:02X}")


def _status(command: bytes) -> int:
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if (group, element) == (0, 0x0900):
            return int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return -1


def store_exchange(
    port: int,
    called: str,
    calling: str,
    abstract: str,
    command: bytes,
    data_set: bytes | None,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    data_context: int | None = None,
    timeout: float = 15.0,
) -> Reply:
    """Associate, send one message (its data set on ``data_context`` if given), read the answer, release."""
    with Wire(port, timeout=timeout) as wire:
        wire.send(
            associate_request(
                called, calling, [(abstract, transfer_syntax), (VERIFICATION, ExplicitVRLittleEndian)]
            )
        )
        accepted = wire.reply()
        if accepted.kind != "ac":
            return accepted
        wire.send(p_data(1, command, command=True))
        if data_set is not None:
            wire.send(data_set_pdus(data_context or 1, data_set))
        answer = wire.reply()
        if answer.kind == "status":
            wire.send(RELEASE_RQ)
            wire.reply()
        return answer
