"""Peers the integration modules share: one ``transformers serve`` for every module that drafts through it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.llm_serve import transformers_serve


@pytest.fixture(scope="session")
def model_server() -> Iterator[str]:
    """One ``transformers serve`` for the session's models, each loaded when a request names it: its /v1 URL.

    Started once for every module that needs it (its start-up is most of a served test's time).
    ``--trust-remote-code`` for Qwen2.5-VL without torchvision: the server cannot
    build its processor (the video processor needs torchvision, and serve has no
    image-only fallback as our backend does), so the model directory carries its
    image-only processor as its own code (``tests.drafter_models.with_images_only_processor_code``).
    """
    transformers_utils = pytest.importorskip("transformers.utils")
    with transformers_serve(None, trust_remote_code=not transformers_utils.is_torchvision_available()) as url:
        yield url
