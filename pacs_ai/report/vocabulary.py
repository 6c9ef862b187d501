"""Finding terms the guardrails recognise in report text, with their synonyms.

A draft may only assert (or rule out) a finding the evidence speaks about; to
check that, the text's finding words must be recognised.  The vocabulary is
this small list of common chest findings (the labels of the public chest
radiograph classifiers, CheXpert/NIH ChestX-ray14 style, plus a few common
report words) extended at run time with the names of the findings and segments
in the evidence (:func:`term_for_name`).  It is deliberately small: a word not
in it is not checked, so the list errs towards the findings that matter.

Each entry maps a canonical term to regular expressions (matched whole-word,
case-insensitive) for the ways reports write it.
"""

from __future__ import annotations

import re

#: canonical term -> patterns (regular expressions without anchors; plural forms included).
CHEST_TERMS: dict[str, tuple[str, ...]] = {
    "pneumothorax": (r"pneumothora(?:x|ces)", r"hydropneumothorax"),
    "pleural effusion": (r"(?:pleural\s+)?effusions?", r"hydrothorax", r"fluid\s+in\s+the\s+pleural\s+space"),
    "pleural thickening": (r"pleural\s+thickening",),
    "consolidation": (r"consolidations?", r"consolidative", r"air[\s-]?space\s+disease"),
    "pneumonia": (r"pneumonias?", r"pneumonitis"),
    "atelectasis": (r"atelectas[ie]s", r"atelectatic"),
    "edema": (r"(?:pulmonary\s+)?o?edema",),
    "cardiomegaly": (
        r"cardiomegaly",
        r"(?:enlarged|enlargement\s+of\s+the)\s+(?:heart|cardiac\s+silhouette)",
        r"cardiac\s+enlargement",
    ),
    "enlarged cardiomediastinum": (
        r"enlarged\s+cardiomediastin(?:um|al\s+silhouette)",
        r"mediastinal\s+widening",
    ),
    "nodule": (r"nodules?", r"nodular(?:ity)?"),
    "mass": (r"mass(?:es)?",),
    "lung lesion": (r"lung\s+lesions?", r"pulmonary\s+lesions?"),
    "lung opacity": (r"(?:lung\s+|pulmonary\s+|air[\s-]?space\s+)?opacit(?:y|ies)", r"opacification"),
    "infiltration": (r"infiltrat(?:e|es|ion|ions)",),
    "emphysema": (r"emphysema(?:tous)?",),
    "fibrosis": (r"fibros(?:is|es)", r"fibrotic"),
    "fracture": (r"fractures?",),
    "hernia": (r"hernias?", r"herniation"),
    "granuloma": (r"granulomas?", r"granulomata"),
    "scarring": (r"scar(?:s|ring)?",),
    "lymphadenopathy": (r"lymphadenopathy", r"adenopathy"),
    "pneumoperitoneum": (r"pneumoperitoneum", r"free\s+(?:intraperitoneal\s+)?air"),
    "bronchiectasis": (r"bronchiectasis",),
}


def normalise_name(name: str) -> str:
    """Lower case, underscores and white space to one space ("Pleural_Thickening" -> "pleural thickening")."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w])", re.IGNORECASE)


_COMPILED = {term: _compiled(patterns) for term, patterns in CHEST_TERMS.items()}


def term_for_name(name: str) -> str:
    """The canonical term a finding or segment name stands for.

    A name some pattern of :data:`CHEST_TERMS` matches in full (e.g. "Effusion",
    "Lung Opacity", "Pleural_Thickening") maps to that term; any other name is
    its own term (normalised), so findings of any model are checked too.
    """
    normal = normalise_name(name)
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
