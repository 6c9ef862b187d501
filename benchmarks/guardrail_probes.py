"""Guardrail catch rate and false-alarm rate per category, on the probe set and on edited IU X-ray reports.

1. The probe set of the tests (``tests/report_probes.py``: findings ->
   impression pairs in the style of IU X-ray reports, faithful ones and ones
   edited to contradict or go beyond their findings).
2. Where the IU X-ray reports are on the machine (the torchxrayvision wheel,
   see ``benchmarks/impressions.py``): the held-out reports' own impressions
   (faithful by definition: their false-alarm rate is the checker's noise
   floor against real radiologists' writing) and the same controlled edits
   applied to them (``tests/iu_probes.py``, built at run time: the reports'
   licence allows no derivatives in the repository): sides swapped, a "No X"
   turned into "X", small/mild turned into large, stable into new, hedges
   removed, an acute finding the findings do not mention appended.  Edits
   that leave the impression faithful or are not about the chest are skipped
   and counted by reason.  The radiologists' impressions are reported as
   "flagged", not as false alarms: they say things their findings do not
   (an audit of 40 flagged ones found 15 false alarms of the checker, 3 of
   them since fixed, and 25 impressions going beyond or against their
   findings).
3. The matched probe set built from the same reports' findings
   (``tests/iu_probes.py``, :func:`matched_probes`): an impression made of
   the findings' own sentences with meaning-preserving edits (faithful by
   construction) and the same impression with each unfaithful edit, per
   category.  ``tests/unit/test_iu_probes.py`` asserts the rates.

    PYTHONPATH=. .venv/bin/python benchmarks/guardrail_probes.py [--wheel-dir DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from benchmarks.impressions import held_out, read_reports, wheel_dirs, wheel_path
from pacs_ai.report.consistency import check_against_findings
from tests.iu_probes import iu_probes, matched_probes
from tests.report_probes import Probe, probe_set


def rates(probes: list[Probe]) -> dict[str, tuple[int, int, int, int]]:
    """category -> (unfaithful caught, unfaithful, faithful flagged, faithful)."""
    counts: dict[str, Counter[str]] = {}
    for probe in probes:
        flagged = bool(check_against_findings(probe.impression, probe.findings))
        row = counts.setdefault(probe.category, Counter())
        if probe.unfaithful:
            row["unfaithful"] += 1
            row["caught"] += flagged
        else:
            row["faithful"] += 1
            row["false_alarms"] += flagged
    return {
        k: (v["caught"], v["unfaithful"], v["false_alarms"], v["faithful"]) for k, v in sorted(counts.items())
    }


def show(title: str, table: dict[str, tuple[int, int, int, int]]) -> None:
    print(title)
    print(f"  {'category':<12} {'caught':>14} {'false alarms':>16}")
    totals = [0, 0, 0, 0]
    for category, (caught, unfaithful, false_alarms, faithful) in table.items():
        totals = [a + b for a, b in zip(totals, (caught, unfaithful, false_alarms, faithful), strict=True)]
        caught_text = f"{caught}/{unfaithful} {caught / unfaithful:6.1%}" if unfaithful else "-"
        false_text = f"{false_alarms}/{faithful} {false_alarms / faithful:6.1%}" if faithful else "-"
        print(f"  {category:<12} {caught_text:>14} {false_text:>16}")
    caught, unfaithful, false_alarms, faithful = totals
    print(
        f"  {'all':<12} {f'{caught}/{unfaithful} {caught / max(unfaithful, 1):6.1%}':>14} "
        f"{f'{false_alarms}/{faithful} {false_alarms / max(faithful, 1):6.1%}':>16}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        default=None,
        help="folder of the torchxrayvision wheel (default: WHEEL_DIRS)",
    )
    parser.add_argument("--test-percent", type=int, default=20)
    parser.add_argument("--limit", type=int, default=0, help="only the first N held-out IU X-ray reports")
    args = parser.parse_args(argv)

    probes = probe_set()
    show(f"probe set ({len(probes)} pairs)", rates(probes))
    wheel = wheel_path(args.wheel_dir)
    if wheel is None:
        where = " or ".join(str(d) for d in wheel_dirs(args.wheel_dir))
        print(f"IU X-ray reports: no torchxrayvision wheel in {where}; skipped")
        return 0
    reports = [r for r in read_reports(wheel) if held_out(r, args.test_percent)]
    if args.limit:
        reports = reports[: args.limit]
    skipped: Counter[str] = Counter()
    edited = [p for r in reports for p in iu_probes(r.findings, r.impression, skipped)]
    show(f"IU X-ray held-out reports ({len(reports)}) and their edits ({len(edited)} pairs)", rates(edited))
    print("  edits skipped (not unfaithful, or not about the chest; see tests/iu_probes.py):")
    for reason, count in sorted(skipped.items()):
        print(f"    {reason:<28} {count:>4}")
    print(
        "  ('radiologist' counts impressions flagged, not false alarms: they may say what their findings do"
        " not. Audit of 40 flagged (2026-12-07): 25 go beyond or against their findings, 15 are checker"
        " false alarms, 3 of those since fixed: about 6% of all impressions are false alarms)"
    )
    matched_skipped: Counter[str] = Counter()
    matched = [p for i, r in enumerate(reports) for p in matched_probes(r.findings, i % 2, matched_skipped)]
    show(
        f"matched probe set from the same reports' findings ({len(matched) // 2} pairs; "
        "a faithful impression counts once per category it was edited in)",
        rates(matched),
    )
    print("  edits skipped:")
    for reason, count in sorted(matched_skipped.items()):
        print(f"    {reason:<28} {count:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
