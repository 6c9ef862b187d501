"""Retention: which studies' spool files may be deleted, and why (a pure decision, no I/O).

The spool keeps every received instance as it arrived.  Retention deletes
whole studies' files, chosen by two independent limits:

* **age**: studies whose newest instance arrived more than ``days`` ago;
* **disk watermarks**: when the spool's disk is at least ``high_percent`` full,
  the oldest studies (by newest instance) until it would be ``low_percent``
  full again, counting the bytes of the studies chosen.

Whatever the limits say, a study is *kept* while it is still needed:

* an instance of it has not been routed yet (it is still being received);
* a job of it has not finished (queued, running, or held for off-peak);
* a result of it is not delivered (a delivery pending, or failed and waiting
  for an administrator's ``pacs-ai retry``): forwarded originals are spool
  files, and SEG/SR must stay sendable;
* a report draft of it awaits the radiologist's decision: the worklist shows
  key images rendered from the source slices with the SEG overlay, and a
  re-draft after ``reprocess`` reads them too.  Signed, rejected and
  superseded drafts do not hold a study back.

This module only decides, from :class:`StudyFacts` gathered by the caller;
:mod:`pacs_ai.index.purge` gathers them from the index and deletes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = [
    "DiskUsage",
    "RetentionDecision",
    "RetentionPlan",
    "RetentionPolicy",
    "StudyFacts",
    "plan_retention",
]


@dataclass(frozen=True)
class RetentionPolicy:
    """The limits retention applies; a limit left None is not applied."""

    days: float | None = None
    high_watermark_percent: float | None = None
    low_watermark_percent: float | None = None

    @property
    def enabled(self) -> bool:
        return self.days is not None or self.high_watermark_percent is not None

    @property
    def target_percent(self) -> float | None:
        """How full the disk may be once the watermark purge is done."""
        if self.high_watermark_percent is None:
            return None
        return self.low_watermark_percent or self.high_watermark_percent


@dataclass(frozen=True)
class DiskUsage:
    """The spool's filesystem: total size and the bytes free to pacs-ai."""

    total_bytes: int
    free_bytes: int

    @property
    def used_percent(self) -> float:
        return 100.0 * (self.total_bytes - self.free_bytes) / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True)
class StudyFacts:
    """What retention needs to know about one study that still has files in the spool."""

    study_id: int
    study_instance_uid: str
    accession_number: str | None
    #: When the study's newest instance arrived.
    last_received_at: datetime
    #: Instances whose spool file has not been purged, and their bytes.
    instances: int
    spool_bytes: int
    #: Bytes of delivered result files that would go too (``retention_purge_results``), else 0.
    result_bytes: int = 0
    unrouted_instances: int = 0
    #: Job state value -> count, for jobs not finished (held, queued, running).
    unfinished_jobs: dict[str, int] = field(default_factory=dict)
    #: Delivery state value -> count, for deliveries not done (pending, failed).
    undelivered: dict[str, int] = field(default_factory=dict)
    #: Report drafts awaiting a radiologist's decision.
    open_drafts: int = 0

    @property
    def bytes(self) -> int:
        return self.spool_bytes + self.result_bytes

    def reasons_to_keep(self) -> list[str]:
        """Why the study must stay, in words for the operator; empty when it may go."""
        reasons: list[str] = []
        if self.unrouted_instances:
            reasons.append(f"still receiving ({self.unrouted_instances} instance(s) not routed yet)")
        if self.unfinished_jobs:
            reasons.append("unfinished jobs (" + _counts(self.unfinished_jobs) + ")")
        if self.undelivered:
            reasons.append("undelivered results (" + _counts(self.undelivered) + " deliveries)")
        if self.open_drafts:
            reasons.append(
                f"{self.open_drafts} report draft(s) awaiting sign-off (key images need the source)"
            )
        return reasons


@dataclass(frozen=True)
class RetentionDecision:
    """One study retention looked at: purge it (``why``) or keep it (``why`` and the limit it met)."""

    study: StudyFacts
    purge: bool
    #: The limit the study met, e.g. "older than 30 days" or "disk 93.1% used >= 90% high watermark".
    limit: str
    #: For a kept study, every reason it must stay.
    kept_because: list[str] = field(default_factory=list)


@dataclass
class RetentionPlan:
    """Studies to purge and studies kept despite meeting a limit, oldest first."""

    purge: list[RetentionDecision] = field(default_factory=list)
    kept: list[RetentionDecision] = field(default_factory=list)
    disk: DiskUsage | None = None
    #: Bytes the watermark purge wanted to free and the studies to purge free.
    bytes_wanted: int = 0
    bytes_planned: int = 0

    @property
    def shortfall_bytes(self) -> int:
        """Bytes the watermark purge cannot free because every older study must stay."""
        return max(0, self.bytes_wanted - self.bytes_planned)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def plan_retention(
    studies: Iterable[StudyFacts], policy: RetentionPolicy, *, now: datetime, disk: DiskUsage | None
) -> RetentionPlan:
    """Decide which studies to purge: those past the age limit, then the oldest until the low watermark.

    ``studies`` are those with files left in the spool; ``disk`` is the spool's
    filesystem now (None skips the watermark limit).  Studies that must stay
    are never purged; those of them that met a limit are listed as kept, with
    every reason, so an operator sees what holds the disk.
    """
    ordered = sorted(studies, key=lambda s: (s.last_received_at, s.study_id))
    plan = RetentionPlan(disk=disk)
    chosen: set[int] = set()

    if policy.days is not None:
        cutoff = now - timedelta(days=policy.days)
        for study in ordered:
            if study.last_received_at <= cutoff:
                _decide(plan, study, f"older than {policy.days:g} days", chosen)

    high, target = policy.high_watermark_percent, policy.target_percent
    if disk is not None and high is not None and target is not None and disk.used_percent >= high:
        target_used = disk.total_bytes * target / 100.0
        plan.bytes_wanted = max(0, int((disk.total_bytes - disk.free_bytes) - target_used))
        plan.bytes_planned = sum(d.study.bytes for d in plan.purge)
        limit = f"disk {disk.used_percent:.1f}% used >= {high:g}% high watermark (oldest until {target:g}%)"
        for study in ordered:
            if plan.bytes_planned >= plan.bytes_wanted:
                break
            if study.study_id not in chosen and _decide(plan, study, limit, chosen):
                plan.bytes_planned += study.bytes
    return plan


def _decide(plan: RetentionPlan, study: StudyFacts, limit: str, chosen: set[int]) -> bool:
    """Add the study to the plan as purged or kept; True if it will be purged."""
    chosen.add(study.study_id)
    reasons = study.reasons_to_keep()
    if reasons:
        plan.kept.append(RetentionDecision(study, purge=False, limit=limit, kept_because=reasons))
        return False
    plan.purge.append(RetentionDecision(study, purge=True, limit=limit))
    return True
