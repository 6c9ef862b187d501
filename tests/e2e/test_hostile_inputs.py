"""A hostile-input corpus against a running ``pacs-ai serve``: every input gets its expected answer.

More than 100 inputs (malformed and hostile data sets, PDU-level faults,
floods, slow senders, TLS misuse), each with the outcome it must get.  The
run prints: inputs tried, listener crashes, worker crashes, hangs and
acknowledged-then-lost; every count but the first must be 0.  All traffic is
on the loopback and every exchange is bounded in time (socket timeouts) and
count.  A second test holds 140 slow connections while a known peer's C-ECHO
and C-STORE still succeed.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.synthetic.phantom import PhantomTruth
from tests.e2e.dicom_wire import (
    C_ECHO_RQ,
    C_STORE_RQ,
    RELEASE_RQ,
    VERIFICATION,
    Wire,
    associate_request,
    command_set,
    data_set_pdus,
    p_data,
    store_exchange,
)
from tests.peers import dcmtk, free_port, storescu
from tests.service import PacsAiService
from tests.tls_certificates import Pair, certificate_authority, issue

pytestmark = pytest.mark.e2e

CALLED = "PACS_AI"
GOOD = "GOOD"
CT = "1.2.840.10008.5.1.4.1.1.2"
UID_ROOT = "1.2.826.0.1.3680043.8.498."
#: Limits of the service under attack (small, so that each case is quick).
NEGOTIATION_SECONDS = 2.0
IDLE_SECONDS = 4.0
MAXIMUM_INSTANCE_MB = 2
FAILURE = {"status:0xA900", "status:0xC000"}


def _encode(dataset: Dataset) -> bytes:
    """A data set as Explicit VR Little Endian bytes (no file meta)."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, dataset)
    return out.getvalue()


@dataclass
class Case:
    name: str
    family: str
    run: Callable[[], str]
    expected: set[str]
    #: SOP Instance UID the case may have had acknowledged (checked for loss at the end).
    sop_instance: str | None = None


@dataclass
class Attack:
    """The service under attack and what the corpus learnt."""

    service: PacsAiService
    tls_port: int
    client: Pair
    stranger: Pair
    ca: Pair
    slice_path: Path
    phantom_paths: list[Path]
    bomb_series: str = ""
    acknowledged: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.service.port

    def base(self, **changes: Any) -> Dataset:
        """A fresh, valid CT slice with new UIDs (changes applied: None deletes the attribute)."""
        dataset = pydicom.dcmread(self.slice_path)
        dataset.SOPInstanceUID = generate_uid(prefix=UID_ROOT)
        for keyword, value in changes.items():
            if value is None:
                delattr(dataset, keyword)
            else:
                setattr(dataset, keyword, value)
        return dataset

    def store(self, dataset: Dataset | bytes, sop_instance: str, **options: Any) -> str:
        data = dataset if isinstance(dataset, bytes) else _encode(dataset)
        command = command_set(
            C_STORE_RQ, options.pop("command_class", CT), options.pop("command_instance", sop_instance)
        )
        return str(
            store_exchange(self.port, CALLED, GOOD, options.pop("abstract", CT), command, data, **options)
        )

    def tls_context(self, pair: Pair | None, **options: Any) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca.certificate))
        for key, value in options.items():
            setattr(context, key, value)
        if pair is not None:
            context.load_cert_chain(pair.certificate, pair.key)
        return context


def _after_association(attack: Attack, payload: bytes, *, timeout: float = 10.0) -> str:
    """Associate as the known peer, send ``payload``, and say what came back."""
    with Wire(attack.port, timeout=timeout) as wire:
        wire.send(associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)]))
        accepted = wire.reply()
        if accepted.kind != "ac":
            return f"not accepted: {accepted}"
        wire.send(payload)
        return str(wire.reply())


def _raw(
    attack: Attack, payload: bytes, *, port: int | None = None, timeout: float = 10.0, **wire: Any
) -> str:
    with Wire(port or attack.port, timeout=timeout, **wire) as connection:
        connection.send(payload)
        return str(connection.reply())


def _nested(depth: int) -> bytes:
    """Sequences nested ``depth`` deep (undefined lengths), as Explicit VR LE bytes, built by hand.

    Tag (0004,1220) sorts before every attribute of an image, so the bytes go in front of one.
    """
    sequence = struct.pack("<HH2s2xI", 0x0004, 0x1220, b"SQ", 0xFFFFFFFF)
    item, item_end = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = b""
    for _ in range(depth):
        nested = sequence + item + nested + item_end + sequence_end
    return nested


