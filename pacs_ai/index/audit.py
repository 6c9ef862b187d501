"""Writing the audit trail: who did what to which object, without patient names."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from pacs_ai.index.models import AuditEvent


def record_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the session's transaction (committed with it)."""
    session.add(
        AuditEvent(actor=actor, action=action, object_type=object_type, object_uid=object_uid, detail=detail)
    )
