"""Hospital-supplied models: a registry on disk and a MONAI inference engine.

A model is either a MONAI bundle directory or a TorchScript file with a small
YAML descriptor (:mod:`pacs_ai.models.descriptor`).  ``pacs-ai models add``
copies it into the registry (:mod:`pacs_ai.models.store`); the analyzer
``monai-bundle`` (:mod:`pacs_ai.analyze.monai_bundle`) runs it through
:mod:`pacs_ai.models.engine` on a GPU where one exists and on the CPU
otherwise.  Nothing here fetches anything from the internet.

Importing this package does not import torch or MONAI; the modules that need
them import them themselves, so the CLI's listing verbs stay fast.
"""

from __future__ import annotations


class ModelError(Exception):
    """A model (on disk or in the registry) cannot be used; the message says which file and what to fix."""
