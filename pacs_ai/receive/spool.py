"""Durable storage of received instances, exactly as they were sent.

An instance is written to a temporary file on the spool's own filesystem,
flushed to the disk (``fsync``), renamed into place and the directory entry
flushed too.  Only then may the index record it and the listener acknowledge
it: after a crash or power loss, every acknowledged instance is on disk whole,
and a half-written file is never visible under its final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydicom.uid import UID

from pacs_ai.durable import fsync_directory, fsync_file


class UnsafeIdentifier(ValueError):
    """A UID that is not safe or valid to use as a path component."""


def _check_uid(uid: str, what: str) -> str:
    if not UID(uid).is_valid:
        raise UnsafeIdentifier(f"{what} {uid!r} is not a valid DICOM UID")
    return uid


class Spool:
    """The directory tree holding accepted instances: ``study/series/sop.dcm``."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.fsync = fsync
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; raises :class:`UnsafeIdentifier` for bad UIDs."""
        return (
            self.root
            / _check_uid(study_uid, "StudyInstanceUID")
            / _check_uid(series_uid, "SeriesInstanceUID")
            / f"{_check_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm"
        )

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def flush(self, temp_path: Path) -> None:
        """Force a fully written temporary file's data to the disk."""
        if self.fsync:
            fsync_file(temp_path)

    def place_new(self, temp_path: Path, final_path: Path) -> bool:
        """Give a flushed temporary file its final name unless that name exists.

        A hard link creates the name atomically and fails if it is taken, so a
        second copy of an instance can never silently overwrite the first.
        Returns False (and leaves everything as it was) when the name exists.
        """
        created = self._make_dirs(final_path.parent)
        try:
            os.link(temp_path, final_path)
        except FileExistsError:
            return False
        self._sync_entries(final_path, created)
        return True

    def replace(self, temp_path: Path, final_path: Path) -> None:
        """Atomically put a flushed temporary file in place of ``final_path``."""
        created = self._make_dirs(final_path.parent)
        os.replace(temp_path, final_path)
        self._sync_entries(final_path, created)

    def _sync_entries(self, final_path: Path, created: list[Path]) -> None:
        if self.fsync:
            fsync_directory(final_path.parent)
            for directory in created:
                fsync_directory(directory.parent)

    def _make_dirs(self, directory: Path) -> list[Path]:
        """Create missing directories, returning those created (outermost first)."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
        return list(reversed(missing))
