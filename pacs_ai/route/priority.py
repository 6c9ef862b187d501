"""AI study priority: which reading priority a job's findings ask for, and why.

A profile step may carry :class:`~pacs_ai.route.profiles.PriorityRule` s
("pneumothorax above 0.8: STAT").  After a job succeeds its classification
findings are checked against the rules it was opened with; the most urgent
rule that fires wins and becomes the study's priority unless the study
already has that or a more urgent one (:func:`raises`): a later, calmer
result never hides an earlier alarm.

Everything here is pure (rules and findings in, a decision out), so the
decisions are unit-tested without a database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pacs_ai.analyze.base import FindingSpec
from pacs_ai.index.models import StudyPriority
from pacs_ai.route.profiles import PriorityRule

__all__ = ["PriorityDecision", "decide_priority", "less_urgent_than", "parse_rules", "raises"]


@dataclass(frozen=True)
class PriorityDecision:
    """The priority a job's findings ask for, with the rule and finding that asked."""

    priority: StudyPriority
    rule: PriorityRule
    finding: FindingSpec
    #: For operators and the worklist, e.g. "Pneumothorax p=0.93 > 0.8 (profile cxr, model cxr-ptx 1.0.0)".
    reason: str


def parse_rules(stored: Iterable[dict[str, Any]] | None) -> list[PriorityRule]:
    """Rules as a job stores them (``PriorityRule.model_dump(by_alias=True)``) back to rules."""
    return [PriorityRule.model_validate(rule) for rule in stored or []]


def decide_priority(
    rules: Sequence[PriorityRule], findings: Sequence[FindingSpec], *, source: str
) -> PriorityDecision | None:
    """The most urgent priority a rule sets for ``findings``; None when no rule fires.

    A rule fires for a finding it names (code value, or code meaning
    case-insensitively) whose probability is strictly above the rule's
    ``above``.  Among the rules that fire the most urgent wins; between equally
    urgent ones the higher probability, then the earlier rule.  ``source``
    ends the reason (which profile and model produced the finding).
    """
    fired: list[tuple[int, float, int, PriorityRule, FindingSpec]] = []
    for order, rule in enumerate(rules):
        for finding in findings:
            named = rule.matches(finding.finding.value, finding.finding.meaning)
            if named and finding.probability > rule.above:
                fired.append((rule.level.rank, -finding.probability, order, rule, finding))
    if not fired:
        return None
    _, _, _, rule, finding = min(fired, key=lambda item: item[:3])
    reason = f"{finding.finding.meaning} p={finding.probability:.2f} > {rule.above:g} ({source})"
    return PriorityDecision(priority=rule.level, rule=rule, finding=finding, reason=reason)


def raises(current: str | None, new: StudyPriority) -> bool:
    """True when ``new`` is more urgent than the study's ``current`` priority (None: not set)."""
    return current is None or new.rank < StudyPriority(current).rank


def less_urgent_than(level: StudyPriority) -> list[str]:
    """The stored priority values ``level`` may replace (besides none at all)."""
    return [other.value for other in StudyPriority if other.rank > level.rank]
