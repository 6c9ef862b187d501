"""The radiology vocabulary of the guardrails: concepts, their synonyms and their hierarchy.

The vocabulary is reviewed data, ``data/radiology_vocabulary.yaml`` in this
package (its header says how to edit it): over 200 chest radiograph and chest
CT concepts (findings, devices, the acute findings that matter most:
pneumothorax, pulmonary embolism, aortic dissection, free air, fractures,
masses, metastases) with the phrases reports use for them and ``is_a`` parents
("consolidation" is an "airspace opacity", which is a "lung opacity").  Code
here only reads it and answers questions about it:

* :func:`vocabulary` - the loaded :class:`Vocabulary` (cached), which knows
  each concept's ancestors and descendants and which diagnoses may follow
  hedged from which findings (``may_follow_from``);
* :data:`CHEST_TERMS`, :func:`term_for_name`, :func:`term_patterns` - the
  regular-expression view the analyzer-evidence checks read drafts with
  (:mod:`pacs_ai.report.text`): a finding or segment name of a model maps to a
  concept when a synonym matches it in full; any other name is its own term,
  so the findings of any model are checked too.

A word not in the vocabulary is not recognised in report text, so missing
phrases make the guardrails blind to them: add them to the YAML file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml

#: The package file the vocabulary is read from.
VOCABULARY_FILE = "radiology_vocabulary.yaml"
#: What a negated "no acute ..." statement stands for; every ``acute: true`` concept is under it.
ACUTE_SUMMARY = "acute cardiopulmonary abnormality"
#: The broadest summary concept ("normal chest", "no abnormality").
ABNORMALITY = "abnormality"


class VocabularyError(ValueError):
    """The vocabulary file is inconsistent (unknown parent, a phrase given to two concepts)."""


@dataclass(frozen=True)
class Concept:
    """One concept of the vocabulary, as the YAML file states it."""

    name: str
    synonyms: tuple[str, ...]
    parents: tuple[str, ...] = ()
    #: finding | device | summary
    kind: str = "finding"
    acute: bool = False
    #: An umbrella statement ("no acute cardiopulmonary abnormality"), negated whole.
    summary: bool = False
    #: Concepts of the evidence this diagnosis may follow from, hedged only (see the YAML header).
    may_follow_from: tuple[str, ...] = ()
    #: Regular expressions over lower-case report text for phrasings with words in between
    #: ("heart size is mildly enlarged"), read by the report reader besides the synonyms.
    patterns: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Vocabulary:
    concepts: dict[str, Concept]
    #: phrase (lower case, as written in the file) -> concept name
    phrases: dict[str, str] = field(default_factory=dict)

    def ancestors(self, name: str) -> frozenset[str]:
        """Every concept above ``name`` (parents, theirs, ...); acute concepts are under the acute summary."""
        return _ancestors(self, name)

    def descendants(self, name: str) -> frozenset[str]:
        """Every concept below ``name``; under the acute summary also every ``acute`` concept and theirs."""
        return frozenset(c for c in self.concepts if name in self.ancestors(c))

    def related(self, a: str, b: str) -> bool:
        """The same concept, or one above the other."""
        return a == b or a in self.ancestors(b) or b in self.ancestors(a)


@cache
def _ancestors(vocab: Vocabulary, name: str) -> frozenset[str]:
    concept = vocab.concepts.get(name)
    if concept is None:
        return frozenset()
    found: set[str] = set()
    todo = list(concept.parents) + ([ACUTE_SUMMARY] if concept.acute and name != ACUTE_SUMMARY else [])
    while todo:
        parent = todo.pop()
        if parent in found or parent == name:
            continue
        found.add(parent)
        todo += vocab.concepts[parent].parents
    return frozenset(found)


def _as_tuple(entry: dict[str, Any], key: str, name: str) -> tuple[str, ...]:
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VocabularyError(f"concept {name!r}: {key} must be a list of strings")
    return tuple(v.strip().lower() for v in value)


def parse_vocabulary(document: dict[str, Any]) -> Vocabulary:
    """A :class:`Vocabulary` from the YAML document; raises :class:`VocabularyError` naming the problem."""
    concepts: dict[str, Concept] = {}
    for raw_name, entry in (document.get("concepts") or {}).items():
        name = str(raw_name).strip().lower()
        entry = entry or {}
        concepts[name] = Concept(
            name=name,
            synonyms=tuple(dict.fromkeys((name, *_as_tuple(entry, "synonyms", name)))),
            parents=_as_tuple(entry, "is_a", name),
            kind=str(entry.get("kind", "finding")),
            acute=bool(entry.get("acute", False)),
            summary=bool(entry.get("summary", False)),
            may_follow_from=_as_tuple(entry, "may_follow_from", name),
            patterns=tuple(p.strip() for p in entry.get("patterns") or []),
        )
    phrases: dict[str, str] = {}
    for concept in concepts.values():
        for other in concept.parents + concept.may_follow_from:
            if other not in concepts:
                raise VocabularyError(f"concept {concept.name!r} names unknown concept {other!r}")
        for phrase in concept.synonyms:
            if phrases.setdefault(phrase, concept.name) != concept.name:
                raise VocabularyError(
                    f"phrase {phrase!r} is given to both {phrases[phrase]!r} and {concept.name!r}"
                )
    return Vocabulary(concepts, phrases)


@cache
def vocabulary() -> Vocabulary:
    """The package's vocabulary (read once)."""
    text = resources.files("pacs_ai.report").joinpath("data", VOCABULARY_FILE).read_text(encoding="utf-8")
    return parse_vocabulary(yaml.safe_load(text))