def data_set_cases(attack: Attack) -> list[Case]:
    cases: list[Case] = []

    def add(
        name: str, dataset: Dataset | bytes, expected: set[str], sop_instance: str, **options: Any
    ) -> None:
        cases.append(
            Case(
                name,
                "data set",
                lambda: attack.store(dataset, sop_instance, **options),
                expected,
                sop_instance,
            )
        )

    for number in range(3):
        valid = attack.base(InstanceNumber=100 + number)
        add(f"valid instance {number}", valid, {"status:0x0000"}, valid.SOPInstanceUID)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        uid = generate_uid(prefix=UID_ROOT)
        dataset = attack.base(SOPInstanceUID=uid)
        delattr(dataset, keyword)
        add(f"missing {keyword}", dataset, {"status:0xA900"}, uid)
    for bad in ("1.2.3." + "4" * 70, "1.2.abc", ".1.2", "1..2", "1.2.3\r\n2026-01-01 CRITICAL forged"):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            dataset = attack.base(**{keyword: bad})
            add(f"{keyword} {bad[:12]!r}", dataset, {"status:0xC000"}, dataset.SOPInstanceUID)
    other = attack.base()
    add(
        "data set SOP Instance UID differs from the command's",
        other,
        {"status:0xA900"},
        generate_uid(prefix=UID_ROOT),
    )
    mr = attack.base(SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    add("data set SOP Class differs from the command's", mr, {"status:0xA900"}, mr.SOPInstanceUID)
    wrong_context = attack.base()
    add(
        "command SOP Class is not its context's abstract syntax",
        wrong_context,
        {"status:0xA900"},
        wrong_context.SOPInstanceUID,
        abstract="1.2.840.10008.5.1.4.1.1.4",
        command_class=CT,
    )
    on_other_context = attack.base()
    add(
        "data set on another presentation context than its command",
        on_other_context,
        {"status:0xA900"},
        on_other_context.SOPInstanceUID,
        data_context=3,
    )
    for label, uid_bytes in (
        ("non-ASCII", "1.2.3.\u00e9\u00e8".encode()),
        ("65,536 bytes", b"1." + b"2" * 65_534),
        ("200 bytes", b"1." + b"3" * 198),
        ("empty", b""),
        ("CR/LF", b"1.2.3\r\nCRITICAL forged line"),
    ):
        dataset = attack.base()
        add(
            f"command SOP Instance UID {label}",
            dataset,
            {"status:0xC000"},
            dataset.SOPInstanceUID,
            command_instance=uid_bytes,
        )
    full = _encode(attack.base())
    for cut in (8, 64, 200, 500):
        dataset = attack.base()
        add(f"data set cut at byte {cut}", _encode(dataset)[:cut], FAILURE, dataset.SOPInstanceUID)
    for cut in (len(full) - 2000, len(full) - 1):
        dataset = attack.base()
        # Cut inside Pixel Data: the header is whole, so the listener stores it as received; the
        # worker refuses pixel data shorter than declared (tests/unit/test_volume_limits.py).
        add(
            f"data set cut inside Pixel Data ({cut})",
            _encode(dataset)[:cut],
            {"status:0x0000"},
            dataset.SOPInstanceUID,
        )
    for seed in range(15):
        generator = random.Random(seed)
        garbage = bytes(generator.randrange(256) for _ in range(generator.randrange(16, 4000)))
        add(f"random bytes (seed {seed})", garbage, FAILURE, generate_uid(prefix=UID_ROOT))
    for depth in (300, 3000):
        dataset = attack.base()
        # Not read by the listener (only the header attributes are): stored as received, or refused.
        add(
            f"sequences nested {depth} deep",
            _nested(depth) + _encode(dataset),
            {"status:0x0000", *FAILURE},
            dataset.SOPInstanceUID,
        )
    for label, payload in (
        ("random bytes", bytes(random.Random(7).randrange(256) for _ in range(3000))),
        ("truncated stream", b"\x78\x9c" + b"\x00" * 10),
        ("empty", b""),
    ):
        dataset = attack.base()
        add(
            f"corrupt deflate ({label})",
            payload,
            FAILURE,
            dataset.SOPInstanceUID,
            transfer_syntax=DeflatedExplicitVRLittleEndian,
        )
    for label, element in (
        ("UI length past the end", struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", 0xFFF0) + b"1.2"),
        ("OB length 0xFFFFFFF0", struct.pack("<HH2s2xI", 0x0009, 0x0010, b"OB", 0xFFFFFFF0) + b"\x00" * 16),
    ):
        dataset = attack.base()
        add(f"element {label}", element, FAILURE, dataset.SOPInstanceUID)
    big = attack.base()
    big.add_new(0x00091010, "OB", b"\x00" * (MAXIMUM_INSTANCE_MB * 1024 * 1024 + 4096))
    add("instance over maximum_instance_mb", big, {"status:0xA700"}, big.SOPInstanceUID)

    def command_only(name: str, abstract: str, command: bytes, expected: str) -> None:
        def run() -> str:
            return str(store_exchange(attack.port, CALLED, GOOD, abstract, command, None))

        cases.append(Case(name, "data set", run, {expected}))

    command_only(
        "C-STORE-RQ without a data set",
        CT,
        command_set(C_STORE_RQ, CT, "1.2.3", has_data_set=False),
        "status:0xC000",
    )
    command_only(
        "C-FIND-RQ (not offered)", CT, command_set(0x0020, CT, None, has_data_set=False), "status:0x0211"
    )
    command_only(
        "C-ECHO-RQ",
        VERIFICATION,
        command_set(C_ECHO_RQ, VERIFICATION, None, has_data_set=False),
        "status:0x0000",
    )
    twice = attack.base()
    add("duplicate, first copy", twice, {"status:0x0000"}, twice.SOPInstanceUID)
    add("duplicate, second copy (kept first)", twice, {"status:0x0000"}, twice.SOPInstanceUID)
    elsewhere = attack.base(
        SOPInstanceUID=twice.SOPInstanceUID, StudyInstanceUID=generate_uid(prefix=UID_ROOT)
    )
    add("SOP Instance UID held in another study", elsewhere, {"status:0xC000"}, None)  # type: ignore[arg-type]
    series = generate_uid(prefix=UID_ROOT)
    for number, path in enumerate(attack.phantom_paths[:20]):
        bomb = pydicom.dcmread(path)
        bomb.SOPInstanceUID, bomb.SeriesInstanceUID = generate_uid(prefix=UID_ROOT), series
        bomb.compress(RLELossless)
        bomb.Rows = bomb.Columns = 4096  # small files declaring 4096x4096: the worker must not allocate
        add(
            f"RLE slice declaring 4096x4096 ({number})",
            bomb,
            {"status:0x0000"},
            bomb.SOPInstanceUID,
            transfer_syntax=RLELossless,
        )
    attack.bomb_series = series
    return cases


def pdu_cases(attack: Attack) -> list[Case]:
    cases: list[Case] = []

    def add(name: str, run: Callable[[], str], expected: set[str]) -> None:
        cases.append(Case(name, "PDU", run, expected))

    add(
        "A-RELEASE-RQ of length 0xFFFFFFFF",
        lambda: _after_association(attack, b"\x05\x00\xff\xff\xff\xff"),
        {"abort"},
    )
    add(
        "A-ABORT of length 0xFFFFFFFF",
        lambda: _after_association(attack, b"\x07\x00\xff\xff\xff\xff"),
        {"abort", "closed"},
    )
    for pdu_type in (0x00, 0x08, 0x0A, 0x7F, 0xFF):
        add(
            f"unknown PDU type 0x{pdu_type:02X}",
            lambda pdu_type=pdu_type: _after_association(
                attack, bytes([pdu_type, 0, 0, 0, 0, 4, 0, 0, 0, 0])
            ),
            {"abort"},
        )
    add(
        "P-DATA-TF before A-ASSOCIATE-RQ",
        lambda: _raw(attack, p_data(1, b"\x00" * 10, command=True)),
        {"abort"},
    )
    add("A-RELEASE-RQ before A-ASSOCIATE-RQ", lambda: _raw(attack, RELEASE_RQ), {"abort"})
    for size in (300 * 1024, 1024 * 1024):
        add(
            f"A-ASSOCIATE-RQ of {size} bytes",
            lambda size=size: _raw(attack, struct.pack(">BBI", 1, 0, size) + b"\x00" * size),
            {"abort", "closed"},
        )
    for seed in range(10):
        generator = random.Random(100 + seed)
        body = bytes(generator.randrange(256) for _ in range(generator.randrange(68, 2000)))
        add(
            f"malformed A-ASSOCIATE-RQ (seed {seed})",
            lambda body=body: _raw(attack, struct.pack(">BBI", 1, 0, len(body)) + body),
            {"abort", "rj:1-1-1", "rj:1-1-2", "rj:1-1-3", "rj:1-1-7", "rj:2-2-2"},
        )
    version_2 = bytearray(associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)]))
    version_2[7] = 2
    add("protocol version 2", lambda: _raw(attack, bytes(version_2)), {"rj:2-2-2"})
    add(
        "called AE title not ours",
        lambda: _raw(attack, associate_request("SOMEONE", GOOD, [(CT, ExplicitVRLittleEndian)])),
        {"rj:1-1-7"},
    )
    add(
        "calling AE title unknown",
        lambda: _raw(attack, associate_request(CALLED, "STRANGER", [(CT, ExplicitVRLittleEndian)])),
        {"rj:1-1-3"},
    )
    add(
        "calling AE title with CR/LF",
        lambda: _raw(
            attack,
            associate_request(CALLED, "EVILXXCRITICAL", [(CT, ExplicitVRLittleEndian)]).replace(
                b"EVILXX", b"EVIL\r\n"
            ),
        ),
        {"rj:1-1-3", "abort"},
    )
    add(
        "known AE title from an address it is not allowed",
        lambda: _raw(
            attack, associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)]), source="127.0.0.2"
        ),
        {"rj:1-1-1"},
    )
    add(
        "application context not DICOM's",
        lambda: _raw(
            attack,
            associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)], application_context="1.2.3"),
        ),
        {"rj:1-1-2"},
    )
    item = struct.pack(">IBB", 1, 1, 3)
    add(
        "PDV item length below 2",
        lambda: _after_association(attack, struct.pack(">BBI", 4, 0, len(item)) + item),
        {"abort"},
    )
    add(
        "PDV item longer than its PDU",
        lambda: _after_association(
            attack, struct.pack(">BBI", 4, 0, 10) + struct.pack(">IBB", 500, 1, 3) + b"\x00" * 4
        ),
        {"abort"},
    )
    add(
        "PDV on a context not accepted",
        lambda: _after_association(attack, p_data(9, b"\x00" * 8, command=True)),
        {"abort"},
    )
    add(
        "P-DATA-TF longer than the maximum PDU",
        lambda: _after_association(attack, struct.pack(">BBI", 4, 0, 5 * 1024 * 1024) + b"\x00" * 1024),
        {"abort"},
    )
    add(
        "command set longer than 128 KB",
        lambda: _after_association(attack, p_data(1, b"\x00" * (130 * 1024), command=True, last=False)),
        {"abort"},
    )
    add(
        "A-RELEASE-RQ in the middle of a message",
        lambda: _after_association(
            attack, p_data(1, command_set(C_STORE_RQ, CT, "1.2.3"), command=True) + RELEASE_RQ
        ),
        {"abort"},
    )
    add(
        "data set fragment without a command",
        lambda: _after_association(attack, p_data(1, b"\x00" * 8, command=False)),
        {"abort"},
    )
    add(
        "command set that cannot be decoded",
        lambda: _after_association(attack, p_data(1, b"\x00\x00\x00\x01\xff\xff\xff\xff", command=True)),
        {"abort"},
    )
    add("connection closed at once", lambda: _connect_and_close(attack), {"closed"})
    add(
        "half a PDU header, then nothing",
        lambda: _raw(attack, b"\x01\x00\x00", timeout=NEGOTIATION_SECONDS + 3),
        {"abort", "closed"},
    )
    return cases


