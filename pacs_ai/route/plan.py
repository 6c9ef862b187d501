"""From the rules that apply to a series to what pacs-ai will do with it (pure: no database, no I/O).

The router (:mod:`pacs_ai.route.assembly`) evaluates the rules, asks
:func:`plan_series` what the matching rules add up to, and then carries the
plan out: jobs for the profiles, deliveries of the originals, webhooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pacs_ai.route.profiles import Profile, SeriesFacts
from pacs_ai.route.rules import (
    DiscardAction,
    ForwardOriginalsAction,
    ForwardResultsAction,
    NotifyAction,
    ProcessAction,
    RoutingDecision,
    Rule,
)

#: Most urgent first; the plan takes the most urgent priority among the rules that apply.
PRIORITY_ORDER = ("stat", "routine", "off-peak")
#: Celery message priority per routing priority (Redis: 0 is served first).
CELERY_PRIORITY = {"stat": 0, "routine": 5, "off-peak": 9}


@dataclass(frozen=True)
class ProcessStep:
    profile: Profile
    rule: str


@dataclass
class SeriesPlan:
    """What the rules that apply to one series add up to."""

    process: list[ProcessStep] = field(default_factory=list)
    #: Destinations the analysis results go to, besides each profile's own.
    result_destinations: list[str] = field(default_factory=list)
    #: Destination -> the rule that forwards the original instances there.
    originals: dict[str, str] = field(default_factory=dict)
    #: (webhook URL, rule)
    notify: list[tuple[str, str]] = field(default_factory=list)
    #: (rule, reason) when a rule discards the series.
    discard: tuple[str, str] | None = None
    priority: str = "routine"
    #: Why something a rule asked for will not happen (e.g. the profile's input requirements).
    problems: list[str] = field(default_factory=list)
    #: What each shadow rule would have done.
    shadow: list[str] = field(default_factory=list)

    @property
    def does_anything(self) -> bool:
        return bool(self.process or self.originals or self.notify)


def describe_actions(rule: Rule) -> str:
    """The actions of a rule in words, e.g. for the shadow-mode record."""
    parts: list[str] = []
    for action in rule.actions:
        if isinstance(action, ProcessAction):
            parts.append(f"process with profile {action.process}")
        elif isinstance(action, ForwardOriginalsAction):
            parts.append(f"forward originals to {', '.join(action.forward_originals)}")
        elif isinstance(action, ForwardResultsAction):
            parts.append(f"forward results to {', '.join(action.forward_results)}")
        elif isinstance(action, DiscardAction):
            parts.append(f"discard ({action.discard})")
        elif isinstance(action, NotifyAction):
            parts.append(f"notify {action.notify}")
    return "; ".join(parts) + f" [priority {rule.priority}]"


def plan_series(decision: RoutingDecision, profiles: Sequence[Profile], facts: SeriesFacts) -> SeriesPlan:
    """Combine the actions of every rule that applies; check each named profile's own criteria."""
    by_name = {profile.name: profile for profile in profiles}
    plan = SeriesPlan()
    if decision.applied:
        plan.priority = min((rule.priority for rule in decision.applied), key=PRIORITY_ORDER.index)
    for rule in decision.applied:
        for action in rule.actions:
            if isinstance(action, ProcessAction):
                profile = by_name.get(action.process)
                if profile is None:
                    plan.problems.append(f"rule {rule.name}: profile {action.process!r} does not exist")
                elif not profile.enabled:
                    plan.problems.append(f"rule {rule.name}: profile {profile.name} is disabled")
                elif reasons := profile.match.mismatches(facts):
                    plan.problems.append(
                        f"rule {rule.name}: series does not meet the input requirements of profile "
                        f"{profile.name}: {', '.join(reasons)}"
                    )
                elif profile.name not in {step.profile.name for step in plan.process}:
                    plan.process.append(ProcessStep(profile, rule.name))
            elif isinstance(action, ForwardResultsAction):
                plan.result_destinations.extend(
                    d for d in action.forward_results if d not in plan.result_destinations
                )
            elif isinstance(action, ForwardOriginalsAction):
                for destination in action.forward_originals:
                    plan.originals.setdefault(destination, rule.name)
            elif isinstance(action, NotifyAction):
                plan.notify.append((action.notify, rule.name))
            elif isinstance(action, DiscardAction) and plan.discard is None:
                plan.discard = (rule.name, action.discard)
    plan.shadow = [f"shadow rule {rule.name} would: {describe_actions(rule)}" for rule in decision.shadowed]
    return plan
