"""A worker's side of a prefetch hint: instances just put into the store, fetched into this host's cache.

The receiver sends the hint while the series is still in its quiet period
(:mod:`pacs_ai.route.prefetch`); when the job starts, :class:`HostFiles`
finds the copies in the cache instead of fetching them inside the
turnaround.  Nothing here is needed for correctness: a job fetches whatever
its host lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import exists, select
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

    Instances purged or not uploaded since the hint was sent are left out.  The objects are
    fetched ``worker_prefetch_concurrency`` at a time, in rounds; once the series is routed the
    rest is left to its job, which fetches at full concurrency and would otherwise wait for this
    hint on a one-process worker.  Raises :class:`~pacs_ai.storage.base.StorageError` when the
    store cannot be read.
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
    if files is None:
        concurrency = settings.worker_prefetch_concurrency
        files = HostFiles(settings.model_copy(update={"storage_fetch_concurrency": concurrency}))
    round_size = ROUNDS_OF * settings.worker_prefetch_concurrency
    before = files.fetched_objects
    kept: set[Path] = set()
    for start in range(0, len(keys), round_size):
        if _routed(sessions, instance_ids):
            break  # a hint taken after its series was routed fetches nothing: the job does
        kept.update(files.local_paths(keys[start : start + round_size], evict=False))
    fetched = files.fetched_objects - before
    if fetched:
        files.cache.evict(keep=kept)
    metrics.objects_fetched("prefetch", fetched)
    return fetched


#: A prefetch round is this many times ``worker_prefetch_concurrency`` objects: long enough that the
#: check between rounds costs nothing beside it, short enough that a routed series' job waits little.
ROUNDS_OF = 4


def _routed(sessions: sessionmaker[Session], instance_ids: Sequence[int]) -> bool:
    """Whether the router has decided on any of these instances (their series' job is on its way)."""
    with session_scope(sessions) as session:
        return bool(
            session.scalar(select(exists().where(Instance.id.in_(instance_ids), Instance.routed.is_(True))))
        )
