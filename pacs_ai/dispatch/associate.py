"""Requesting an association from a peer (a PACS, a destination), and saying why none was opened.

pynetdicom's ``AE.associate`` returns an association that is not established
without telling why: it may have been rejected (and by whom, for what: a
calling AE title the PACS does not know is the usual mistake when a site sets
up a new peer), aborted, or never connected.  Worse, when the peer rejects it
pynetdicom 3.0 may report it as aborted: its DUL thread reads the
A-ASSOCIATE-RJ and closes the connection, and if that happens before the
requesting thread checks the connection, the requesting thread aborts (seen in
our CI, 1 run in 23 under load).  The PDUs the peer sent are the answer
whichever thread wins, so :func:`request_association` keeps them (a handler
of ``EVT_PDU_RECV``, which runs before the PDU's event reaches the state
machine) and :meth:`RequestedAssociation.refusal` puts them into words for
the log, the audit record and ``pacs-ai echo``; so too an association the
peer accepted with none of the presentation contexts proposed (a PACS that
does not store SEG, say), which pynetdicom aborts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ssl import SSLContext

from pydicom.uid import UID
from pynetdicom import AE, Association, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ

__all__ = ["RequestedAssociation", "request_association"]


@dataclass
class RequestedAssociation:
    """An association requested from a peer, and what the peer answered."""

    association: Association
    #: Whether the TCP connection (and the TLS handshake, where configured) was made.
    connected: bool = False
    #: The peer's A-ASSOCIATE-AC, A-ASSOCIATE-RJ or A-ABORT, as it sent them.
    answers: list[A_ASSOCIATE_AC | A_ASSOCIATE_RJ | A_ABORT_RQ] = field(default_factory=list)

    def refusal(self) -> str | None:
        """None when the association is established; otherwise why not, in words (no PHI: the
        reasons are the standard's, and the peer is named by the caller)."""
        if self.association.is_established:
            return None
        for answer in self.answers:
            if isinstance(answer, A_ASSOCIATE_RJ):
                return f"rejected the association: {_rejection_in_words(answer)}"
        for answer in self.answers:
            if isinstance(answer, A_ABORT_RQ):
                return f"aborted the association: {_abort_in_words(answer)}"
        if any(isinstance(answer, A_ASSOCIATE_AC) for answer in self.answers):
            # pynetdicom aborts an association whose every presentation context was refused.
            proposed = sorted(
                {_name(cx.abstract_syntax) for cx in self.association.requestor.requested_contexts}
            )
            return (
                "accepted the association but none of the presentation contexts proposed (does it "
                f"store {', '.join(proposed)}, in one of the transfer syntaxes offered?)"
            )
        if not self.connected:
            return "could not be reached (connection refused or timed out, or a failed TLS handshake)"
        return "gave no answer to the association request in time"


def _name(uid: str | None) -> str:
    """A SOP class's name ("Segmentation Storage"), or its UID where pydicom does not know it."""
    return UID(uid).name if uid else "?"


def _rejection_in_words(rejection: A_ASSOCIATE_RJ) -> str:
    """The rejection in words ("Rejected (Permanent), DUL service-user: Calling AE title not
    recognised"); its numbers where the peer sent values the standard does not define."""
    try:
        return f"{rejection.result_str}, {rejection.source_str}: {rejection.reason_str}"
    except ValueError:
        return f"result {rejection.result}, source {rejection.source}, reason {rejection.reason_diagnostic}"


def _abort_in_words(abort: A_ABORT_RQ) -> str:
    """The abort in words ("DUL service-provider: Unexpected PDU"); a service-user gives no reason."""
    if abort.source == 2:
        return f"DUL service-provider: {abort.reason_str}"
    return "DUL service-user" if abort.source == 0 else f"source {abort.source}"


def request_association(
    ae: AE, host: str, port: int, ae_title: str, tls_args: tuple[SSLContext, str] | None = None
) -> RequestedAssociation:
    """``ae.associate`` to ``ae_title`` at ``host``:``port``, keeping what the peer answered."""
    connected: list[bool] = []
    answers: list[A_ASSOCIATE_AC | A_ASSOCIATE_RJ | A_ABORT_RQ] = []

    def opened(_event: evt.Event) -> None:
        connected.append(True)

    def received(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_AC | A_ASSOCIATE_RJ | A_ABORT_RQ):
            answers.append(event.pdu)

    association = ae.associate(
        host,
        port,
        ae_title=ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, opened), (evt.EVT_PDU_RECV, received)],
    )
    return RequestedAssociation(association, bool(connected), answers)
