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
* ``masked`` (laterality): every side word the swap changes is followed within
  three words by the de-identification's "XXXX" ("left chest XXXX"): what the
  side qualifies is not in the text, so no checker can tell;
* ``ruled out`` (time): the word is inside a negation ("no old fracture" ->
  "no new fracture" still rules the fracture out);
* ``conditional`` (time, severity, certainty): the word is in a condition or
  a question ("to determine if this is a chronic appearance"), not in a
  statement about the patient;
* ``still hedged`` (certainty): the sentence keeps another hedge once the
  first is removed ("Possible opacity versus technique" -> "opacity versus
  technique" still gives two readings; "suspicious for potential malignancy"
  -> "potential malignancy"), so it states nothing as certain.

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
SKIP_REASONS = ("both sides", "other exam", "masked", "ruled out", "conditional", "still hedged")
#: Hedges left in a sentence after the certainty edit removed its first one (the ConText uncertainty
#: triggers of pacs_ai/report/data/radiology_context.yaml that reports write).
HEDGE = re.compile(
    r"\b(?:possible|possibly|probable|probably|likely|may|might|could|suspicious|suspicion|concerning|"
    r"concern for|suggest\w*|versus|vs|questionable|question of|potential|presumed|equivocal|"
    r"indeterminate|cannot (?:be )?(?:excluded|exclude|ruled out)|not excluded|favou?red|and/or)\b",
    re.IGNORECASE,
)
#: A side naming an extremity, the body part of an examination other than the chest ("right foot").
OTHER_EXAM = re.compile(
    r"\b(?:left|right)\s+(?:elbows?|forearms?|wrists?|hands?|fingers?|thumbs?|knees?|ankles?|foot|feet|"
    r"toes?|legs?|hips?|femur|tibia|fibula)\b",
    re.IGNORECASE,
)
#: Both sides named as a pair: the same sides whichever comes first.
SIDE_PAIR = re.compile(r"\b(?:left|right)\s+(?:and|or|&)\s+(?:left|right)\b", re.IGNORECASE)
SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
#: A side word with the de-identification's "XXXX" at most three words after it: what the side
#: qualifies is masked ("left chest XXXX", "right-sided aortic XXXX").
MASKED_SIDE = re.compile(r"\b(?:left|right)\b(?:[-\w]*[^\w.?!]+\w+){0,2}?[^\w.?!]+XXXX\b", re.IGNORECASE)
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
    if not SIDE.search(MASKED_SIDE.sub("", OTHER_EXAM.sub("", SIDE_PAIR.sub("both", impression)))):
        return "masked"
    return None


def _word_skip(impression: str, match: re.Match[str], category: str) -> str | None:
    start = _sentence_start(impression, match.start())
    sentence = SENTENCE.match(impression, start)
    if sentence and CONDITIONAL.search(sentence.group()):
        return "conditional"
    if category == "time" and NEGATED_BEFORE.search(impression[start : match.start()]):
        return "ruled out"
    if category == "certainty" and sentence:
        rest = sentence.group()[: match.start() - start] + sentence.group()[match.end() - start :]
        if HEDGE.search(rest):
            return "still hedged"
    return None


def _swap_sides(text: str) -> str:
    return re.sub(
        r"\b(left|right)\b",
        lambda m: {"left": "right", "right": "left"}[m.group(1).lower()],
        text,
        flags=re.IGNORECASE,
    )


def _edits(
    findings: str,
    impression: str,
    skipped: Counter[str] | None,
    negation_anywhere: bool = False,
    findings_part: str | None = None,
) -> Iterator[tuple[str, str, str]]:
    """(category, edited impression, edit) for each controlled unfaithful edit of ``impression``.

    ``negation_anywhere``: the negation edit takes the first sentence "No X." wherever it is, not
    only a leading one.  ``findings_part``: ``impression`` with its normal sentences blanked out (same
    length); the severity, time and certainty edits then take the first word in a sentence stating a
    finding ("stable" in "Stable left basilar scarring", not in "The mediastinum is stable").
    """
    for category, pattern, replacement in EDITS:
        searched = impression if replacement == "side" or findings_part is None else findings_part
        match = re.search(pattern, searched, re.IGNORECASE)
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
        yield category, edited, pattern
    negated = re.search(r"(?i)(?:^|(?<=[.?!] ))\s*no\s+(.{3,60}?)\.", impression)
    if negated and not negation_anywhere and negated.start() > 0:
        negated = None
    if negated and "acute" not in negated.group(1).lower() and "change" not in negated.group(1).lower():
        edited = impression[: negated.start()] + negated.group(1).capitalize() + "."
        if negation_anywhere:
            edited += impression[negated.end() :]
        yield "negation", edited, "no X -> X"
    addition = next((a for a in ADDED if a.split()[-1][:6].lower() not in findings.lower()), None)
    if addition:
        # A sentence of its own: appended to an impression without a full stop, it would read as part
        # of the last sentence ("No acute cardiopulmonary disease aortic dissection").
        ended = impression.rstrip() if re.search(r"[.?!]\s*$", impression) else f"{impression.rstrip()}."
        yield "unsupported", f"{ended} {addition}", addition


def iu_probes(findings: str, impression: str, skipped: Counter[str] | None = None) -> Iterator[Probe]:
    """The radiologist's impression (faithful to the radiologist, not necessarily to the findings) and
    its controlled edits (unfaithful).

    Edits that are skipped (see the module docstring) are counted in ``skipped`` as "category: reason".
    """
    yield Probe("radiologist", findings, impression, False, "")
    for category, edited, edit in _edits(findings, impression, skipped):
        yield Probe(category, findings, edited, True, edit)


