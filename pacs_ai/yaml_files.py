"""Reading the YAML files administrators write (profiles, rules, model descriptors) into pydantic models.

One place decides how such a file is read and how its problems are reported:
the file's path first, then every invalid key with pydantic's message, so a
typo is found in one try.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


def describe_validation_error(exc: ValidationError) -> str:
    """``key.path: message; other.key: message`` for every problem pydantic found."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
        for error in exc.errors()
    )


def load_yaml_model(
    path: Path,
    model: type[ModelT],
    error: type[Exception],
    *,
    what: str,
    empty: ModelT | None = None,
) -> ModelT:
    """Validate the YAML mapping in ``path`` as ``model``; raise ``error`` naming the file and each problem.

    ``what`` names the kind of file in messages (e.g. "a profile"); ``empty``
    is returned for an empty file where that is allowed.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{path}: cannot read YAML: {exc}") from exc
    if data is None and empty is not None:
        return empty
    if not isinstance(data, dict):
        raise error(f"{path}: {what} is a YAML mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{path}: {describe_validation_error(exc)}") from exc
