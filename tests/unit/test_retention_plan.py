"""Retention's decision (pacs_ai.index.retention): purged by age and watermark, or kept and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pacs_ai.index.retention import DiskUsage, RetentionPolicy, StudyFacts, plan_retention

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GB = 1024**3


def study(study_id: int, days_old: float, *, gb: float = 1.0, **holds: object) -> StudyFacts:
    return StudyFacts(
        study_id=study_id,
        study_instance_uid=f"1.2.3.{study_id}",
        accession_number=f"ACC{study_id}",
        last_received_at=NOW - timedelta(days=days_old),
        instances=10,
        spool_bytes=int(gb * GB),
        **holds,  # type: ignore[arg-type]
    )


def uids(decisions: list) -> list[str]:  # type: ignore[type-arg]
    return [d.study.study_instance_uid for d in decisions]


def test_age_limit_purges_only_older_studies_oldest_first() -> None:
    plan = plan_retention(
        [study(1, 10), study(2, 40), study(3, 31), study(4, 29.9)],
        RetentionPolicy(days=30),
        now=NOW,
        disk=DiskUsage(total_bytes=100 * GB, free_bytes=90 * GB),
    )
    assert uids(plan.purge) == ["1.2.3.2", "1.2.3.3"]
    assert plan.kept == [] and plan.bytes_wanted == 0
    assert all(d.limit == "older than 30 days" for d in plan.purge)


def test_studies_still_needed_are_kept_with_every_reason() -> None:
    plan = plan_retention(
        [
            study(1, 50, undelivered={"failed": 2}),
            study(2, 50, unfinished_jobs={"queued": 1, "held": 1}),
            study(3, 50, open_drafts=1, undelivered={"pending": 1}),
            study(4, 50, unrouted_instances=3),
            study(5, 50),
        ],
        RetentionPolicy(days=30),
        now=NOW,
        disk=None,
    )
    assert uids(plan.purge) == ["1.2.3.5"]
    kept = {d.study.study_id: d.kept_because for d in plan.kept}
    assert kept[1] == ["undelivered results (2 failed deliveries)"]
    assert kept[2] == ["unfinished jobs (1 held, 1 queued)"]
    assert kept[3] == [
        "undelivered results (1 pending deliveries)",
        "1 report draft(s) awaiting sign-off (key images need the source)",
    ]
    assert kept[4] == ["still receiving (3 instance(s) not routed yet)"]
    assert not any(d.purge for d in plan.kept)


def test_high_watermark_purges_oldest_until_the_low_watermark() -> None:
    # 95 GB of 100 used; high 90 %, low 80 %: 15 GB must go, oldest first, 4 GB each.
    studies = [study(i, days_old=100 - i, gb=4) for i in range(1, 8)]
    plan = plan_retention(
        studies,
        RetentionPolicy(high_watermark_percent=90, low_watermark_percent=80),
        now=NOW,
        disk=DiskUsage(total_bytes=100 * GB, free_bytes=5 * GB),
    )
    assert plan.bytes_wanted == 15 * GB
    assert uids(plan.purge) == ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]  # 16 GB >= 15 GB
    assert plan.shortfall_bytes == 0
    assert "95.0% used >= 90% high watermark" in plan.purge[0].limit


def test_watermark_skips_held_studies_and_reports_the_shortfall() -> None:
    studies = [
        study(1, 60, gb=10, undelivered={"failed": 1}),
        study(2, 50, gb=3),
        study(3, 40, gb=10, unfinished_jobs={"running": 1}),
    ]
    plan = plan_retention(
        studies,
        RetentionPolicy(high_watermark_percent=90, low_watermark_percent=80),
        now=NOW,
        disk=DiskUsage(total_bytes=100 * GB, free_bytes=5 * GB),
    )
    assert uids(plan.purge) == ["1.2.3.2"]
    assert uids(plan.kept) == ["1.2.3.1", "1.2.3.3"]
    assert plan.shortfall_bytes == 12 * GB


def test_below_the_high_watermark_nothing_is_purged_for_disk() -> None:
    plan = plan_retention(
        [study(1, 500)],
        RetentionPolicy(high_watermark_percent=90, low_watermark_percent=80),
        now=NOW,
        disk=DiskUsage(total_bytes=100 * GB, free_bytes=11 * GB),
    )
    assert plan.purge == [] and plan.kept == [] and plan.bytes_wanted == 0


def test_age_and_watermark_together_count_aged_studies_first() -> None:
    # The aged study (8 GB) already frees more than the 5 GB the watermark wants.
    plan = plan_retention(
        [study(1, 45, gb=8), study(2, 20, gb=8)],
        RetentionPolicy(days=30, high_watermark_percent=90),
        now=NOW,
        disk=DiskUsage(total_bytes=100 * GB, free_bytes=5 * GB),
    )
    assert uids(plan.purge) == ["1.2.3.1"] and plan.purge[0].limit == "older than 30 days"
    assert plan.bytes_wanted == 5 * GB and plan.shortfall_bytes == 0


def test_no_limit_means_no_purge() -> None:
    policy = RetentionPolicy()
    assert not policy.enabled
    plan = plan_retention([study(1, 1000)], policy, now=NOW, disk=DiskUsage(100 * GB, 0))
    assert plan.purge == [] and plan.kept == []