def _connect_and_close(attack: Attack) -> str:
    socket.create_connection(("127.0.0.1", attack.port), timeout=5).close()
    return "closed"  # what matters is the C-ECHO answered after it (as after every input)


def _flood_connections(attack: Attack) -> str:
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", attack.port), timeout=5):
            pass
    return _echo(attack)


def _flood_rejections(attack: Attack) -> str:
    before = _log_lines(attack)
    for _ in range(100):
        _raw(attack, associate_request(CALLED, "STRANGER", [(CT, ExplicitVRLittleEndian)]))
    added = _log_lines(attack) - before
    # Each rejection is logged, but repeated lines are held back (logging_setup.SafeLines).
    return "bounded log" if added <= 60 else f"{added} log lines"


def _megabyte_request(attack: Attack) -> str:
    before = _log_lines(attack)
    contexts = [(f"1.2.826.0.1.3680043.8.498.{index}", ExplicitVRLittleEndian) for index in range(127)]
    request = bytearray(associate_request(CALLED, GOOD, contexts))
    padding = b"\x00" * (1024 * 1024 - len(request))
    reply = _raw(
        attack, struct.pack(">BBI", 1, 0, len(request) - 6 + len(padding)) + bytes(request[6:]) + padding
    )
    added = _log_lines(attack) - before
    return f"{reply}" if added <= 10 else f"{reply} with {added} log lines"


