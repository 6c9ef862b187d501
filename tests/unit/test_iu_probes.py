"""The guardrails on controlled edits of the real IU X-ray reports (built at run time from the wheel's data).

The reports (CC BY-NC-ND 4.0) are not in the repository: ``scripts/bootstrap``
fetches the torchxrayvision wheel that holds them into
``.venv/share/pacs-ai-data/`` (see :mod:`benchmarks.impressions`), and
:mod:`tests.iu_probes` edits the held-out reports' impressions here.  Without
the wheel the tests are skipped, saying so.
"""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.impressions import Report, held_out, read_reports, wheel_dirs, wheel_path
from pacs_ai.report.consistency import check_against_findings
from tests.iu_probes import faithful_impression, iu_probes, matched_probes
from tests.report_probes import Probe

#: Target of issue 22: at least 98% of the unfaithful edits caught over all categories.
CATCH_TARGET = 0.98
#: Every category must stay at or above this (laterality, negation and severity are at 95-97.4%).
CATEGORY_FLOOR = 0.95
#: The radiologists' own impressions flagged: 18.2% (mostly statements their findings do not make: an
#: audit of 40 flagged ones found 25 going beyond or against their findings, 15 checker false alarms).
#: They are not faithful to their findings by construction; this bound keeps the figure from growing.
RADIOLOGIST_FALSE_ALARMS = 0.20
#: Issue 22's targets, on the matched probe set built from the reports' findings (tests/iu_probes.py).
MATCHED_CATCH_TARGET = 0.98
MATCHED_FALSE_ALARM_TARGET = 0.03
#: Per category of the matched set, issue 22's 98% (at 2026-12-07: certainty 16/16, laterality 163/163,
#: negation 282/282, severity 75/75, time 103/103; 13/18, 154/163, 276/282, 72/75, 100/103 before the
#: checks of phrases outside the vocabulary, with 2 certainty edits since skipped as still hedged).
MATCHED_CATEGORY_FLOOR = 0.98
CATEGORIES = {"laterality", "severity", "time", "certainty", "negation", "unsupported"}


@pytest.fixture(scope="module")
def reports() -> list[Report]:
    wheel = wheel_path()
    if wheel is None:
        pytest.skip(
            "IU X-ray reports absent: no torchxrayvision wheel in "
            + " or ".join(str(d) for d in wheel_dirs())
            + " (scripts/bootstrap fetches it)"
        )
    return [r for r in read_reports(wheel) if held_out(r, 20)]


@pytest.fixture(scope="module")
def probes(reports: list[Report]) -> list[Probe]:
    return [p for r in reports for p in iu_probes(r.findings, r.impression)]


def test_the_matched_probe_set_meets_the_targets(reports: list[Report]) -> None:
    """Faithful impressions built from the findings' own sentences, and the same ones edited."""
    probes = [p for i, r in enumerate(reports) for p in matched_probes(r.findings, i % 2)]
    counts: dict[str, Counter[str]] = {}
    missed, false_alarms = [], []
    for probe in probes:
        flagged = bool(check_against_findings(probe.impression, probe.findings))
        row = counts.setdefault(probe.category, Counter())
        row["unfaithful" if probe.unfaithful else "faithful"] += 1
        if probe.unfaithful and flagged:
            row["caught"] += 1
        elif probe.unfaithful:
            missed.append((probe.category, probe.impression))
        elif flagged:
            row["false alarms"] += 1
            false_alarms.append(probe.impression)
    assert set(counts) == CATEGORIES
    pairs = sum(row["unfaithful"] for row in counts.values())
    assert pairs >= 300
    assert sum(row["caught"] for row in counts.values()) / pairs >= MATCHED_CATCH_TARGET, missed
    assert sum(row["false alarms"] for row in counts.values()) / pairs <= MATCHED_FALSE_ALARM_TARGET, (
        false_alarms
    )
    for category, row in counts.items():
        assert row["caught"] / row["unfaithful"] >= MATCHED_CATEGORY_FLOOR, (category, missed)
        assert row["false alarms"] / row["faithful"] <= MATCHED_FALSE_ALARM_TARGET, (category, false_alarms)


