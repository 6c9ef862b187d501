"""Logging for every pacs-ai process: one line format, to stderr and to the data directory.

Log lines carry UIDs, accession numbers and AE titles, never patient names.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"


def configure_logging(level: str, log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # Several processes append to one file; WatchedFileHandler reopens it
        # after an external logrotate moves it, which is how sites rotate logs.
        handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=level.upper(), format=FORMAT, handlers=handlers, force=True)
    quiet_noisy_libraries()


def quiet_noisy_libraries() -> None:
    """Keep libraries that narrate at INFO to warnings and errors."""
    # pynetdicom logs every PDU; highdicom every attribute it copies.
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
