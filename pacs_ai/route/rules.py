"""Routing rules: conditions over a series (or study) and what to do when they hold.

Rules live in YAML next to the profiles (``rules.yaml``), are validated when
loaded, and are evaluated as data: each condition is a small typed object, no
user text is ever passed to ``eval``.  A rule file looks like::

    off_peak: {start: "20:00", end: "06:00"}
    rules:
      - name: chest-ct
        trigger: series                 # series | study
        when:
          all:
            - {attribute: Modality, equals: CT}
            - {attribute: BodyPartExamined, in: [CHEST, THORAX]}
            - not: {attribute: ImageType, regex: "LOCALIZER"}
            - {attribute: SliceThickness, range: {max: 2.5}}
            - {calling_ae: [CT_SCANNER_1, CT_SCANNER_2]}
            - {peer_address: ["10.1.0.0/16"]}
        actions:
          - {process: ct-chest-lungs}
          - {forward_originals: [archive]}
          - {forward_results: [pacs]}
          - {notify: "http://ris.example.org/hooks/ai"}
        priority: routine               # stat | routine | off-peak
      - name: everything-else
        fallback: true                  # applies when no other rule matched
        actions: [{discard: "no AI service for this series"}]

Attribute conditions name a DICOM keyword (checked against pydicom's
dictionary).  For multi-valued attributes (ImageType, say) ``equals``, ``in``
and ``regex`` pass when any value passes; ``range`` needs a numeric value;
``exists`` tests for a present, non-empty value.  Matching is exact and
case-sensitive for ``equals``/``in``, as DICOM code strings are; use a regex
with ``(?i)`` for free text.

A rule with ``shadow: true`` is evaluated on live traffic and what it would
have done is recorded, but its actions are not carried out: the way to try a
new rule safely.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.multival import MultiValue

from pacs_ai.yaml_files import load_yaml_model

RULES_FILE_NAMES = ("rules.yaml", "rules.yml")


@dataclass(frozen=True)
class RoutingFacts:
    """What a rule can look at: the DICOM attributes of a series or study, and who sent it."""

    #: keyword -> value (str, number, or a list of them for multi-valued attributes)
    attributes: Mapping[str, Any]
    calling_ae_title: str | None = None
    peer_address: str | None = None


@dataclass(frozen=True)
class Verdict:
    """Whether a condition holds, with one line per test saying why."""

    holds: bool
    reasons: list[str] = field(default_factory=list)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [v for v in value if v is not None and v != ""]
    return [value]


def _shown(value: Any) -> str:
    values = _values(value)
    if not values:
        return "missing"
    return "\\".join(str(v) for v in values)


class NumberRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_a_bound(self) -> NumberRange:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self

    def describe(self) -> str:
        return f"[{'' if self.min is None else self.min}, {'' if self.max is None else self.max}]"

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class AttributeCondition(BaseModel):
    """A test of one DICOM attribute: exactly one of equals, in, regex, range, exists."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    attribute: str
    equals: str | float | None = None
    in_: list[str | float] | None = Field(default=None, alias="in")
    regex: str | None = None
    range: NumberRange | None = None
    exists: bool | None = None

    @field_validator("attribute")
    @classmethod
    def _is_a_keyword(cls, keyword: str) -> str:
        if keyword not in keyword_dict:
            raise ValueError(
                f"{keyword!r} is not a DICOM attribute keyword (e.g. Modality, BodyPartExamined)"
            )
        return keyword

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return pattern

    @model_validator(mode="after")
    def _one_test(self) -> AttributeCondition:
        given = [
            name
            for name, value in (
                ("equals", self.equals),
                ("in", self.in_),
                ("regex", self.regex),
                ("range", self.range),
                ("exists", self.exists),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"attribute {self.attribute}: give exactly one of equals, in, regex, range, exists "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.range is not None and dictionary_VR(self.attribute) not in (
            "DS",
            "IS",
            "FL",
            "FD",
            "US",
            "UL",
            "SS",
            "SL",
        ):
            raise ValueError(f"attribute {self.attribute} is not numeric; 'range' needs a numeric attribute")
        return self

    def evaluate(self, facts: RoutingFacts) -> Verdict:
        value = facts.attributes.get(self.attribute)
        values = _values(value)
        shown = _shown(value)
        if self.exists is not None:
            holds = bool(values) == self.exists
            test = "exists" if self.exists else "is absent"
        elif self.equals is not None:
            holds = any(_same(v, self.equals) for v in values)
            test = f"equals {self.equals}"
        elif self.in_ is not None:
            holds = any(_same(v, option) for v in values for option in self.in_)
            test = f"in {list(self.in_)}"
        elif self.regex is not None:
            pattern = re.compile(self.regex)
            holds = any(pattern.search(str(v)) for v in values)
            test = f"matches /{self.regex}/"
        else:
            assert self.range is not None
            numbers = [n for n in (_number(v) for v in values) if n is not None]
            holds = any(self.range.contains(n) for n in numbers)
            test = f"in range {self.range.describe()}"
        return Verdict(holds, [f"{self.attribute} {test}: {'yes' if holds else 'no'} ({shown})"])


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(value: Any, expected: str | float) -> bool:
    if isinstance(expected, str):
        return str(value).strip() == expected
    number = _number(value)
    return number is not None and number == expected


class CallingAECondition(BaseModel):
    """The sender's calling AE title is one of these."""

    model_config = ConfigDict(extra="forbid")
    calling_ae: list[str] = Field(min_length=1)

    def evaluate(self, facts: RoutingFacts) -> Verdict:
        sender = (facts.calling_ae_title or "").strip()
        holds = sender in self.calling_ae
        return Verdict(
            holds, [f"calling AE in {self.calling_ae}: {'yes' if holds else 'no'} ({sender or 'unknown'})"]
        )


class PeerAddressCondition(BaseModel):
    """The sender's IP address is in one of these networks (CIDR) or equal to one of these addresses."""

    model_config = ConfigDict(extra="forbid")
    peer_address: list[str] = Field(min_length=1)

    @field_validator("peer_address")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not an IP address or network: {exc}") from exc
        return networks

    def evaluate(self, facts: RoutingFacts) -> Verdict:
        holds = False
        if facts.peer_address:
            try:
                address = ipaddress.ip_address(facts.peer_address)
            except ValueError:
                address = None
            if address is not None:
                holds = any(address in ipaddress.ip_network(n, strict=False) for n in self.peer_address)
        shown = facts.peer_address or "unknown"
        return Verdict(holds, [f"peer address in {self.peer_address}: {'yes' if holds else 'no'} ({shown})"])


class AllCondition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    all: list[Condition] = Field(min_length=1)

    def evaluate(self, facts: RoutingFacts) -> Verdict:
        verdicts = [condition.evaluate(facts) for condition in self.all]
        return Verdict(all(v.holds for v in verdicts), [r for v in verdicts for r in v.reasons])


class AnyCondition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    any: list[Condition] = Field(min_length=1)

    def evaluate(self, facts: RoutingFacts) -> Verdict:
        verdicts = [condition.evaluate(facts) for condition in self.any]
        holds = any(v.holds for v in verdicts)
        reasons = [r for v in verdicts for r in v.reasons]
        return Verdict(
            holds, [f"any of ({len(verdicts)}): {'yes' if holds else 'no'}", *("  " + r for r in reasons)]
        )


class NotCondition(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    not_: Condition = Field(alias="not")

    def evaluate(self, facts: RoutingFacts) -> Verdict:
        inner = self.not_.evaluate(facts)
        return Verdict(
            not inner.holds,
            [f"not: {'yes' if not inner.holds else 'no'}", *("  " + r for r in inner.reasons)],
        )


Condition = Annotated[
    AttributeCondition
    | CallingAECondition
    | PeerAddressCondition
    | AllCondition
    | AnyCondition
    | NotCondition,
    Field(union_mode="left_to_right"),
]
AllCondition.model_rebuild()
AnyCondition.model_rebuild()
NotCondition.model_rebuild()


class ProcessAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    process: str


class ForwardOriginalsAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    forward_originals: list[str] = Field(min_length=1)


class ForwardResultsAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    forward_results: list[str] = Field(min_length=1)


class DiscardAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    discard: str = Field(min_length=1, description="why; recorded on the series")


class NotifyAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    notify: str = Field(pattern=r"^https?://", description="webhook URL that receives a JSON POST")


Action = Annotated[
    ProcessAction | ForwardOriginalsAction | ForwardResultsAction | DiscardAction | NotifyAction,
    Field(union_mode="left_to_right"),
]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    description: str = ""
    enabled: bool = True
    trigger: Literal["series", "study"] = "series"
    when: Condition | None = None
    fallback: bool = False
    actions: list[Action] = Field(min_length=1)
    priority: Literal["stat", "routine", "off-peak"] = "routine"
    shadow: bool = False

    @model_validator(mode="after")
    def _when_or_fallback(self) -> Rule:
        if self.when is None and not self.fallback:
            raise ValueError(f"rule {self.name}: give 'when' conditions, or 'fallback: true'")
        if self.when is not None and self.fallback:
            raise ValueError(
                f"rule {self.name}: a fallback rule applies when nothing else matched; drop 'when'"
            )
        kinds = {type(action) for action in self.actions}
        if DiscardAction in kinds and kinds & {ProcessAction, ForwardOriginalsAction, ForwardResultsAction}:
            raise ValueError(
                f"rule {self.name}: 'discard' cannot be combined with process or forward actions"
            )
        return self


class OffPeakWindow(BaseModel):
    """Local wall-clock window for ``priority: off-peak`` work; may wrap midnight."""

    model_config = ConfigDict(extra="forbid")
    start: time
    end: time

    def contains(self, moment: time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    off_peak: OffPeakWindow = OffPeakWindow(start=time(20, 0), end=time(6, 0))
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> RuleSet:
        names = [rule.name for rule in self.rules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"rule names used more than once: {repeated}")
        if sum(rule.fallback for rule in self.rules if rule.enabled and not rule.shadow) > 1:
            raise ValueError("more than one enabled fallback rule; keep one")
        return self


class RulesError(ValueError):
    """A rules file is invalid; the message names the file and each problem."""


def load_rules(path: Path) -> RuleSet:
    """Load and validate one rules file; all problems are reported together."""
    return load_yaml_model(path, RuleSet, RulesError, what="a rules file (rules: [...])", empty=RuleSet())


def find_rules_file(profiles_dir: Path) -> Path | None:
    """The rules file next to the profiles, if there is one."""
    for name in RULES_FILE_NAMES:
        candidate = profiles_dir / name
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class RuleOutcome:
    """One rule's verdict on some facts."""

    rule: Rule
    verdict: Verdict


@dataclass(frozen=True)
class RoutingDecision:
    """Which rules apply (acted on), which only shadow-match, and the explanation for all of them."""

    applied: list[Rule]
    shadowed: list[Rule]
    outcomes: list[RuleOutcome]

    def explain(self) -> list[str]:
        lines: list[str] = []
        for outcome in self.outcomes:
            rule = outcome.rule
            state = "matches" if outcome.verdict.holds else "does not match"
            tags = [t for t in ("fallback" if rule.fallback else "", "shadow" if rule.shadow else "") if t]
            lines.append(f"{rule.name}{' [' + ', '.join(tags) + ']' if tags else ''}: {state}")
            lines.extend("  " + reason for reason in outcome.verdict.reasons)
        return lines


def evaluate_rules(rules: Sequence[Rule], facts: RoutingFacts, trigger: str | None = None) -> RoutingDecision:
    """Evaluate every enabled rule (of ``trigger`` only, when given) on ``facts``.

    All matching rules apply (a series can be processed by one profile and
    forwarded by another rule); the fallback applies only when no other
    non-shadow rule matched.  Shadow rules are evaluated and reported but never applied.
    """
    outcomes: list[RuleOutcome] = []
    applied: list[Rule] = []
    shadowed: list[Rule] = []
    candidates = [rule for rule in rules if rule.enabled and trigger in (None, rule.trigger)]
    for rule in candidates:
        if rule.fallback:
            continue
        assert rule.when is not None
        verdict = rule.when.evaluate(facts)
        outcomes.append(RuleOutcome(rule, verdict))
        if verdict.holds:
            (shadowed if rule.shadow else applied).append(rule)
    for rule in candidates:
        if rule.fallback:
            holds = not applied
            reason = "no other rule matched" if holds else "another rule matched"
            outcomes.append(RuleOutcome(rule, Verdict(holds, [reason])))
            if holds:
                (shadowed if rule.shadow else applied).append(rule)
    return RoutingDecision(applied=applied, shadowed=shadowed, outcomes=outcomes)


def facts_from_dataset(
    dataset: Dataset, *, calling_ae_title: str | None = None, peer_address: str | None = None
) -> RoutingFacts:
    """Routing facts from one instance's header (sequences and bulk data are left out)."""
    attributes: dict[str, Any] = {}
    for element in dataset:
        if not element.keyword or element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            continue
        value = element.value
        if isinstance(value, MultiValue):
            attributes[element.keyword] = [_plain(v) for v in value]
        else:
            attributes[element.keyword] = _plain(value)
    return RoutingFacts(attributes, calling_ae_title=calling_ae_title, peer_address=peer_address)


def _plain(value: Any) -> Any:
    if isinstance(value, int | float):
        return value
    return "" if value is None else str(value)