#: Meaning-preserving rewrites of a findings sentence, applied in order (pattern, replacement).
REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), replacement)
    for pattern, replacement in (
        # "There is no pleural effusion." -> "No pleural effusion."
        (r"^there (?:is|are) no\s+", "No "),
        # "No pneumothorax is seen." / "No effusion is identified." -> "No pneumothorax."
        (r"^(no\s[^.?!,]{3,60}?)\s+(?:is|are) (?:seen|identified|noted|present|demonstrated)\b", r"\1"),
        # "Heart size is normal." / "The heart is normal in size." -> "Normal heart size."
        (r"^(?:the )?heart size is (?:normal|within normal limits)(?=\.)", "Normal heart size"),
        (r"^the heart is normal in size(?=\.)", "Normal heart size"),
        # "The lungs are clear." -> "Clear lungs."
        (r"^(?:the )?lungs are clear(?=\.)", "Clear lungs"),
        # "The cardiomediastinal silhouette is normal ..." -> "Normal cardiomediastinal silhouette."
        (
            r"^(?:the )?cardiomediastinal silhouette is (?:normal|within normal limits)"
            r"(?: in size and contour)?(?=\.)",
            "Normal cardiomediastinal silhouette",
        ),
    )
)
#: A findings sentence that only rules findings out or calls a structure normal.
NORMAL_SENTENCE = re.compile(
    r"^(?:no\b|there (?:is|are) no\b|negative for\b|normal\b|clear lungs\b)|"
    r"\b(?:normal|unremarkable|clear|within normal limits|intact)\b[^.?!]*[.?!]?$|"
    # A normal structure unchanged: "The mediastinum is stable", "Stable cardiomediastinal silhouette".
    r"^(?:(?:the )?(?:heart size|heart|mediastinum|cardiomediastinal silhouette|mediastinal contours?|"
    r"cardiomediastinal contours?|hilar contours?)(?: and [a-z ]+)? (?:is|are|appears?|remains?) "
    r"(?:stable|unchanged)|stable (?:cardiomediastinal silhouette|mediastinal contours?|cardiomediastinal "
    r"contours?))\b[^.?!,]*[.?!]?$",
    re.IGNORECASE,
)
#: Words that make a "normal" sentence also state a finding ("normal except for ...").
STATES_A_FINDING = re.compile(r"\b(?:except|but|although|however|with|mild|small|enlarged)\b", re.IGNORECASE)


def _sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ".", "?" or "!" and a space ("1.9 cm" stays whole)."""
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if len(s.strip()) > 2]


def _rewrite(sentence: str) -> str:
    for pattern, replacement in REWRITES:
        sentence = pattern.sub(replacement, sentence, count=1)
    return sentence[:1].upper() + sentence[1:]


#: At most this many sentences stating a finding go into a faithful impression (an impression is short).
STATED_FINDINGS = 2


def faithful_impression(findings: str, variant: int) -> str | None:
    """The faithful impression of :func:`faithful_parts`, or None when the findings have no sentence."""
    parts = faithful_parts(findings, variant)
    return " ".join(text for text, _ in parts) or None


def faithful_parts(findings: str, variant: int) -> list[tuple[str, bool]]:
    """An impression supported by ``findings`` by construction: some of the findings' own sentences,
    edited so as to keep their meaning.

    The first :data:`STATED_FINDINGS` sentences stating a finding are kept (leaving a finding out is
    not unfaithful); of the normal sentences (those that only rule out or call normal) the last is
    dropped when there are at least two.  Each sentence is rewritten with :data:`REWRITES` ("There is
    no X" -> "No X", "Heart size is normal" -> "Normal heart size", ...).  ``variant`` (0 or 1)
    picks the order: 0 keeps the findings' order, 1 puts the sentences stating a finding first.
    Returns (sentence, True when it is a normal sentence) in impression order.
    """
    sentences = _sentences(findings)
    normal = [s for s in sentences if NORMAL_SENTENCE.search(s) and not STATES_A_FINDING.search(s)]
    stated = [s for s in sentences if s not in normal][:STATED_FINDINGS]
    if len(normal) >= 2:
        normal = normal[:-1]
    kept = [s for s in sentences if s in normal or s in stated]
    if variant:
        kept = [s for s in kept if s in stated] + [s for s in kept if s in normal]
    rewritten = [(_rewrite(s), s in normal) for s in kept]
    return [(s if re.search(r"[.?!]$", s) else f"{s}.", is_normal) for s, is_normal in rewritten]


def matched_probes(findings: str, variant: int, skipped: Counter[str] | None = None) -> Iterator[Probe]:
    """Matched pairs: per edit category, the faithful impression built from ``findings`` (unfaithful
    False) and the same impression with that category's unfaithful edit (unfaithful True).

    A faithful impression with no edit in a category gives no pair in it; one that gets edits in
    several categories is counted, faithful, once in each.
    """
    parts = faithful_parts(findings, variant)
    if not parts:
        return
    impression = " ".join(text for text, _ in parts)
    findings_part = " ".join(" " * len(text) if is_normal else text for text, is_normal in parts)
    for category, edited, edit in _edits(
        findings, impression, skipped, negation_anywhere=True, findings_part=findings_part
    ):
        yield Probe(category, findings, impression, False, "faithful")
        yield Probe(category, findings, edited, True, edit)
