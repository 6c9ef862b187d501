"""Retrieval drafter: impressions the site's radiologists signed for the most similar findings.

Signed reports (:mod:`pacs_ai.report.signed_reports`: worklist sign-offs and
imported past reports) are indexed with scikit-learn's TF-IDF (word 1- and
2-grams, sublinear term frequency; "no" and other short words kept, since
negation carries meaning here).  For a findings section:

1. the :data:`NEIGHBOURS` signed reports with the most similar findings
   (cosine similarity) are found;
2. their impressions are ranked by agreement: an impression that is close to
   the other neighbours' impressions, weighted by how similar their findings
   are, says what most radiologists wrote for findings like these;
3. each ranked impression is adapted to the current findings, sentence by
   sentence, with the guardrails (:class:`pacs_ai.report.consistency.Comparison`):
   a sentence that passes is kept, one that fails only on the side has left
   and right swapped and is checked again, any other is dropped;
4. the first impression kept whole is suggested, else the first kept in
   part; when none is left, the findings' own sentences that assert
   something (at most two), or the normal impression when they assert
   nothing.

The drafter does not depend on its own checks: :mod:`pacs_ai.report.draft`
runs the guardrails on what it returns, as for every backend.  With no signed
report yet it answers like step 4.  The index is rebuilt when it is older
than ``refresh_seconds``, so new sign-offs are used without a restart.

Profile parameters: ``database_url`` (default: the index of the settings),
``neighbours``, ``refresh_seconds``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.feature_extraction.text import TfidfVectorizer

from pacs_ai.config import load_settings
from pacs_ai.index.db import make_engine, make_session_factory, session_scope
from pacs_ai.report.clinical_nlp import read_text
from pacs_ai.report.consistency import Comparison
from pacs_ai.report.drafters import DrafterError, DraftText, parse_params
from pacs_ai.report.drafters.template import NORMAL_IMPRESSION, TemplateDrafter
from pacs_ai.report.signed_reports import signed_corpus
from pacs_ai.report.text import sentences

if TYPE_CHECKING:
    from PIL.Image import Image

    from pacs_ai.report.evidence import Evidence, StudyContext

#: How many signed reports with similar findings are read for one suggestion.
NEIGHBOURS = 15
#: Sentences of the findings carried over when no signed impression fits.
MAX_EXTRACTED_SENTENCES = 2
_SIDE_SWAP = {
    "left": "right",
    "right": "left",
    "Left": "Right",
    "Right": "Left",
    "LEFT": "RIGHT",
    "RIGHT": "LEFT",
}
_SIDE_WORD = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")


class RetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: str | None = Field(default=None, description="index with the signed reports")
    neighbours: int = Field(default=NEIGHBOURS, ge=1, le=200)
    refresh_seconds: float = Field(default=300.0, ge=0)


def _vectorizer() -> TfidfVectorizer:
    return TfidfVectorizer(
        ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b", lowercase=True
    )


class RetrievalIndex:
    """TF-IDF index of signed findings and impressions."""

    def __init__(self, corpus: Sequence[tuple[str, str]]) -> None:
        self.findings = [f for f, _ in corpus]
        self.impressions = [i for _, i in corpus]
        self._findings_vectorizer = _vectorizer()
        self._impression_vectorizer = _vectorizer()
        self._findings_matrix = self._findings_vectorizer.fit_transform(self.findings) if corpus else None
        self._impression_matrix = (
            self._impression_vectorizer.fit_transform(self.impressions) if corpus else None
        )

    def __len__(self) -> int:
        return len(self.findings)

    def ranked_impressions(self, findings_text: str, neighbours: int) -> list[str]:
        """Impressions of the nearest signed findings, most agreed-on first (see the module docstring)."""
        if self._findings_matrix is None or self._impression_matrix is None:
            return []
        query = self._findings_vectorizer.transform([findings_text])
        similarity = (self._findings_matrix @ query.T).toarray().ravel()
        count = min(neighbours, len(similarity))
        nearest = np.argpartition(-similarity, count - 1)[:count]
        nearest = nearest[np.argsort(-similarity[nearest], kind="stable")]
        weights = similarity[nearest]
        impressions = self._impression_matrix[nearest]
        agreement = (impressions @ impressions.T).toarray() @ weights
        order = np.argsort(-agreement, kind="stable")
        return list(dict.fromkeys(self.impressions[nearest[i]] for i in order))


def _adapt(impression: str, comparison: Comparison) -> tuple[str, bool]:
    """The impression's sentences that pass the checks (a side swap tried on laterality); True if all did."""
    kept: list[str] = []
    whole = True
    for sentence in sentences(impression):
        text = sentence.text.strip()
        violations = comparison.check(text)
        if violations and all(v.check == "laterality" for v in violations):
            swapped = _SIDE_WORD.sub(lambda m: _SIDE_SWAP[m.group(1)], text)
            if not comparison.check(swapped):
                kept.append(swapped)
                continue
        if violations:
            whole = False
        else:
            kept.append(text)
    return " ".join(kept), whole and bool(kept)