def _log_lines(attack: Attack) -> int:
    time.sleep(0.3)  # the listener's lines reach the file
    return len(attack.service.log_path.read_text(errors="replace").splitlines())


def _echo(attack: Attack, tls: ssl.SSLContext | None = None, port: int | None = None) -> str:
    ae = AE(ae_title=GOOD)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    association = ae.associate(
        "127.0.0.1", port or attack.port, ae_title=CALLED, tls_args=(tls, "127.0.0.1") if tls else None
    )
    if not association.is_established:
        return "not established"
    status = association.send_c_echo()
    association.release()
    return f"status:0x{int(status.Status):04X}" if status else "no status"


def _drip(attack: Attack, payload: bytes, *, port: int | None = None, interval: float = 0.3) -> str:
    """Send ``payload`` a byte at a time; say how long the listener let it go on."""
    started = time.monotonic()
    with Wire(port or attack.port, timeout=NEGOTIATION_SECONDS + 5) as wire:
        for byte in payload:
            if not wire.send(bytes([byte])) or select.select([wire.socket], [], [], interval)[0]:
                break  # the listener answered (A-ABORT) or closed the connection
            if time.monotonic() - started > NEGOTIATION_SECONDS + 5:
                return "never cut off"
        reply = wire.reply()
    elapsed = time.monotonic() - started
    within = NEGOTIATION_SECONDS * 0.8 <= elapsed <= NEGOTIATION_SECONDS + 3
    return f"cut off at the deadline ({reply.kind})" if within else f"cut off after {elapsed:.1f} s"


