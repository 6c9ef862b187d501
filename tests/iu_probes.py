"""Controlled edits of real IU X-ray reports, built at run time: the guardrails' probe set on real text.

The IU X-ray reports (CC BY-NC-ND 4.0) are read from the torchxrayvision wheel
(:mod:`benchmarks.impressions`); neither they nor their edits are in the
repository.  Each report gives its radiologist's impression (faithful by
definition) and these edits of it, each unfaithful to the findings:

* laterality: every left and right swapped;
* severity: the first small/mild/minimal/tiny/trace made "large";
* time: the first stable/unchanged/chronic/old/healed made "new";
* certainty: the first hedge (possible, likely, suspicious for, ...) removed;
* negation: a leading "No X." turned into "X.";
* unsupported: an acute finding the findings do not mention appended as a sentence of its own.

An edit is skipped, and counted under its reason (:data:`SKIP_REASONS`), when
it does not make the impression unfaithful or is not about the chest:

* ``both sides``: the sides the swap changes are a pair ("Left and right knees
  negative" -> "Right and left knees negative"), so the sentence states the
  same sides after it (a swap of "right greater than left" is not skipped);
* ``other exam``: every side word the swap changes names an extremity examined
  in the same report ("Right foot. Negative."); the guardrails' vocabulary is
  that of the chest;
* ``ruled out`` (time): the word is inside a negation ("no old fracture" ->
  "no new fracture" still rules the fracture out);
* ``conditional`` (time, severity, certainty): the word is in a condition or
  a question ("to determine if this is a chronic appearance"), not in a
  statement about the patient.

Skips are printed beside the rates by ``benchmarks/guardrail_probes.py``, so
the denominators stay visible.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from tests.report_probes import Probe

#: Additions for the "unsupported" edit, each new unless the findings have its last word's stem.
ADDED = ("Aortic dissection.", "Pulmonary embolism.", "Small left pneumothorax.", "Metastatic disease.")
EDITS: tuple[tuple[str, str, str], ...] = (
    ("laterality", r"\b(left|right)\b", "side"),
    ("severity", r"\b(small|mild|minimal|tiny|trace)\b", "large"),
    ("time", r"\b(stable|unchanged|chronic|old|healed)\b", "new"),
    (
        "certainty",
        r"\b(possible|possibly|probable|likely|may represent|suspicious for|concerning for)\s+",
        "",
    ),
)
SKIP_REASONS = ("both sides", "other exam", "ruled out", "conditional")
#: A side naming an extremity, the body part of an examination other than the chest ("right foot").
OTHER_EXAM = re.compile(
    r"\b(?:left|right)\s+(?:elbows?|forearms?|wrists?|hands?|fingers?|thumbs?|knees?|ankles?|foot|feet|"
    r"toes?|legs?|hips?|femur|tibia|fibula)\b",
    re.IGNORECASE,
)
#: Both sides named as a pair: the same sides whichever comes first.
SIDE_PAIR = re.compile(r"\b(?:left|right)\s+(?:and|or|&)\s+(?:left|right)\b", re.IGNORECASE)
SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
#: A negation at most two words before the end of the text ("no old", "without chronic").
NEGATED_BEFORE = re.compile(r"\b(no|not|without)\b(\W+\w+){0,2}\W+$", re.IGNORECASE)
CONDITIONAL = re.compile(r"\b(if|whether)\b|\?", re.IGNORECASE)
SENTENCE = re.compile(r"[^.?!]*(?:[.?!]+|$)")


def _sentence_start(text: str, position: int) -> int:
    """Where the sentence of ``text`` that holds character ``position`` starts."""
    starts = [m.start() for m in SENTENCE.finditer(text) if m.start() <= position]
    return starts[-1] if starts else 0


def _side_skip(impression: str) -> str | None:
    if not SIDE.search(SIDE_PAIR.sub("both", impression)):
        return "both sides"
    if not SIDE.search(OTHER_EXAM.sub("", SIDE_PAIR.sub("both", impression))):
        return "other exam"
    return None


def _word_skip(impression: str, match: re.Match[str], category: str) -> str | None:
    start = _sentence_start(impression, match.start())
    sentence = SENTENCE.match(impression, start)
    if sentence and CONDITIONAL.search(sentence.group()):
        return "conditional"
    if category == "time" and NEGATED_BEFORE.search(impression[start : match.start()]):
        return "ruled out"
    return None


def _swap_sides(text: str) -> str:
    return re.sub(
        r"\b(left|right)\b",
        lambda m: {"left": "right", "right": "left"}[m.group(1).lower()],
        text,
        flags=re.IGNORECASE,
    )


def iu_probes(findings: str, impression: str, skipped: Counter[str] | None = None) -> Iterator[Probe]:
    """The radiologist's impression (faithful) and its controlled edits (unfaithful).

    Edits that are skipped (see the module docstring) are counted in ``skipped`` as "category: reason".
    """
    yield Probe("radiologist", findings, impression, False, "")
    for category, pattern, replacement in EDITS:
        match = re.search(pattern, impression, re.IGNORECASE)
        if not match:
            continue
        if replacement == "side":
            reason = _side_skip(impression)
            edited = _swap_sides(impression)
        else:
            reason = _word_skip(impression, match, category)
            edited = (
                impression[: match.start()]
                + re.sub(pattern, replacement, match.group(), flags=re.IGNORECASE)
                + impression[match.end() :]
            )
        if reason:
            if skipped is not None:
                skipped[f"{category}: {reason}"] += 1
            continue
        yield Probe(category, findings, edited, True, pattern)
    negated = re.match(r"(?i)^\s*no\s+(.{3,60}?)\.", impression)
    if negated and "acute" not in negated.group(1).lower() and "change" not in negated.group(1).lower():
        yield Probe("negation", findings, negated.group(1).capitalize() + ".", True, "no X -> X")
    addition = next((a for a in ADDED if a.split()[-1][:6].lower() not in findings.lower()), None)
    if addition:
        # A sentence of its own: appended to an impression without a full stop, it would read as part
        # of the last sentence ("No acute cardiopulmonary disease aortic dissection").
        ended = impression.rstrip() if re.search(r"[.?!]\s*$", impression) else f"{impression.rstrip()}."
        yield Probe("unsupported", findings, f"{ended} {addition}", True, addition)
