"""The service's health as ``pacs-ai status`` and the admin console report it: counts from the index.

(``collect_status`` - listener, workers, queues, storage, broker, disk - is in
:mod:`pacs_ai.cli.status` for now.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_ai.index.models import Delivery, Instance, Job, Series, Study

__all__ = ["counts_in_words", "index_counts"]


def index_counts(session: Session) -> dict[str, Any]:
    """``index`` (studies, series, instances), ``purged_instances``, ``jobs`` and ``deliveries`` by state."""
    jobs = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
    deliveries = session.execute(
        select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)
    ).all()
    return {
        "index": {
            "studies": session.scalar(select(func.count(Study.id))),
            "series": session.scalar(select(func.count(Series.id))),
            "instances": session.scalar(select(func.count(Instance.id))),
        },
        "purged_instances": session.scalar(
            select(func.count(Instance.id)).where(Instance.purged_at.is_not(None))
        ),
        "jobs": {state.value: n for state, n in jobs},
        "deliveries": {state.value: n for state, n in deliveries},
    }


def counts_in_words(counts: dict[str, int]) -> str:
    """``{"done": 3, "failed": 1}`` as ``1 failed, 3 done``... sorted by state name; ``none`` when empty."""
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"
