"""Processing profiles: which series go to which analyzer, and where results go.

A profile is a YAML file in ``dicom_profiles/``::

    name: ct-chest-lungs
    description: Lung segmentation and densitometry for chest CT
    match:
      modality: [CT]
      sop_class_uid: ["1.2.840.10008.5.1.4.1.1.2"]
      min_instances: 20
      any:                       # at least one of these must hold
        - body_part_examined: [CHEST, THORAX, LUNG]
        - series_description: "(?i)chest|thorax|lung"
    analyzers:
      - name: ct-chest-lung
        params: {}
        timeout_seconds: 600     # optional; else the analysis_timeout_seconds setting
        priority:                # optional; findings that raise the study's reading priority
          - finding: "36118008"  # code value or code meaning (case-insensitive)
            above: 0.8           # probability strictly above this
            set: STAT            # STAT | URGENT | ROUTINE
    destinations: [pacs]
    quiet_period_seconds: 3      # optional; overrides the global setting
    report:                      # optional; the AI report draft of studies this profile analyses
      backend: template          # template (default) | transformers | openai; "report: false" drafts none
      params: {}

Matching is a pure function of a :class:`SeriesFacts`; each failed criterion
yields a reason, so "why did my series not run?" always has an answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacs_ai.analyze.registry import UnknownAnalyzerError, get_analyzer
from pacs_ai.config import Settings
from pacs_ai.index.models import StudyPriority
from pacs_ai.report.drafters import DrafterConfig, DrafterConfigError, get_drafter
from pacs_ai.yaml_files import load_yaml_model


@dataclass(frozen=True)
class SeriesFacts:
    """What the router knows about a series when it decides."""

    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    sop_class_uid: str | None
    image_type: str | None  # backslash-separated, as in DICOM
    slice_thickness: float | None
    instance_count: int


class NumberRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Criteria(BaseModel):
    """Conditions on a series; all given conditions must hold (``any`` is one of them)."""

    model_config = ConfigDict(extra="forbid")

    modality: list[str] | None = None
    body_part_examined: list[str] | None = None
    series_description: str | None = Field(default=None, description="regular expression, searched")
    sop_class_uid: list[str] | None = None
    image_type_includes: list[str] | None = None
    slice_thickness: NumberRange | None = None
    min_instances: int | None = Field(default=None, ge=1)
    max_instances: int | None = Field(default=None, ge=1)
    any: list[Criteria] | None = None

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"series_description is not a valid regular expression: {exc}") from exc
        return pattern

    def mismatches(self, facts: SeriesFacts, *, count_instances: bool = True) -> list[str]:
        """Reasons this series fails the criteria; empty means it matches.

        ``count_instances=False`` leaves out ``min_instances`` and ``max_instances``: for a series
        still arriving, whose count says nothing yet (see :mod:`pacs_ai.route.prefetch`).
        """
        reasons: list[str] = []

        def one_of(name: str, value: str | None, allowed: list[str] | None) -> None:
            if allowed is None:
                return
            if value is None:
                reasons.append(f"{name} is missing (expected one of {allowed})")
            elif value.strip().upper() not in {item.upper() for item in allowed}:
                reasons.append(f"{name} {value!r} is not one of {allowed}")

        one_of("Modality", facts.modality, self.modality)
        one_of("BodyPartExamined", facts.body_part_examined, self.body_part_examined)
        if self.sop_class_uid is not None and facts.sop_class_uid not in self.sop_class_uid:
            reasons.append(f"SOP Class {facts.sop_class_uid} is not one of {self.sop_class_uid}")
        if self.series_description is not None and not re.search(
            self.series_description, facts.series_description or ""
        ):
            reasons.append(
                f"SeriesDescription {facts.series_description!r} does not match /{self.series_description}/"
            )
        if self.image_type_includes is not None:
            present = {part.strip().upper() for part in (facts.image_type or "").split("\\")}
            missing = [part for part in self.image_type_includes if part.upper() not in present]
            if missing:
                reasons.append(f"ImageType {facts.image_type!r} lacks {missing}")
        if self.slice_thickness is not None:
            if facts.slice_thickness is None:
                reasons.append("SliceThickness is missing")
            elif not self.slice_thickness.contains(facts.slice_thickness):
                reasons.append(f"SliceThickness {facts.slice_thickness} outside {self.slice_thickness}")
        if count_instances and self.min_instances is not None and facts.instance_count < self.min_instances:
            reasons.append(f"{facts.instance_count} instances, fewer than {self.min_instances}")
        if count_instances and self.max_instances is not None and facts.instance_count > self.max_instances:
            reasons.append(f"{facts.instance_count} instances, more than {self.max_instances}")
        if self.any is not None:
            alternatives = [
                alternative.mismatches(facts, count_instances=count_instances) for alternative in self.any
            ]
            if all(alternatives):
                reasons.append("none of: " + " | ".join("; ".join(reason) for reason in alternatives))
        return reasons


class PriorityRule(BaseModel):
    """Raise the study's reading priority to ``set`` when a finding's probability exceeds ``above``.

    ``finding`` names the finding by code value (``"36118008"``) or code
    meaning (``"Pneumothorax"``, case-insensitive), as the analyzer reports it.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    finding: str = Field(min_length=1)
    #: Fires when the probability is strictly above this; 1 could never fire, so it is refused.
    above: float = Field(ge=0, lt=1)
    level: StudyPriority = Field(alias="set")

    @field_validator("finding")
    @classmethod
    def _not_blank(cls, finding: str) -> str:
        if not finding.strip():
            raise ValueError('finding must name a code value or code meaning, e.g. "36118008"')
        return finding.strip()

    @field_validator("level", mode="before")
    @classmethod
    def _upper_case(cls, level: object) -> object:
        return level.strip().upper() if isinstance(level, str) else level

    def matches(self, value: str, meaning: str) -> bool:
        """True when this rule names the finding with code ``value`` and ``meaning``."""
        return self.finding == value or self.finding.casefold() == meaning.casefold()


class AnalyzerStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: Celery queue: "cpu" for built-in analyzers, "gpu" for models that want one.
    queue: str = "cpu"
    #: Time limit of one run in seconds; None uses the ``analysis_timeout_seconds`` setting.
    timeout_seconds: float | None = Field(default=None, gt=0)
    #: Rules raising the study's reading priority from this step's findings, in order.
    priority: list[PriorityRule] = Field(default_factory=list)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    description: str = ""
    enabled: bool = True
    match: Criteria
    analyzers: list[AnalyzerStep] = Field(min_length=1)
    destinations: list[str] = Field(default_factory=list)
    quiet_period_seconds: float | None = Field(default=None, ge=0)
    #: How the study's AI report draft is written; None (``report: false``) drafts none.  A profile
    #: without ``report`` drafts with the template backend, which needs no model.
    report: DrafterConfig | None = Field(default_factory=DrafterConfig)

    @field_validator("report", mode="before")
    @classmethod
    def _report_switch(cls, value: object) -> object:
        """``report: false`` (or null) turns drafting off; ``report: true`` is the default (template)."""
        if value is False:
            return None
        if value is True:
            return {}
        return value

    @field_validator("report")
    @classmethod
    def _drafter_is_usable(cls, config: DrafterConfig | None) -> DrafterConfig | None:
        """Build the drafter once (no model is loaded) so a wrong backend name or parameter fails here."""
        if config is not None:
            try:
                get_drafter(config.backend, config.params)
            except DrafterConfigError as exc:
                raise ValueError(str(exc)) from None
        return config

    @property
    def drafts_reports(self) -> bool:
        """True when studies analysed by this profile get an AI report draft."""
        return self.report is not None


def analyzer_problems(profile: Profile, settings: Settings) -> list[str]:
    """Problems of the profile's analyzer steps that need the installation to see.

    An analyzer that can check its parameters without running
    (``parameter_problems(params, settings)``, e.g. ``monai-bundle``: the model is
    registered, its labels exist and are coded) is asked; unknown analyzers
    are reported.  Nothing is loaded or run.
    """
    problems: list[str] = []
    for step in profile.analyzers:
        try:
            analyzer = get_analyzer(step.name)
        except UnknownAnalyzerError as exc:
            problems.append(f"{profile.name}: {exc}")
            continue
        check = getattr(analyzer, "parameter_problems", None)
        if check is not None:
            found = check(step.params, settings)
            problems += [f"{profile.name}: analyzer {step.name}: {problem}" for problem in found]
    return problems


class ProfileError(ValueError):
    """A profile file is invalid; the message names the file and the problem."""


def load_profile(path: Path) -> Profile:
    """One profile file, validated; :class:`ProfileError` names the file and every problem."""
    return load_yaml_model(path, Profile, ProfileError, what="a profile")


def load_profiles(directory: Path) -> list[Profile]:
    """Load every ``*.yaml``/``*.yml`` in ``directory``; all errors are reported together."""
    if not directory.is_dir():
        raise ProfileError(f"profiles directory {directory} does not exist (set PACS_AI_PROFILES_DIR)")
    profiles: list[Profile] = []
    errors: list[str] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        if path.name in ("rules.yaml", "rules.yml"):
            continue  # the routing rules live next to the profiles (pacs_ai.route.rules)
        try:
            profiles.append(load_profile(path))
        except ProfileError as exc:
            errors.append(str(exc))
    names = [profile.name for profile in profiles]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        errors.append(f"{directory}: profile names used more than once: {duplicates}")
    if errors:
        raise ProfileError("\n".join(errors))
    return profiles


@dataclass(frozen=True)
class MatchDecision:
    matched: list[Profile]
    #: profile name -> why it did not match
    rejected: dict[str, list[str]]

    def explain(self) -> str:
        if self.matched:
            return "matched " + ", ".join(profile.name for profile in self.matched)
        if not self.rejected:
            return "no profiles are configured"
        return "no profile matched: " + "; ".join(
            f"{name}: {', '.join(reasons)}" for name, reasons in self.rejected.items()
        )


def match_profiles(profiles: Sequence[Profile], facts: SeriesFacts) -> MatchDecision:
    matched: list[Profile] = []
    rejected: dict[str, list[str]] = {}
    for profile in profiles:
        if not profile.enabled:
            rejected[profile.name] = ["profile is disabled"]
            continue
        reasons = profile.match.mismatches(facts)
        if reasons:
            rejected[profile.name] = reasons
        else:
            matched.append(profile)
    return MatchDecision(matched=matched, rejected=rejected)
