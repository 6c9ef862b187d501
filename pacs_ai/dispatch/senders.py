"""Which function sends to which kind of destination: the one place to register a new kind."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pacs_ai.dispatch.cstore import send_files
from pacs_ai.dispatch.folder import copy_files
from pacs_ai.dispatch.stow import stow_files
from pacs_ai.peer_settings import Destination

Sender = Callable[..., None]

_SENDERS: dict[str, Sender] = {"dicom": send_files, "dicomweb": stow_files, "folder": copy_files}


def send(destination: Destination, paths: Sequence[Path], *, calling_ae_title: str, **options: Any) -> None:
    """Send ``paths`` to ``destination`` with the sender of its kind; raises ``DeliveryError``."""
    return _SENDERS[destination.type](destination, paths, calling_ae_title=calling_ae_title, **options)