def extracted_impression(findings_text: str, comparison: Comparison) -> str:
    """The findings' sentences that assert something (checked), else the normal impression."""
    kept = []
    for sentence in sentences(findings_text):
        text = sentence.text.strip()
        claims = read_text(text).claims
        if any(c.asserted and not c.normal for c in claims) and not comparison.check(text):
            kept.append(text if text.endswith((".", "!", "?")) else text + ".")
        if len(kept) == MAX_EXTRACTED_SENTENCES:
            break
    return " ".join(kept) if kept else NORMAL_IMPRESSION


def suggest_impression(findings_text: str, index: RetrievalIndex, neighbours: int = NEIGHBOURS) -> str:
    """An impression for ``findings_text`` from the signed reports of ``index`` (see the module docstring)."""
    comparison = Comparison(read_text(findings_text))
    partial = ""
    for impression in index.ranked_impressions(findings_text, neighbours):
        adapted, whole = _adapt(impression, comparison)
        if whole:
            return adapted
        partial = partial or adapted
    return partial or extracted_impression(findings_text, comparison)


class RetrievalDrafter:
    """Impressions from the site's signed reports; see the module docstring."""

    name = "retrieval"

    def __init__(
        self,
        load_corpus: Callable[[], Sequence[tuple[str, str]]],
        *,
        neighbours: int = NEIGHBOURS,
        refresh_seconds: float = 300.0,
    ) -> None:
        self._load_corpus = load_corpus
        self.neighbours = neighbours
        self.refresh_seconds = refresh_seconds
        self._index: RetrievalIndex | None = None
        self._built_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> RetrievalDrafter:
        config = parse_params(RetrievalParams, params, "retrieval")
        return cls(
            _database_corpus(config.database_url),
            neighbours=config.neighbours,
            refresh_seconds=config.refresh_seconds,
        )

    @classmethod
    def from_reports(
        cls, corpus: Sequence[tuple[str, str]], neighbours: int = NEIGHBOURS
    ) -> RetrievalDrafter:
        """A drafter over a fixed list of (findings, impression) pairs (benchmarks, tests)."""
        return cls(lambda: corpus, neighbours=neighbours, refresh_seconds=float("inf"))

    @property
    def model_id(self) -> str | None:
        return f"tfidf-{len(self._index)}-reports" if self._index is not None else "tfidf"

    def index(self) -> RetrievalIndex:
        """The index, built on first use and rebuilt after ``refresh_seconds``."""
        with self._lock:
            stale = time.monotonic() - self._built_at > self.refresh_seconds
            if self._index is None or stale:
                try:
                    self._index = RetrievalIndex(self._load_corpus())
                except Exception as exc:  # the database may be unreachable; the draft falls back
                    raise DrafterError(f"signed reports could not be read: {exc}") from exc
                self._built_at = time.monotonic()
            return self._index

    def draft_impression(self, findings_text: str, context: StudyContext | None = None) -> str:
        return suggest_impression(findings_text, self.index(), self.neighbours)

    def draft_report(self, evidence: Evidence, images: Sequence[Image] = ()) -> DraftText:
        findings = TemplateDrafter().draft_report(evidence).findings
        return DraftText(findings, self.draft_impression(findings, evidence.context))


def _database_corpus(database_url: str | None) -> Callable[[], list[tuple[str, str]]]:
    def load() -> list[tuple[str, str]]:
        engine = make_engine(database_url or load_settings().effective_database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                return signed_corpus(session)
        finally:
            engine.dispose()

    return load
