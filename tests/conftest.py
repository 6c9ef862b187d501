"""Session fixtures shared by all test levels: models the suite trains once (see ``tests/modelzoo.py``).

Set ``PACS_AI_TEST_MODEL_CACHE`` to a directory to keep the trained models
between runs (handy while developing; CI trains them afresh).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import modelzoo
from tests.object_store import SeaweedS3


def _model_dir(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """Build a model directory once per session (or once per cache directory)."""
    cache = os.environ.get("PACS_AI_TEST_MODEL_CACHE")
    if cache:
        target = Path(cache) / name
        if not (target / ".complete").is_file():
            build(target)
            (target / ".complete").write_text("")
        return target
    return build(tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def object_store() -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) on loopback for the session; each test takes a prefix of its own."""
    with SeaweedS3() as store:
        yield store


@pytest.fixture(scope="session")
def lung_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MONAI bundle segmenting right (1) and left (2) lung, trained on chest phantoms."""
    return _model_dir(tmp_path_factory, "lung-bundle", modelzoo.train_lung_segmentation_bundle)


@pytest.fixture(scope="session")
def pneumothorax_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MONAI bundle giving the probability of a pneumothorax on a synthetic chest radiograph."""
    return _model_dir(tmp_path_factory, "pneumothorax-bundle", modelzoo.train_pneumothorax_classifier_bundle)


@pytest.fixture(scope="session")
def lung_torchscript(tmp_path_factory: pytest.TempPathFactory, lung_bundle: Path) -> Path:
    """A directory with ``model.ts`` (the lung bundle's network) and its ``model.yaml`` descriptor."""
    return _model_dir(
        tmp_path_factory, "lung-torchscript", lambda out: modelzoo.export_torchscript_model(out, lung_bundle)
    )


@pytest.fixture(scope="session")
def broken_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose network_def names a class that does not exist."""
    return _model_dir(tmp_path_factory, "broken-bundle", modelzoo.write_broken_bundle)


@pytest.fixture(scope="session")
def failing_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle that loads and verifies but raises RuntimeError('simulated model failure') on a CT study."""
    return _model_dir(tmp_path_factory, "failing-bundle", modelzoo.write_failing_bundle)
