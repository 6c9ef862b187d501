"""Association negotiation as acceptor, with pynetdicom's PDU classes and context negotiation.

The listener does its own network loop (see :mod:`pacs_ai.receive.server`) but
not its own protocol encoding: A-ASSOCIATE-RQ is decoded, and A-ASSOCIATE-AC/RJ,
A-RELEASE-RP and A-ABORT are encoded, by :mod:`pynetdicom.pdu`, and presentation
contexts are negotiated by :func:`pynetdicom.presentation.negotiate_unrestricted`:
Verification in its standard syntaxes, and every storage SOP class, public or
private, in the first transfer syntax the sender proposes, stored as received.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pydicom.uid import UID_dictionary
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    VerificationPresentationContexts,
    negotiate_as_acceptor,
    negotiate_unrestricted,
)
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

from pacs_ai.receive.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacs_ai.receive.security import KnownPeer, check_known_peer, matching_peer

#: The DICOM application context (PS3.7 A.2.1); the only one there is.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION = (0x02, 0x02, 0x02)
#: Rejected-transient, by the service provider (presentation related function), local limit exceeded.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

# A-ABORT provider reasons (PS3.8 9.3.8): the listener aborts as service provider.
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


class NegotiationError(ValueError):
    """An A-ASSOCIATE-RQ that cannot be decoded."""


@dataclass(frozen=True)
class AcceptorPolicy:
    """Who may associate with the listener, and on what terms."""

    ae_title: str
    allowed_calling_ae_titles: tuple[str, ...] = ()
    #: Largest P-DATA-TF PDU the listener accepts; 0 is unlimited (PS3.8 D.1).
    maximum_pdu_length: int = 0
    #: Once any is named, only these callers are accepted (see :mod:`pacs_ai.receive.security`).
    known_peers: tuple[KnownPeer, ...] = ()


@dataclass
class Negotiation:
    """The outcome of an A-ASSOCIATE-RQ: the PDU to send back and, if accepted, the terms."""

    reply: bytes
    accepted: bool
    calling_ae_title: str
    #: Accepted presentation contexts: context ID -> (abstract syntax, transfer syntax).
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Largest PDU the requestor accepts from the listener; 0 is unlimited.
    peer_maximum_pdu_length: int = 0
    #: Why the association was rejected (for the log).
    reason: str = ""
    #: The kind of rejection, for metrics: protocol-version, application-context, called-ae,
    #: calling-ae, unknown-peer, peer-mismatch, association-limit or low-disk.
    reason_class: str = ""
    #: The known peer the accepted caller matched (None when no peers are named).
    known_peer: KnownPeer | None = None


def negotiate(
    request_pdu: bytes,
    policy: AcceptorPolicy,
    *,
    over_limit: bool | str = False,
    low_disk: str | None = None,
    peer_address: str | None = None,
    certificate_subject: str | None = None,
) -> Negotiation:
    """Answer a whole A-ASSOCIATE-RQ PDU (header included).

    A caller that is not one of ``policy.known_peers`` (when any are named),
    judged by its AE title, ``peer_address`` and TLS ``certificate_subject``,
    is rejected permanently.  ``over_limit`` (True, or why in words) rejects
    it (transient, local limit exceeded) because the listener already serves
    as many associations as it may; ``low_disk`` (why, in words) rejects it
    the same way because the spool's disk is nearly full: the sender keeps
    its data and tries again later.
    """
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(request_pdu)
        request = pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises a variety of errors on malformed items
        raise NegotiationError(f"malformed A-ASSOCIATE-RQ: {exc}") from exc

    calling = request.calling_ae_title.strip()
    called = request.called_ae_title.strip()
    rejection: tuple[tuple[int, int, int], str, str] | None = None
    if pdu.protocol_version != 1:
        rejection = REJECT_PROTOCOL_VERSION, f"protocol version {pdu.protocol_version}", "protocol-version"
    elif str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
        rejection = (
            REJECT_APPLICATION_CONTEXT,
            f"application context {request.application_context_name}",
            "application-context",
        )
    elif called != policy.ae_title:
        rejection = REJECT_CALLED_AE, f"called AE title {called!r} is not {policy.ae_title!r}", "called-ae"
    elif policy.allowed_calling_ae_titles and calling not in policy.allowed_calling_ae_titles:
        rejection = REJECT_CALLING_AE, f"calling AE title {calling!r} is not allowed", "calling-ae"
    elif refusal := check_known_peer(policy.known_peers, calling, peer_address, certificate_subject):
        rejection = (
            (REJECT_CALLING_AE, refusal.reason, "unknown-peer")
            if refusal.unknown_ae
            else (REJECT_NO_REASON, refusal.reason, "peer-mismatch")
        )
    elif over_limit:
        limit_reason = over_limit if isinstance(over_limit, str) else "too many associations"
        rejection = REJECT_LOCAL_LIMIT, limit_reason, "association-limit"
    elif low_disk:
        rejection = REJECT_LOCAL_LIMIT, low_disk, "low-disk"
    if rejection is not None:
        (result, source, diagnostic), reason, reason_class = rejection
        return Negotiation(
            reply=_reject_pdu(result, source, diagnostic),
            accepted=False,
            calling_ae_title=calling,
            reason=reason,
            reason_class=reason_class,
        )

    user_items = request.user_information
    requested_roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in user_items
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }
    proposed = request.presentation_context_definition_list
    results, role_replies = negotiate_unrestricted(
        [context for context in proposed if _offered(context)],
        VerificationPresentationContexts,
        requested_roles,
    )
    # Known SOP classes of other services (Query/Retrieve, Worklist, Storage Commitment): the listener
    # does not provide them, so their contexts are rejected (abstract syntax not supported).
    refused, _ = negotiate_as_acceptor([context for context in proposed if not _offered(context)], [])
    results = sorted([*results, *refused], key=lambda context: int(context.context_id or 0))
    reply_items: list[object] = [_maximum_length(policy.maximum_pdu_length), *_implementation_items()]
    reply_items.extend(role_replies)
    if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in user_items):
        # Operations are performed one at a time (PS3.7 D.3.3.3: the default window).
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        reply_items.append(window)

    accept = A_ASSOCIATE()
    accept.application_context_name = APPLICATION_CONTEXT_NAME
    accept.calling_ae_title = request.calling_ae_title
    accept.called_ae_title = request.called_ae_title
    accept.result = 0x00
    accept.result_source = 0x01
    accept.presentation_context_definition_results_list = results
    accept.user_information = reply_items  # type: ignore[assignment]
    reply = A_ASSOCIATE_AC()
    reply.from_primitive(accept)
    return Negotiation(
        reply=reply.encode(),
        accepted=True,
        calling_ae_title=calling,
        contexts={
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))  # type: ignore[arg-type]
            for cx in results
            if cx.result == 0x00
        },
        peer_maximum_pdu_length=request.maximum_length_received or 0,
        known_peer=matching_peer(policy.known_peers, calling, peer_address, certificate_subject),
    )


def _offered(context: PresentationContext) -> bool:
    """Whether the listener provides the context's SOP class: Verification, storage, private or unknown.

    pynetdicom's unrestricted negotiation treats every SOP class it has no
    name for as storage; known classes of other services are refused here.
    """
    abstract_syntax = str(context.abstract_syntax)
    if abstract_syntax not in UID_dictionary:
        return True
    return issubclass(uid_to_service_class(abstract_syntax), StorageServiceClass | VerificationServiceClass)


def _maximum_length(length: int) -> MaximumLengthNotification:
    item = MaximumLengthNotification()
    item.maximum_length_received = length
    return item


def _implementation_items() -> list[object]:
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [uid, version]


def _reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def release_response_pdu() -> bytes:
    """A-RELEASE-RP."""
    return A_RELEASE_RP().encode()


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (the listener's protocol machine) with ``reason``."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = reason
    return pdu.encode()


_PDV_HEADER = struct.Struct(">IBB")
_PDU_HEADER = struct.Struct(">BBI")


def command_pdus(context_id: int, command_set: bytes, peer_maximum_pdu_length: int) -> bytes:
    """P-DATA-TF PDU(s) carrying a whole command set, fragmented to the peer's maximum PDU length."""
    # The maximum bounds a PDU's variable field: one PDV item, i.e. its 6-byte header and the fragment.
    room = len(command_set) if not peer_maximum_pdu_length else max(1, peer_maximum_pdu_length - 6)
    pdus = []
    for start in range(0, len(command_set), room):
        fragment = command_set[start : start + room]
        control = 0x03 if start + room >= len(command_set) else 0x01
        pdv = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_PDU_HEADER.pack(0x04, 0, len(pdv)) + pdv)
    return b"".join(pdus)
