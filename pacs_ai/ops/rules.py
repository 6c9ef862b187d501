"""The routing rules tester: which rules a study's series match, and why (``pacs-ai rules test``, admin).

Nothing is changed or sent: each series' facts (from one of its instances'
header, with the calling AE title it came from) are run through the rules as
the router runs them, series- and study-triggered rules together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_ai.index.models import Instance, Series, Study
from pacs_ai.route.rules import RoutingFacts, RuleSet, evaluate_rules, facts_from_dataset
from pacs_ai.storage.files import HostFiles

__all__ = ["SeriesSample", "samples_from_index", "explain_rules"]


@dataclass(frozen=True)
class SeriesSample:
    """One series to test: its UID and the facts of one of its instances."""

    series_instance_uid: str
    facts: RoutingFacts


def samples_from_index(
    session: Session, files: HostFiles, study: str, peer_address: str | None = None
) -> list[SeriesSample]:
    """One sample per series of the study (by UID or accession number) that still has an instance file."""
    found = session.scalar(
        select(Study)
        .where((Study.study_instance_uid == study) | (Study.accession_number == study))
        .order_by(Study.id)
        .limit(1)
    )
    if found is None:
        return []
    samples: list[SeriesSample] = []
    for series in session.scalars(select(Series).where(Series.study_fk == found.id).order_by(Series.id)):
        key = session.scalar(
            select(Instance.path)
            .where(Instance.series_fk == series.id, Instance.purged_at.is_(None))
            .limit(1)
        )
        if key is None:
            continue
        header = pydicom.dcmread(files.local_path(key), stop_before_pixels=True)
        samples.append(
            SeriesSample(
                series.series_instance_uid,
                facts_from_dataset(
                    header, calling_ae_title=series.calling_ae_title, peer_address=peer_address
                ),
            )
        )
    return samples


def explain_rules(rules: RuleSet, samples: list[SeriesSample]) -> list[dict[str, Any]]:
    """Per series: the rules that would apply, the shadow rules that would, and the explanation lines."""
    report: list[dict[str, Any]] = []
    for sample in samples:
        # As the router does: series- and study-triggered rules together, on each series.
        decision = evaluate_rules(rules.rules, sample.facts)
        report.append(
            {
                "series_instance_uid": sample.series_instance_uid,
                "applied": [rule.name for rule in decision.applied],
                "shadow": [rule.name for rule in decision.shadowed],
                "explanation": decision.explain(),
            }
        )
    return report
