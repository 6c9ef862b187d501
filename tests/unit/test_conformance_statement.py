"""docs/conformance-statement.md says what the listener really negotiates, and with which limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
)
from pynetdicom.presentation import VerificationPresentationContexts
from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

from pacs_ai.config import Settings
from pacs_ai.receive.acceptor import AcceptorPolicy, negotiate
from tests.e2e.dicom_wire import associate_request

STATEMENT = Path(__file__).resolve().parents[2] / "docs" / "conformance-statement.md"
TEXT = STATEMENT.read_text(encoding="utf-8")
POLICY = AcceptorPolicy(ae_title="PACS_AI")


def _section(title: str) -> str:
    start = TEXT.index(title)
    following = TEXT.find("\n#", start + len(title))
    return TEXT[start : following if following > 0 else len(TEXT)]


def _accepted(sop_class: str, syntaxes: list[str]) -> dict[int, tuple[str, str]]:
    request = bytearray(associate_request("PACS_AI", "SCU", [(sop_class, syntaxes[0])]))
    negotiation = negotiate(bytes(request), POLICY)
    assert negotiation.accepted
    return negotiation.contexts


def test_every_storage_class_is_accepted_as_the_statement_says() -> None:
    assert f"{len(_STORAGE_CLASSES)} known to pynetdicom" in _section("#### 4.2.1")
    for uid in _STORAGE_CLASSES.values():
        assert _accepted(uid, [ExplicitVRLittleEndian]) == {1: (uid, ExplicitVRLittleEndian)}
    private = "1.2.826.0.1.3680043.8.498.77"
    assert _accepted(private, [ImplicitVRLittleEndian]) == {1: (private, ImplicitVRLittleEndian)}


def test_verification_transfer_syntaxes_are_the_ones_listed() -> None:
    row = next(line for line in _section("#### 4.2.1").splitlines() if line.startswith("| Verification"))
    listed = re.findall(r"`([0-9.]+)`", row)
    assert listed[0] == "1.2.840.10008.1.1"
    assert listed[1:] == list(VerificationPresentationContexts[0].transfer_syntax)
    for syntax in listed[1:]:
        assert _accepted("1.2.840.10008.1.1", [syntax]) == {1: ("1.2.840.10008.1.1", syntax)}


@pytest.mark.parametrize(
    "uid",
    re.findall(
        r"`(1\.2\.840\.10008\.[0-9.]+)`", TEXT[TEXT.index("SOP classes refused as SCP") :].split("\n\n")[0]
    ),
)
def test_classes_the_statement_refuses_are_refused(uid: str) -> None:
    assert _accepted(uid, [ExplicitVRLittleEndian]) == {}


def test_implementation_identity_is_the_listener_s_own() -> None:
    negotiation = negotiate(
        associate_request("PACS_AI", "SCU", [("1.2.840.10008.1.1", ImplicitVRLittleEndian)]), POLICY
    )
    reply = A_ASSOCIATE_AC()
    reply.decode(negotiation.reply)
    items = reply.to_primitive().user_information
    uid = next(i for i in items if isinstance(i, ImplementationClassUIDNotification)).implementation_class_uid
    version = next(i for i in items if isinstance(i, ImplementationVersionNameNotification))
    table = _section("### 4.1")
    assert f"| Implementation Class UID | `{uid}` |" in table
    assert f"| Implementation Version Name | `{version.implementation_version_name}` |" in table
    assert not str(uid).startswith("1.2.826.0.1.3680043.9.3811")  # not pynetdicom's


def test_the_limits_table_gives_the_settings_defaults() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| ([0-9.]+) \|", _section("## Appendix: limits"), re.MULTILINE)
    assert len(rows) >= 8
    for name, default in rows:
        assert float(Settings.model_fields[name].default) == float(default), name
