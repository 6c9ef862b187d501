"""The guardrails on the probe set: at least 98% of unfaithful impressions caught, at most 3% false alarms."""

from __future__ import annotations

from collections import Counter

from pacs_ai.report.consistency import check_against_findings
from tests.report_probes import probe_set


def test_the_probe_set_meets_the_catch_and_false_alarm_targets():
    probes = probe_set()
    assert len(probes) >= 300
    caught: Counter[str] = Counter()
    unfaithful: Counter[str] = Counter()
    false_alarms, faithful, missed, wrongly_flagged = 0, 0, [], []
    for probe in probes:
        flagged = bool(check_against_findings(probe.impression, probe.findings))
        if probe.unfaithful:
            unfaithful[probe.category] += 1
            caught[probe.category] += flagged
            if not flagged:
                missed.append((probe.category, probe.findings, probe.impression))
        else:
            faithful += 1
            false_alarms += flagged
            if flagged:
                wrongly_flagged.append((probe.category, probe.findings, probe.impression))
    expected = {
        "negation",
        "laterality",
        "location",
        "severity",
        "numbers",
        "certainty",
        "time",
        "unsupported",
    }
    assert expected <= set(unfaithful)
    for category, total in unfaithful.items():
        assert caught[category] / total >= 0.98, (category, missed)
    assert faithful >= 100
    assert false_alarms / faithful <= 0.03, wrongly_flagged
