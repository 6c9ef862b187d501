"""Writing the audit trail: who did what to which object, without patient names or secrets."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from pacs_ai.index.models import AuditEvent, utcnow
from pacs_ai.redact import redact_mapping


def record_audit(
    session: Session | Connection,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the transaction of a session or connection (committed with it).

    The listener writes with Core connections on its hot path, the rest of
    pacs-ai with ORM sessions; both go through this one statement.  The
    detail is redacted first (:func:`pacs_ai.redact.redact_mapping`): a
    webhook's URL keeps its host and path but not its token, an error message
    no password of a URL it quotes.
    """
    session.execute(
        insert(AuditEvent).values(
            at=utcnow(),
            actor=actor,
            action=action,
            object_type=object_type,
            object_uid=object_uid,
            detail=redact_mapping(detail) if detail else detail,
        )
    )
