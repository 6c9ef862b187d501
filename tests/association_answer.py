"""What an acceptor answered a pynetdicom requestor, read from the PDU the requestor received.

pynetdicom 3.0's requestor can report a rejected association as aborted.  Its DUL thread reads
the A-ASSOCIATE-RJ and closes the connection (state machine action AE-4); if that happens before
the calling thread, having sent the A-ASSOCIATE-RQ, checks that the connection is up
(``ACSE._negotiate_as_requestor``), the calling thread finds it closed and aborts, so
``Association.is_rejected`` stays False although the rejection arrived intact.  Reproduced with
the over-the-limit test under load (1 run in 23 beside six busy loops); it failed CI twice.

The PDU is the acceptor's answer whichever thread wins, so tests that check a rejection read it
here instead of trusting ``is_rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ


@dataclass
class AssociationAnswer:
    """The association pynetdicom returned, and the answer PDUs its DUL thread decoded."""

    association: Association
    received: list[object] = field(default_factory=list)

    @property
    def rejection(self) -> A_ASSOCIATE_RJ | None:
        """The A-ASSOCIATE-RJ received, if the acceptor rejected the association."""
        return next((pdu for pdu in self.received if isinstance(pdu, A_ASSOCIATE_RJ)), None)

    @property
    def accepted(self) -> bool:
        """True if the acceptor sent an A-ASSOCIATE-AC."""
        return any(isinstance(pdu, A_ASSOCIATE_AC) for pdu in self.received)


def associate(ae: AE, host: str, port: int, ae_title: str) -> AssociationAnswer:
    """``ae.associate`` that also keeps every PDU received, decoded, in :class:`AssociationAnswer`.

    The handler runs in pynetdicom's DUL thread before the PDU's event reaches the state machine,
    so by the time ``ae.associate`` returns the answer is recorded, whichever way it went.
    """
    answer_pdus: list[object] = []

    def keep(event: evt.Event) -> None:
        answer_pdus.append(event.pdu)

    association = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_PDU_RECV, keep)])
    return AssociationAnswer(association, answer_pdus)
