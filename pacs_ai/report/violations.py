"""What a guardrail check reports: :class:`Violation` records and the :class:`GuardrailResult` of a draft.

Kept apart from :mod:`pacs_ai.report.guardrails` so the checks of analyzer
evidence and of findings text (:mod:`pacs_ai.report.consistency`) share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Check = Literal[
    "format",
    "numbers",
    "laterality",
    "negation",
    "unsupported",
    "detections",
    "location",
    "severity",
    "certainty",
    "time",
]


@dataclass(frozen=True)
class Violation:
    check: Check
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


@dataclass(frozen=True)
class GuardrailResult:
    violations: tuple[Violation, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def reason(self) -> str | None:
        """All violations in one line, or None when the draft passed."""
        return "; ".join(str(v) for v in self.violations) or None

    def checks_failed(self) -> set[str]:
        return {v.check for v in self.violations}
