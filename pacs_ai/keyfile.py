"""Random keys kept in the data directory: made once, readable by the service's user only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["load_or_create_key"]

#: A kept key shorter than this is not trusted and made again.
MIN_KEY_LENGTH = 32


def load_or_create_key(path: Path) -> str:
    """The key in ``path``; on first use a random one (48 bytes, URL-safe text) written with mode 0600.

    Two processes creating it at once both end with the same key: the file is
    created exclusively and the loser reads the winner's.
    """
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = ""
    if len(key) >= MIN_KEY_LENGTH:
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)  # fails if another process made the key meanwhile
    except FileExistsError:
        existing = path.read_text(encoding="ascii").strip()
        if len(existing) >= MIN_KEY_LENGTH:
            key = existing
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return key
