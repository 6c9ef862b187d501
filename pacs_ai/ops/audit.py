"""Searching the audit trail (``pacs-ai audit`` and the admin console), and saying an event in words.

The trail is written by :func:`pacs_ai.index.audit.record_audit`; here it is
read: by action (a trailing ``*`` matches a prefix, e.g. ``job.*``), actor,
object (a UID or id) and time range, newest first.  :func:`describe_detail`
turns an event's detail into ``key: value`` text a person reads (no JSON
quoting or escapes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.models import AuditEvent

__all__ = ["AUDIT_SEARCH_LIMIT", "audit_row", "describe_detail", "search_audit"]

#: Events one search returns at most.
AUDIT_SEARCH_LIMIT = 5000


def search_audit(
    session: Session,
    *,
    action: str | None = None,
    actor: str | None = None,
    object_uid: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
) -> list[AuditEvent]:
    """Events matching every given criterion, newest first, at most ``limit`` (capped)."""
    query = select(AuditEvent)
    if action:
        query = (
            query.where(AuditEvent.action.startswith(action[:-1]))
            if action.endswith("*")
            else query.where(AuditEvent.action == action)
        )
    if object_uid:
        query = query.where(AuditEvent.object_uid == object_uid)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at <= until)
    limit = max(1, min(limit, AUDIT_SEARCH_LIMIT))
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)))


def audit_row(event: AuditEvent) -> dict[str, Any]:
    """An event as ``pacs-ai audit --json`` prints it (and the worklist's ``/api/audit`` with its id)."""
    return {
        "id": event.id,
        "at": event.at,
        "actor": event.actor,
        "action": event.action,
        "object_type": event.object_type,
        "object_uid": event.object_uid,
        "detail": event.detail,
    }


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "(" + describe_detail(value) + ")"
    if isinstance(value, list | tuple):
        return ", ".join(_value(item) for item in value) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def describe_detail(detail: dict[str, Any] | None) -> str:
    """``reason: no rule matched; job: 12`` from ``{"reason": "no rule matched", "job": 12}`` (pure)."""
    if not detail:
        return ""
    return "; ".join(f"{key.replace('_', ' ')}: {_value(value)}" for key, value in detail.items())
