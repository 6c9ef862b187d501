"""Flushing files and directory entries to stable storage.

A rename or a new hard link is only durable once the directory holding it is
fsynced; a file's data only once the file is.  Both the spool (received
instances) and the results writer (SEG/SR) rely on these two calls.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Force a file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Force a directory's entries (new names, renames) to the disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