def _silent(attack: Attack, port: int | None = None) -> str:
    started = time.monotonic()
    with Wire(port or attack.port, timeout=NEGOTIATION_SECONDS + 5) as wire:
        reply = wire.reply()
    elapsed = time.monotonic() - started
    return f"cut off at the deadline ({reply.kind})" if elapsed <= NEGOTIATION_SECONDS + 3 else str(reply)


def _slow_data_set(attack: Attack) -> tuple[str, str]:
    dataset = attack.base()
    pdus = p_data(1, command_set(C_STORE_RQ, CT, dataset.SOPInstanceUID), command=True)
    pdus += data_set_pdus(1, _encode(dataset))
    with Wire(attack.port, timeout=IDLE_SECONDS + 5) as wire:
        wire.send(associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)]))
        if wire.reply().kind != "ac":
            return "not accepted", dataset.SOPInstanceUID
        step = -(-len(pdus) // 5)
        for start in range(0, len(pdus), step):  # 5 pieces, each well inside the idle timeout
            wire.send(pdus[start : start + step])
            time.sleep(IDLE_SECONDS / 4)
        answer = str(wire.reply())
        wire.send(RELEASE_RQ)
        wire.reply()
    return answer, dataset.SOPInstanceUID


def flood_and_slow_cases(attack: Attack) -> list[Case]:
    slow_uid: list[str] = []

    def slow() -> str:
        answer, uid = _slow_data_set(attack)
        slow_uid.append(uid)
        attack.acknowledged.append(uid) if answer == "status:0x0000" else None
        return answer

    request = associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)])
    return [
        Case(
            "300 connections opened and closed",
            "flood",
            lambda: _flood_connections(attack),
            {"status:0x0000"},
        ),
        Case("100 rejected associations", "flood", lambda: _flood_rejections(attack), {"bounded log"}),
        Case("1 MB A-ASSOCIATE-RQ", "flood", lambda: _megabyte_request(attack), {"abort", "closed"}),
        Case(
            "A-ASSOCIATE-RQ dripped a byte every 0.3 s",
            "slow",
            lambda: _drip(attack, request),
            {"cut off at the deadline (abort)", "cut off at the deadline (closed)"},
        ),
        Case(
            "connected and silent",
            "slow",
            lambda: _silent(attack),
            {"cut off at the deadline (abort)", "cut off at the deadline (closed)"},
        ),
        Case("data set sent slowly within the idle timeout", "slow", slow, {"status:0x0000"}),
        Case(
            "TLS handshake dripped",
            "slow",
            lambda: _drip(
                attack, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, port=attack.tls_port
            ),
            {"cut off at the deadline (closed)", "cut off at the deadline (abort)"},
        ),
    ]


