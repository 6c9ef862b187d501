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

from benchmarks.impressions import held_out, read_reports, wheel_dirs, wheel_path
from pacs_ai.report.consistency import check_against_findings
from tests.iu_probes import iu_probes
from tests.report_probes import Probe

#: Target of issue 22: at least 98% of the unfaithful edits caught over all categories.
CATCH_TARGET = 0.98
#: Every category must stay at or above this (laterality, negation and severity are at 95-97.4%).
CATEGORY_FLOOR = 0.95
#: The radiologists' own impressions flagged: 19.1% (mostly statements their findings do not make).
#: The 3% target is not met on real reports; this bound keeps it from growing.
RADIOLOGIST_FALSE_ALARMS = 0.20
CATEGORIES = {"laterality", "severity", "time", "certainty", "negation", "unsupported"}


@pytest.fixture(scope="module")
def probes() -> list[Probe]:
    wheel = wheel_path()
    if wheel is None:
        pytest.skip(
            "IU X-ray reports absent: no torchxrayvision wheel in "
            + " or ".join(str(d) for d in wheel_dirs())
            + " (scripts/bootstrap fetches it)"
        )
    reports = [r for r in read_reports(wheel) if held_out(r, 20)]
    return [p for r in reports for p in iu_probes(r.findings, r.impression)]


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
    made = list(iu_probes("Small right effusion.", "Small right effusion", skipped))
    sides = [p.impression for p in made if p.category == "laterality"]
    assert sides == ["Small left effusion"]
    assert [p.impression for p in made if p.category == "unsupported"] == [
        "Small right effusion. Aortic dissection."
    ]