def test_the_edits_of_real_reports_are_caught(probes: list[Probe]) -> None:
    caught: Counter[str] = Counter()
    total: Counter[str] = Counter()
    missed = []
    for probe in probes:
        if not probe.unfaithful:
            continue
        flagged = bool(check_against_findings(probe.impression, probe.findings))
        total[probe.category] += 1
        caught[probe.category] += flagged
        if not flagged:
            missed.append((probe.category, probe.impression))
    assert set(total) == CATEGORIES
    assert sum(total.values()) >= 300
    assert sum(caught.values()) / sum(total.values()) >= CATCH_TARGET, missed
    for category, count in total.items():
        assert caught[category] / count >= CATEGORY_FLOOR, (category, missed)


def test_the_radiologists_own_impressions_are_rarely_flagged(probes: list[Probe]) -> None:
    faithful = [p for p in probes if not p.unfaithful]
    flagged = [p.impression for p in faithful if check_against_findings(p.impression, p.findings)]
    assert len(faithful) >= 300
    assert len(flagged) / len(faithful) <= RADIOLOGIST_FALSE_ALARMS, flagged[:20]


def test_edits_that_keep_the_meaning_are_skipped_not_counted() -> None:
    skipped: Counter[str] = Counter()
    findings = "Left and right knees. No fracture."
    made = list(iu_probes(findings, "Left and right knees negative.", skipped))
    assert [p.category for p in made if p.unfaithful] == ["unsupported"]
    assert skipped == {"laterality: both sides": 1}
    made = list(iu_probes("Stable old rib fracture.", "No old rib fracture is seen.", skipped))
    assert "time" not in {p.category for p in made}
    assert skipped["time: ruled out"] == 1
    # Removing the first hedge leaves another: still two readings, nothing stated as certain.
    made = list(
        iu_probes(
            "Possible opacity at the right apex.",
            "Possible opacity at the right apex versus technique.",
            skipped,
        )
    )
    assert "certainty" not in {p.category for p in made}
    assert skipped["certainty: still hedged"] == 1
    made = list(
        iu_probes("Probable scarring at the right apex.", "Probable scarring at the right apex.", skipped)
    )
    assert [p.impression for p in made if p.category == "certainty"] == ["scarring at the right apex."]
    made = list(iu_probes("Small right effusion.", "Small right effusion", skipped))
    sides = [p.impression for p in made if p.category == "laterality"]
    assert sides == ["Small left effusion"]
    assert [p.impression for p in made if p.category == "unsupported"] == [
        "Small right effusion. Aortic dissection."
    ]


def test_a_faithful_impression_is_built_from_the_findings_own_sentences() -> None:
    findings = (
        "The heart is normal in size. There is no pneumothorax. "
        "Small right pleural effusion measuring 1.5 cm. "
        "The lungs are clear otherwise. No pleural thickening is seen."
    )
    # The last normal sentence is dropped; "There is no X" -> "No X"; "is seen" dropped after "No X".
    assert faithful_impression(findings, 0) == (
        "Normal heart size. No pneumothorax. Small right pleural effusion measuring 1.5 cm. "
        "The lungs are clear otherwise."
    )
    assert faithful_impression(findings, 1) == (
        "Small right pleural effusion measuring 1.5 cm. Normal heart size. No pneumothorax. "
        "The lungs are clear otherwise."
    )
    made = list(matched_probes(findings, 1))
    assert {p.category for p in made} == {"laterality", "severity", "negation", "unsupported"}
    # Each category: the faithful impression, then the same impression edited.
    assert [p.unfaithful for p in made] == [False, True] * 4
    edited = {p.category: p.impression for p in made if p.unfaithful}
    assert edited["severity"].startswith("large right pleural effusion")
    assert "Pneumothorax. The lungs" in edited["negation"]
    for probe in made:
        assert bool(check_against_findings(probe.impression, probe.findings)) == probe.unfaithful, probe


def test_a_time_edit_takes_a_finding_not_a_normal_structure() -> None:
    made = list(matched_probes("The mediastinum is stable. Stable left basilar scarring.", 0))
    assert [p.impression for p in made if p.category == "time" and p.unfaithful] == [
        "The mediastinum is stable. new left basilar scarring."
    ]
