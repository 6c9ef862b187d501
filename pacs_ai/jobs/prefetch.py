"""A worker's side of a prefetch hint: instances just put into the store, fetched into this host's cache.

The receiver sends the hint while the series is still in its quiet period
(:mod:`pacs_ai.route.prefetch`); when the job starts, :class:`HostFiles`
finds the copies in the cache instead of fetching them inside the
turnaround.  Nothing here is needed for correctness: a job fetches whatever
its host lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.config import Settings
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Instance
from pacs_ai.storage.files import HostFiles

__all__ = ["prefetch_instances"]


def prefetch_instances(
    settings: Settings,
    sessions: sessionmaker[Session],
    instance_ids: Sequence[int],
    files: HostFiles | None = None,
) -> int:
    """Fetch the named instances that are in the store and not on this host; returns how many were fetched.

    Instances purged or not uploaded since the hint was sent are left out.  Raises
    :class:`~pacs_ai.storage.base.StorageError` when the store cannot be read.
    """
    with session_scope(sessions) as session:
        keys = list(
            session.scalars(
                select(Instance.path).where(
                    Instance.id.in_(instance_ids),
                    Instance.uploaded_at.is_not(None),
                    Instance.purged_at.is_(None),
                )
            )
        )
    files = files or HostFiles(settings)
    before = files.fetched_objects
    files.local_paths(keys)
    fetched = files.fetched_objects - before
    metrics.objects_fetched("prefetch", fetched)
    return fetched
