"""Prefetch hints: telling the workers of a queue about instances as they reach the object store.

With a remote object store a worker fetches a series before it can load it:
for a 300-slice CT, 300 objects and about 150 MB, which took 0.4-1.0 s on
the two-core test machine and came after the quiet period, inside the
turnaround.  Yet the instances reach the store one upload batch at a time
while the quiet period runs.  So after each batch the receiver sends a hint
naming the batch's instances to the queue of every profile the series would
be analysed by, where a live worker serves it (:func:`prefetch_hints`), and a worker of that queue fetches
them into its cache (:func:`pacs_ai.jobs.prefetch.prefetch_instances`).
When the series is routed, its job finds the files there.

A hint is only ever a hint: it carries instance ids, never DICOM bytes; it
is sent at the broker's lowest priority, so a busy worker runs its jobs
first and takes hints only when idle; it expires; and a job fetches
whatever its host does not have, so a hint lost, late, or taken by another
worker of the queue costs nothing but the fetch it would have saved.  With
several workers on a queue each batch is fetched by one of them, so a
series is fetched at most about twice (hints, then the job's own fetch of
what its worker lacks); ``worker_prefetch = false`` turns hints off.

Which profiles will analyse a series is decided at the end of its quiet
period; the hint uses the profiles' criteria on what is known now and leaves
out the instance counts, which say nothing while the series arrives.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.models import Instance, Series
from pacs_ai.route.assembly import series_facts
from pacs_ai.route.profiles import Profile, SeriesFacts

__all__ = ["PrefetchHint", "likely_queues", "prefetch_hints"]


@dataclass(frozen=True)
class PrefetchHint:
    """Instances for the workers of one queue to fetch into their cache."""

    queue: str
    instance_ids: list[int]


def likely_queues(profiles: Sequence[Profile], facts: SeriesFacts) -> set[str]:
    """The queues of the analyzers of every enabled profile whose criteria the series meets so far."""
    return {
        step.queue
        for profile in profiles
        if profile.enabled and not profile.match.mismatches(facts, count_instances=False)
        for step in profile.analyzers
    }


def prefetch_hints(
    session: Session, profiles: Sequence[Profile], instance_ids: Sequence[int], served: Collection[str]
) -> list[PrefetchHint]:
    """The hints for instances just put into the store: one per queue, naming the instances of every
    series not routed yet that a profile of that queue would analyse.

    Only queues in ``served`` (those a live worker serves) get one: in a queue no worker reads, a
    hint would only wait, and expire only once a worker took it.
    """
    rows = session.execute(
        select(Instance.id, Instance.series_fk).where(
            Instance.id.in_(instance_ids), Instance.routed.is_(False)
        )
    ).all()
    by_series: dict[int, list[int]] = defaultdict(list)
    for instance_id, series_id in rows:
        by_series[series_id].append(instance_id)
    by_queue: dict[str, list[int]] = defaultdict(list)
    for series_id, ids in by_series.items():
        for queue in likely_queues(profiles, series_facts(session.get_one(Series, series_id))):
            if queue in served:
                by_queue[queue].extend(ids)
    return [PrefetchHint(queue, sorted(ids)) for queue, ids in sorted(by_queue.items())]
