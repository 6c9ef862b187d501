"""Routing that leaves one study delivered and one undelivered: what retention tests need.

Studies sent with calling AE ``ARCHIVED_SCU`` have their originals forwarded to a folder
(``archive``: always delivered); those from ``NO_PACS_SCU`` to a DICOM destination nobody
listens on (``down``: the delivery fails and stays failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.peers import free_port

RULES = """
rules:
  - name: archive
    when: {calling_ae: [ARCHIVED_SCU]}
    actions: [{forward_originals: [archive]}]
  - name: no-pacs
    when: {calling_ae: [NO_PACS_SCU]}
    actions: [{forward_originals: [down]}]
"""

#: The same, plus a fallback that discards everything else (recorded, never analysed).
RULES_WITH_DISCARD_FALLBACK = (
    RULES
    + """  - name: rest
    fallback: true
    actions: [{discard: "not for AI"}]
"""
)


def archive_and_down_destinations(root: Path) -> dict[str, Any]:
    """``archive`` (a folder under ``root``) and ``down`` (a closed loopback port, no retries)."""
    return {
        "archive": {"type": "folder", "path": str(root / "archive")},
        "down": {
            "ae_title": "NOBODY",
            "host": "127.0.0.1",
            "port": free_port(),
            "max_retries": 0,
            "timeout_seconds": 2,
        },
    }
