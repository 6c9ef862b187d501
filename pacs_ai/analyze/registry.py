"""Analyzer names to factories: the one place that knows which analyzers exist.

Profiles, the job runner and the CLI refer to analyzers by name.  Factories
import their module lazily so that listing names (e.g. ``pacs-ai profiles
validate``) does not load scipy or torch.
"""

from __future__ import annotations

from collections.abc import Callable

from pacs_ai.analyze.base import Analyzer

AnalyzerFactory = Callable[[], Analyzer]


class UnknownAnalyzerError(KeyError):
    """No analyzer is registered under the requested name."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; show the message as written.
        return str(self.args[0]) if self.args else "unknown analyzer"


def _ct_chest_lung() -> Analyzer:
    from pacs_ai.analyze.lung import CtChestLungAnalyzer

    return CtChestLungAnalyzer()


def _monai_bundle() -> Analyzer:
    from pacs_ai.analyze.monai_bundle import MonaiBundleAnalyzer

    return MonaiBundleAnalyzer()


_FACTORIES: dict[str, AnalyzerFactory] = {"ct-chest-lung": _ct_chest_lung, "monai-bundle": _monai_bundle}


def register_analyzer(name: str, factory: AnalyzerFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``name``; re-registering a name needs ``replace=True``."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"analyzer {name!r} is already registered; pass replace=True to override it")
    _FACTORIES[name] = factory


def available_analyzers() -> list[str]:
    """Names of the registered analyzers, sorted."""
    return sorted(_FACTORIES)


def get_analyzer(name: str) -> Analyzer:
    """A new instance of the analyzer registered as ``name``.

    Raises :class:`UnknownAnalyzerError` (a ``KeyError``) naming the known analyzers.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownAnalyzerError(
            f"unknown analyzer {name!r}; known analyzers: {', '.join(available_analyzers()) or 'none'}"
        ) from None
    return factory()