def _tls_store(attack: Attack, context: ssl.SSLContext, calling: str = GOOD) -> str:
    dataset = attack.base()
    try:
        with Wire(attack.tls_port, timeout=10, tls=context) as wire:
            wire.send(associate_request(CALLED, calling, [(CT, ExplicitVRLittleEndian)]))
            accepted = wire.reply()
            if accepted.kind != "ac":
                return str(accepted)
            wire.send(p_data(1, command_set(C_STORE_RQ, CT, dataset.SOPInstanceUID), command=True))
            wire.send(data_set_pdus(1, _encode(dataset)))
            answer = wire.reply()
            if str(answer) == "status:0x0000":
                attack.acknowledged.append(dataset.SOPInstanceUID)
            wire.send(RELEASE_RQ)
            wire.reply()
            return str(answer)
    except (ssl.SSLError, ConnectionError):
        return "closed"


def tls_cases(attack: Attack) -> list[Case]:
    request = associate_request(CALLED, GOOD, [(CT, ExplicitVRLittleEndian)])
    old_tls = attack.tls_context(attack.client, maximum_version=ssl.TLSVersion.TLSv1_1)
    old_tls.set_ciphers("ALL:@SECLEVEL=0")
    return [
        Case(
            "plain DICOM to the TLS port",
            "TLS",
            lambda: _raw(attack, request, port=attack.tls_port),
            {"closed"},
        ),
        Case("TLS client to the plain port", "TLS", lambda: _tls_plain_port(attack), {"closed"}),
        Case(
            "DCMTK storescu +tls (mutual TLS)",
            "TLS",
            lambda: _dcmtk_over_tls(attack, "storescu"),
            {"success"},
        ),
        Case(
            "DCMTK echoscu +tls (mutual TLS)", "TLS", lambda: _dcmtk_over_tls(attack, "echoscu"), {"success"}
        ),
        Case(
            "DCMTK storescu +tla (no client certificate)",
            "TLS",
            lambda: _dcmtk_over_tls(attack, "storescu", client_certificate=False),
            {"failed"},
        ),
        Case(
            "TLS without a client certificate",
            "TLS",
            lambda: _tls_store(attack, attack.tls_context(None)),
            {"closed"},
        ),
        Case(
            "client certificate of another CA",
            "TLS",
            lambda: _tls_store(attack, attack.tls_context(attack.stranger)),
            {"closed"},
        ),
        Case("TLS 1.1 client", "TLS", lambda: _tls_store(attack, old_tls), {"closed"}),
        Case(
            "garbage on the TLS port",
            "TLS",
            lambda: _raw(attack, b"\x00" * 600, port=attack.tls_port),
            {"closed"},
        ),
        Case(
            "known peer over mutual TLS",
            "TLS",
            lambda: _tls_store(attack, attack.tls_context(attack.client)),
            {"status:0x0000"},
        ),
        Case(
            "TLS peer whose certificate subject is not its entry's",
            "TLS",
            lambda: _tls_store(attack, attack.tls_context(attack.client), calling="TLSPEER"),
            {"rj:1-1-1"},
        ),
        Case(
            "C-ECHO over mutual TLS (pynetdicom)",
            "TLS",
            lambda: _echo(attack, attack.tls_context(attack.client), attack.tls_port),
            {"status:0x0000"},
        ),
    ]


def _dcmtk_over_tls(attack: Attack, tool: str, *, client_certificate: bool = True) -> str:
    """DCMTK storescu or echoscu to the TLS port, with a client certificate (``+tls``) or none (``+tla``)."""
    tls = ["+tls", str(attack.client.key), str(attack.client.certificate)] if client_certificate else ["+tla"]
    tls += ["+cf", str(attack.ca.certificate)]
    if tool == "storescu":
        result = storescu(
            "127.0.0.1",
            attack.tls_port,
            CALLED,
            [attack.slice_path],
            calling_aet=GOOD,
            extra_args=tls,
            timeout=60,
        )
        if result.returncode == 0:
            attack.acknowledged.append(
                str(pydicom.dcmread(attack.slice_path, stop_before_pixels=True).SOPInstanceUID)
            )
        return "success" if result.returncode == 0 else "failed"
    command = [
        dcmtk("echoscu"),
        "-to",
        "10",
        "-aet",
        GOOD,
        "-aec",
        CALLED,
        *tls,
        "127.0.0.1",
        str(attack.tls_port),
    ]
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    return "success" if result.returncode == 0 else "failed"