def plural_forms(phrase: str) -> tuple[str, ...]:
    """The phrase and the plural of its last word ("effusion" -> "effusions", "opacity" -> "opacities")."""
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("s", "x", "ae")) or not last[-1:].isalpha() or len(last) < 3:
        plurals: list[str] = []
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        plurals = [last[:-1] + "ies"]
    elif last.endswith(("ch", "sh")):
        plurals = [last + "es"]
    else:
        plurals = [last + "s"]
    return (phrase, *(f"{head} {p}".strip() for p in plurals))


def _phrase_regex(phrase: str) -> str:
    return r"[\s-]+".join(re.escape(word) for word in re.split(r"[\s-]+", phrase))


def _chest_terms() -> dict[str, tuple[str, ...]]:
    terms: dict[str, tuple[str, ...]] = {}
    for concept in vocabulary().concepts.values():
        forms = [form for synonym in concept.synonyms for form in plural_forms(synonym)]
        terms[concept.name] = tuple(_phrase_regex(form) for form in dict.fromkeys(forms))
    return terms


#: canonical term -> regular expressions (matched whole-word, case-insensitive), from the vocabulary.
CHEST_TERMS: dict[str, tuple[str, ...]] = _chest_terms()


def normalise_name(name: str) -> str:
    """Lower case, underscores and white space to one space ("Pleural_Thickening" -> "pleural thickening")."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w])", re.IGNORECASE)


_COMPILED = {term: _compiled(patterns) for term, patterns in CHEST_TERMS.items()}


def term_for_name(name: str) -> str:
    """The canonical term a finding or segment name stands for.

    A name some synonym of the vocabulary matches in full (e.g. "Effusion",
    "Lung Opacity", "Pleural_Thickening") maps to that concept; any other name
    is its own term (normalised), so findings of any model are checked too.
    """
    normal = normalise_name(name)
    concept = vocabulary().phrases.get(normal)
    if concept is not None:
        return concept
    for term, pattern in _COMPILED.items():
        if pattern.fullmatch(normal):
            return term
    return normal


def term_patterns(extra_terms: set[str] | frozenset[str] = frozenset()) -> dict[str, re.Pattern[str]]:
    """Compiled patterns of the chest terms plus ``extra_terms`` (names outside the list, matched literally).

    An extra term matches as its words separated by any white space, with an optional plural "s".
    """
    patterns = dict(_COMPILED)
    for term in sorted(extra_terms):
        if term in patterns or not term:
            continue
        words = r"[\s_-]+".join(re.escape(word) for word in term.split())
        patterns[term] = _compiled((words + r"s?",))
    return patterns
