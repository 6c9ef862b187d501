"""AI study priority rules: validation in profiles and the pure decision on a job's findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.analyze.base import Code, FindingSpec
from pacs_ai.index.models import StudyPriority
from pacs_ai.route.priority import decide_priority, less_urgent_than, parse_rules, raises
from pacs_ai.route.profiles import AnalyzerStep, PriorityRule, ProfileError, load_profile
from workers.tasks import HARD_TIME_LIMIT_GRACE_SECONDS, _soft_limit, analysis_time_limits, analyze_series

PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
EFFUSION = Code("60046008", "SCT", "Pleural effusion")
SOURCE = "profile cxr, model cxr-ptx 1.0.0"


def rule(finding: str, above: float, level: str) -> PriorityRule:
    return PriorityRule.model_validate({"finding": finding, "above": above, "set": level})


def finding(code: Code, probability: float, threshold: float = 0.5) -> FindingSpec:
    return FindingSpec(code, probability=probability, threshold=threshold)


def test_rule_fires_strictly_above_and_says_why() -> None:
    rules = [rule("36118008", 0.8, "STAT")]
    decision = decide_priority(rules, [finding(PNEUMOTHORAX, 0.93)], source=SOURCE)
    assert decision is not None
    assert decision.priority is StudyPriority.STAT
    assert decision.reason == "Pneumothorax p=0.93 > 0.8 (profile cxr, model cxr-ptx 1.0.0)"
    assert decide_priority(rules, [finding(PNEUMOTHORAX, 0.8)], source=SOURCE) is None  # not above


def test_rule_names_the_finding_by_code_value_or_meaning() -> None:
    findings = [finding(PNEUMOTHORAX, 0.9)]
    assert decide_priority([rule("pNeUmOtHoRaX", 0.5, "URGENT")], findings, source=SOURCE) is not None
    assert decide_priority([rule("36118008", 0.5, "URGENT")], findings, source=SOURCE) is not None
    # Another finding, or a code value that only resembles the meaning, does not fire.
    assert decide_priority([rule("60046008", 0.5, "URGENT")], findings, source=SOURCE) is None
    assert decide_priority([rule("Pneumo", 0.5, "URGENT")], findings, source=SOURCE) is None


def test_the_rule_fires_on_probability_not_on_the_present_flag() -> None:
    # The model's own threshold (0.95) says "absent"; the profile's rule asks for more caution.
    decision = decide_priority(
        [rule("36118008", 0.6, "URGENT")], [finding(PNEUMOTHORAX, 0.7, threshold=0.95)], source=SOURCE
    )
    assert decision is not None and decision.priority is StudyPriority.URGENT


def test_most_urgent_rule_wins_then_highest_probability_then_first_rule() -> None:
    findings = [finding(PNEUMOTHORAX, 0.85), finding(EFFUSION, 0.99)]
    rules = [rule("Pleural effusion", 0.5, "URGENT"), rule("36118008", 0.8, "STAT")]
    decision = decide_priority(rules, findings, source=SOURCE)
    assert decision is not None
    assert (decision.priority, decision.finding.finding) == (StudyPriority.STAT, PNEUMOTHORAX)

    same_level = [rule("36118008", 0.5, "URGENT"), rule("60046008", 0.5, "URGENT")]
    decision = decide_priority(same_level, findings, source=SOURCE)
    assert decision is not None and decision.finding.finding == EFFUSION  # 0.99 > 0.85

    both_rules_same_finding = [rule("36118008", 0.5, "URGENT"), rule("Pneumothorax", 0.1, "URGENT")]
    decision = decide_priority(both_rules_same_finding, [finding(PNEUMOTHORAX, 0.6)], source=SOURCE)
    assert decision is not None and decision.rule == both_rules_same_finding[0]


def test_no_rules_or_no_findings_decide_nothing() -> None:
    assert decide_priority([], [finding(PNEUMOTHORAX, 0.99)], source=SOURCE) is None
    assert decide_priority([rule("36118008", 0.1, "STAT")], [], source=SOURCE) is None


def test_priority_is_only_ever_raised() -> None:
    assert raises(None, StudyPriority.ROUTINE)
    assert raises("ROUTINE", StudyPriority.URGENT)
    assert raises("URGENT", StudyPriority.STAT)
    assert not raises("STAT", StudyPriority.URGENT)
    assert not raises("URGENT", StudyPriority.URGENT)
    assert less_urgent_than(StudyPriority.STAT) == ["URGENT", "ROUTINE"]
    assert less_urgent_than(StudyPriority.URGENT) == ["ROUTINE"]
    assert less_urgent_than(StudyPriority.ROUTINE) == []


def test_rules_survive_the_round_trip_through_a_job_row() -> None:
    step = AnalyzerStep.model_validate(
        {"name": "monai-bundle", "priority": [{"finding": " 36118008 ", "above": 0.8, "set": "stat"}]}
    )
    stored = [r.model_dump(by_alias=True, mode="json") for r in step.priority]
    assert stored == [{"finding": "36118008", "above": 0.8, "set": "STAT"}]
    assert parse_rules(stored) == step.priority
    assert parse_rules(None) == []


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("priority: [{finding: '36118008', above: 0.8, set: NOW}]", "priority.0.set: Input should be 'STAT'"),
        (
            "priority: [{finding: '36118008', above: 1.0, set: STAT}]",
            "priority.0.above: Input should be less",
        ),
        (
            "priority: [{finding: '36118008', above: -0.1, set: STAT}]",
            "priority.0.above: Input should be greater",
        ),
        ("priority: [{finding: '', above: 0.5, set: STAT}]", "priority.0.finding"),
        (
            "priority: [{finding: '  ', above: 0.5, set: STAT}]",
            "priority.0.finding: Value error, finding must name",
        ),
        ("priority: [{finding: x, above: 0.5, set: STAT, below: 0.9}]", "priority.0.below: Extra inputs"),
        ("priority: [{finding: x, set: STAT}]", "priority.0.above: Field required"),
        ("timeout_seconds: 0", "timeout_seconds: Input should be greater than 0"),
    ],
)
def test_invalid_rules_and_limits_are_reported_with_file_and_field(
    tmp_path: Path, step: str, message: str
) -> None:
    path = tmp_path / "cxr.yaml"
    path.write_text(
        "name: cxr\nmatch: {modality: [CR]}\n"
        f"analyzers:\n  - name: monai-bundle\n    queue: gpu\n    {step}\n"
    )
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert str(path) in str(raised.value)
    assert f"analyzers.0.{message}" in str(raised.value)


def test_a_valid_step_keeps_its_limit_and_rules(tmp_path: Path) -> None:
    path = tmp_path / "cxr.yaml"
    path.write_text(
        "name: cxr\nmatch: {modality: [CR, DX]}\nanalyzers:\n"
        "  - name: monai-bundle\n    queue: gpu\n    timeout_seconds: 600\n"
        "    params: {model: cxr-ptx}\n"
        "    priority:\n      - {finding: '36118008', above: 0.8, set: STAT}\n"
        "      - {finding: Pleural effusion, above: 0.9, set: URGENT}\n"
    )
    (step,) = load_profile(path).analyzers
    assert step.timeout_seconds == 600
    assert [(r.finding, r.above, r.level) for r in step.priority] == [
        ("36118008", 0.8, StudyPriority.STAT),
        ("Pleural effusion", 0.9, StudyPriority.URGENT),
    ]


def test_time_limits_give_the_task_time_to_record_why_it_stopped() -> None:
    assert analysis_time_limits(600) == {
        "soft_time_limit": 600,
        "time_limit": 600 + HARD_TIME_LIMIT_GRACE_SECONDS,
    }


def test_the_reported_limit_is_the_one_the_message_carried() -> None:
    # Celery puts a message's limits on the request as (hard, soft).
    analyze_series.push_request(timelimit=(72.0, 12.0))
    try:
        assert _soft_limit(analyze_series) == 12.0
    finally:
        analyze_series.pop_request()
    analyze_series.push_request(timelimit=None)
    try:
        assert _soft_limit(analyze_series) == analyze_series.soft_time_limit
    finally:
        analyze_series.pop_request()


def test_enqueued_analysis_carries_the_step_limit_or_the_default(tmp_path: Path) -> None:
    # A real Celery app on kombu's in-process memory transport; the limits travel in the message headers.
    from pacs_ai.config import Settings
    from pacs_ai.route.assembly import JobTicket
    from pacs_ai.service import CeleryTaskQueue
    from workers.factory import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="memory://", analysis_timeout_seconds=900))
    queue = CeleryTaskQueue(app)
    queue.enqueue_analysis(JobTicket(7, "gpu", 300))
    queue.enqueue_analysis(JobTicket(8, "gpu"))
    with app.connection_for_read() as connection:
        gpu = connection.SimpleQueue("gpu")
        try:
            messages = [gpu.get(timeout=2) for _ in range(2)]
        finally:
            gpu.close()
    assert [(m.payload[0], m.headers["timelimit"]) for m in messages] == [
        ([7], [300 + HARD_TIME_LIMIT_GRACE_SECONDS, 300]),
        ([8], [900 + HARD_TIME_LIMIT_GRACE_SECONDS, 900]),
    ]