def _tls_plain_port(attack: Attack) -> str:
    try:
        with Wire(attack.port, timeout=10, tls=attack.tls_context(attack.client)):
            return "handshake completed"
    except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
        return "closed"


def _processes(service: PacsAiService) -> tuple[list[int], list[int]]:
    state = service.run_state() or {}
    return list(state.get("listener_pids", [])), [worker["pid"] for worker in state.get("workers", [])]


@pytest.fixture
def attack(tmp_path: Path, chest_phantom: PhantomTruth, service_factory: Any) -> Attack:
    ca = certificate_authority(tmp_path / "ca")
    server = issue(ca, tmp_path / "ca", "pacs-ai", server=True)
    client = issue(ca, tmp_path / "ca", "modality-1", server=False)
    other_ca = certificate_authority(tmp_path / "other-ca", "other-ca")
    stranger = issue(other_ca, tmp_path / "other-ca", "stranger", server=False)
    tls_port = free_port()
    service = service_factory(
        extra_env={
            "PACS_AI_WORKER_PROCESSES": "1",
            "PACS_AI_REPORT_DRAFTS_ENABLED": "false",
            "PACS_AI_WORKLIST_ENABLED": "false",
            "PACS_AI_KNOWN_PEERS": json.dumps(
                [
                    {"ae_title": GOOD, "networks": ["127.0.0.1/32"]},
                    {"ae_title": "ECHOSCU", "networks": ["127.0.0.1/32"]},  # the readiness probe
                    {"ae_title": "TLSPEER", "certificate_subject": "CN=another-modality"},
                ]
            ),
            "PACS_AI_LISTENER_TLS": json.dumps(
                {
                    "certificate_file": str(server.certificate),
                    "private_key_file": str(server.key),
                    "ca_file": str(ca.certificate),
                    "port": tls_port,
                }
            ),
            "PACS_AI_MAXIMUM_INSTANCE_MB": str(MAXIMUM_INSTANCE_MB),
            "PACS_AI_ASSOCIATION_NEGOTIATION_TIMEOUT_SECONDS": str(NEGOTIATION_SECONDS),
            "PACS_AI_ASSOCIATION_IDLE_TIMEOUT_SECONDS": str(IDLE_SECONDS),
        }
    )
    return Attack(
        service,
        tls_port,
        client,
        stranger,
        ca,
        chest_phantom.paths[len(chest_phantom.paths) // 2],
        chest_phantom.paths,
    )


def test_hostile_input_corpus(attack: Attack) -> None:
    service = attack.service
    listeners_before, workers_before = _processes(service)
    cases = data_set_cases(attack) + pdu_cases(attack) + flood_and_slow_cases(attack) + tls_cases(attack)
    assert len(cases) >= 100
    started = time.monotonic()
    for case in cases:
        case_started = time.monotonic()
        try:
            outcome = case.run()
        except TimeoutError:
            outcome = "hang"
        if outcome == "timeout" or outcome == "hang":
            attack.hangs.append(case.name)
        if time.monotonic() - case_started > 20:
            attack.hangs.append(f"{case.name} (took {time.monotonic() - case_started:.0f} s)")
        if outcome not in case.expected:
            attack.mismatches.append(
                f"{case.family}: {case.name}: got {outcome}, expected {sorted(case.expected)}"
            )
        if outcome == "status:0x0000" and case.sop_instance:
            attack.acknowledged.append(case.sop_instance)
        print(f"{time.monotonic() - started:6.1f} s {case.family}: {case.name}: {outcome}", flush=True)
        if _echo(attack) != "status:0x0000":  # the listener answers between any two inputs
            attack.hangs.append(f"no C-ECHO answer after {case.name}")

    bomb_job = _wait_for_failed_job(service, attack.bomb_series)
    listeners_after, workers_after = _processes(service)
    logs = service.logs() + service.log_path.read_text(errors="replace")
    listener_crashes = len(set(listeners_before) - set(listeners_after)) + len(
        re.findall(r"association from \S+ failed", logs)
    )
    listener_crashes += sum(1 for pid in listeners_after if not _alive(pid))
    worker_crashes = len(set(workers_before) - set(workers_after)) + len(
        re.findall(r"WorkerLostError|exited with signal", logs)
    )
    indexed = {row[0]: row[1] for row in service.query("SELECT sop_instance_uid, path FROM instances")}
    lost = [uid for uid in set(attack.acknowledged) if uid not in indexed]
    print(
        f"\nhostile-input corpus: {len(cases)} inputs tried in {time.monotonic() - started:.0f} s; "
        f"listener crashes {listener_crashes}, worker crashes {worker_crashes}, hangs {len(attack.hangs)}, "
        f"acknowledged-then-lost {len(lost)}"
    )
    assert not attack.mismatches, "\n".join(attack.mismatches)
    assert (listener_crashes, worker_crashes, attack.hangs, lost) == (0, 0, [], [])
    assert not re.search(r"^[^\n]*CRITICAL forged", logs, re.MULTILINE) or "\\r\\n" in logs
    assert not any(line.startswith("2026-01-01 CRITICAL") for line in logs.splitlines()), "a forged log line"
    assert list((service.data_dir / "spool" / "tmp").glob("*")) == [], "temporary files left behind"
    refusals = service.query(
        "SELECT count(*) FROM audit_events WHERE action IN ('association.refused', 'instance.rejected')"
    )
    assert refusals[0][0] >= 50
    # The worker refused the 4096x4096 declarations instead of allocating them.
    assert bomb_job is not None and "not believed" in bomb_job, bomb_job


def _wait_for_failed_job(service: PacsAiService, series: str, seconds: float = 60.0) -> str | None:
    """The error of the job of ``series`` once it failed (the worker refused it), or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = service.query(
            "SELECT jobs.state, jobs.error FROM jobs JOIN series ON series.id = jobs.series_fk "
            "WHERE series.series_instance_uid = :uid",
            uid=series,
        )
        if rows and str(rows[0][0]).upper() == "FAILED":
            return str(rows[0][1])
        time.sleep(0.5)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_a_known_peer_is_served_while_140_slow_connections_are_held(
    chest_phantom: PhantomTruth, service_factory: Any
) -> None:
    service = service_factory(
        extra_env={
            "PACS_AI_WORKER_PROCESSES": "0",
            "PACS_AI_WORKLIST_ENABLED": "false",
            "PACS_AI_KNOWN_PEERS": json.dumps([{"ae_title": name} for name in (GOOD, "ECHOSCU")]),
            "PACS_AI_ASSOCIATION_NEGOTIATION_TIMEOUT_SECONDS": "30",
            "PACS_AI_MAXIMUM_ASSOCIATIONS": "1",  # the known peer's association takes the only slot
        }
    )
    slow: list[socket.socket] = []
    try:
        for _ in range(140):  # each sends a byte of an A-ASSOCIATE-RQ and no more
            connection = socket.create_connection(("127.0.0.1", service.port), timeout=10)
            connection.sendall(b"\x01")
            slow.append(connection)
        time.sleep(0.5)
        ae = AE(ae_title=GOOD)
        ae.acse_timeout = ae.dimse_timeout = 10
        # The association stays idle while `pacs-ai status` runs (a new interpreter: 10 s and more
        # on a loaded 2-core machine); a shorter network timeout made pynetdicom abort it meanwhile.
        ae.network_timeout = 300
        ae.add_requested_context(Verification)
        dataset = pydicom.dcmread(chest_phantom.paths[0])
        ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        assert association.send_c_store(dataset).Status == 0x0000
        # Meanwhile every association slot is taken: status says so and exits 1.
        time.sleep(2.5)  # each listener process publishes its counts every 2 s
        status = service.cli("status")
        assert status.returncode == 1 and "association slots are all taken" in status.stdout, status.stdout
        association.release()
        assert service.query("SELECT count(*) FROM instances")[0][0] == 1
        still_open = 0
        for connection in slow:
            connection.setblocking(False)
            try:
                still_open += connection.recv(1) != b""
            except BlockingIOError:
                still_open += 1
        assert still_open == 140, "the slow connections were held, not dropped, meanwhile"
    finally:
        for connection in slow:
            connection.close()
