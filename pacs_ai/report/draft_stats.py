"""How AI drafts fare in use: per drafter and model, what radiologists did with them.

For every (requested drafter, backend that wrote the kept text, model) of the
report drafts in the index: how many were signed unchanged, signed after
edits, rejected, are still open or were superseded; the share of each among
the decided drafts; the edit distance between what the drafter wrote and what
was signed (Levenshtein over findings and impression, with rapidfuzz: the
characters changed, and the same divided by the longer text's length); and
how often the drafter's own text failed and the template's was kept
(guardrail fallbacks).  Shown by ``pacs-ai drafts stats`` and read by the
worklist's admin page.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from rapidfuzz.distance import Levenshtein
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.reports import ReportDraft, ReportStatus


@dataclass
class DrafterStats:
    drafter: str
    backend: str
    model: str
    drafts: int = 0
    signed_unchanged: int = 0
    signed_edited: int = 0
    rejected: int = 0
    open: int = 0
    superseded: int = 0
    guardrail_fallbacks: int = 0
    edit_distances: list[int] = field(default_factory=list, repr=False)
    edit_ratios: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        decided = self.signed_unchanged + self.signed_edited + self.rejected
        row = {k: v for k, v in asdict(self).items() if k not in ("edit_distances", "edit_ratios")}

        def share(count: int, total: int) -> float | None:
            return round(count / total, 4) if total else None

        row.update(
            decided=decided,
            share_signed_unchanged=share(self.signed_unchanged, decided),
            share_signed_edited=share(self.signed_edited, decided),
            share_rejected=share(self.rejected, decided),
            share_guardrail_fallbacks=share(self.guardrail_fallbacks, self.drafts),
            edit_distance_mean=round(statistics.fmean(self.edit_distances), 1)
            if self.edit_distances
            else None,
            edit_distance_median=statistics.median(self.edit_distances) if self.edit_distances else None,
            edit_ratio_mean=round(statistics.fmean(self.edit_ratios), 4) if self.edit_ratios else None,
        )
        return row


def _text(findings: str | None, impression: str | None) -> str:
    return f"{(findings or '').strip()}\n{(impression or '').strip()}"


def draft_stats(session: Session) -> list[dict[str, Any]]:
    """One row per (drafter, backend, model), sorted by drafter and model (see the module docstring)."""
    groups: dict[tuple[str, str, str], DrafterStats] = {}
    counters: dict[ReportStatus, str] = defaultdict(
        str,
        {
            ReportStatus.REJECTED: "rejected",
            ReportStatus.DRAFT: "open",
            ReportStatus.SUPERSEDED: "superseded",
        },
    )
    for draft in session.scalars(select(ReportDraft)):
        requested = (draft.guardrail or {}).get("requested_backend") or draft.backend
        key = (str(requested), draft.backend, draft.model)
        stats = groups.setdefault(key, DrafterStats(*key))
        stats.drafts += 1
        stats.guardrail_fallbacks += draft.fallback_reason is not None
        if draft.status == ReportStatus.ACCEPTED:
            written = _text(draft.findings_text, draft.impression_text)
            signed = _text(draft.signed_findings_text, draft.signed_impression_text)
            stats.edit_distances.append(Levenshtein.distance(written, signed))
            stats.edit_ratios.append(Levenshtein.normalized_distance(written, signed))
            if draft.edited:
                stats.signed_edited += 1
            else:
                stats.signed_unchanged += 1
        elif counters[draft.status]:
            name = counters[draft.status]
            setattr(stats, name, getattr(stats, name) + 1)
    return [groups[key].to_dict() for key in sorted(groups)]
