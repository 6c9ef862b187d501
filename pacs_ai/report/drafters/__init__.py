"""Drafter backends behind one interface, and the registry that names them.

A backend turns :class:`~pacs_ai.report.evidence.Evidence` into findings and
impression text (:meth:`Drafter.draft_report`), and a findings section into an
impression (:meth:`Drafter.draft_impression`).  Backends do not check their
own output: :mod:`pacs_ai.report.draft` runs the guardrails on whatever they
write and falls back to the template draft.

A profile chooses the backend and its parameters (:class:`DrafterConfig`)::

    report:
      backend: openai              # template (default) | transformers | openai | retrieval
      params: {base_url: "http://llm.hospital.local:8000/v1", model: "medgemma-27b-text"}

A new backend is one module plus one entry in :data:`_FACTORIES` (or a call of
:func:`register_drafter`); factories import their module lazily, so choosing
``template`` never imports transformers or an HTTP client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from PIL.Image import Image

    from pacs_ai.report.evidence import Evidence, StudyContext


@dataclass(frozen=True)
class DraftText:
    """What a backend wrote: the findings and impression sections, without any header."""

    findings: str
    impression: str


class DrafterError(Exception):
    """A backend could not draft (model failed, endpoint unreachable or timed out, answer unreadable).

    The draft falls back to the template draft with this message as the reason.
    """


class DrafterConfigError(ValueError):
    """A profile gives a backend a name or parameters it cannot use; the message says what to fix."""


class Drafter(Protocol):
    """A drafter backend."""

    #: Registry name of the backend ("template", "transformers", "openai").
    name: str

    @property
    def model_id(self) -> str | None:
        """What wrote the text (model directory name, served model name); None for the template."""
        ...

    def draft_report(self, evidence: Evidence, images: Sequence[Image] = ()) -> DraftText:
        """Findings and impression for a study; ``images`` are key images for multimodal models."""
        ...

    def draft_impression(self, findings_text: str, context: StudyContext | None = None) -> str:
        """An impression for a findings section (the findings-to-impression task)."""
        ...


class DrafterConfig(BaseModel):
    """The ``report`` section of a profile: which backend drafts, with which parameters."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(default="template", description="registered drafter name")
    params: dict[str, Any] = Field(
        default_factory=dict, description="backend parameters, checked by the backend"
    )


DrafterFactory = Callable[[Mapping[str, Any]], Drafter]
P = TypeVar("P", bound=BaseModel)


def parse_params(model: type[P], params: Mapping[str, Any] | None, backend: str) -> P:
    """Validate a profile's backend parameters; errors raise a :class:`DrafterConfigError` naming each."""
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'params'}: {error['msg']}"
            for error in exc.errors()
        )
        raise DrafterConfigError(f"{backend} drafter parameters: {problems}") from None


def _template(params: Mapping[str, Any]) -> Drafter:
    from pacs_ai.report.drafters.template import TemplateDrafter

    return TemplateDrafter.from_params(params)


def _transformers(params: Mapping[str, Any]) -> Drafter:
    from pacs_ai.report.drafters.transformers_backend import TransformersDrafter

    return TransformersDrafter.from_params(params)


def _openai(params: Mapping[str, Any]) -> Drafter:
    from pacs_ai.report.drafters.openai_backend import OpenAIDrafter

    return OpenAIDrafter.from_params(params)


def _retrieval(params: Mapping[str, Any]) -> Drafter:
    from pacs_ai.report.drafters.retrieval import RetrievalDrafter

    return RetrievalDrafter.from_params(params)


_FACTORIES: dict[str, DrafterFactory] = {
    "template": _template,
    "transformers": _transformers,
    "openai": _openai,
    "retrieval": _retrieval,
}


def register_drafter(name: str, factory: DrafterFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``name``; re-registering a name needs ``replace=True``."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"drafter {name!r} is already registered; pass replace=True to override it")
    _FACTORIES[name] = factory


def available_drafters() -> list[str]:
    """Names of the registered drafter backends, sorted."""
    return sorted(_FACTORIES)


def get_drafter(name: str, params: Mapping[str, Any] | None = None) -> Drafter:
    """A new drafter of backend ``name`` with validated ``params``.

    Raises :class:`DrafterConfigError` for an unknown name or invalid
    parameters.  Backends with models load them lazily on first use, so keep
    the instance to draft many studies.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise DrafterConfigError(
            f"unknown drafter backend {name!r}; known backends: {', '.join(available_drafters())}"
        ) from None
    return factory(dict(params or {}))
