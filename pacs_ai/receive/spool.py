"""Durable storage of received instances, exactly as they were sent.

An instance is written whole to a temporary file on the spool's own
filesystem, linked under its final name, and then the file and the directory
entry are flushed to the disk (``fsync``).  Only then may the index record it
and the listener acknowledge it: after a crash or power loss, every
acknowledged (indexed) instance is on disk whole.

Why link before flushing: the file and its new directory entry must both be
flushed, and each flush waits for a journal commit and a disk cache flush (a
few tenths of a millisecond to milliseconds).  With the name already in place,
the file's fsync commits the journal transaction that also holds the new link
(ext4 and XFS journal all metadata in order), so the directory's fsync that
follows finds little left to do; flushing the file first and linking after
would cost two full rounds for every instance.  On a filesystem without a
journal (ext4 as on the CI machines) there is no shared commit: the
directory's fsync writes the entry itself, and the result is just as durable.  Running the two flushes side
by side in two threads was no faster in the ingest benchmark and cost a thread
hand-over (and the GIL changing hands) per instance.  The price of linking
first is that after a power loss (not a process crash: the page cache holds the
whole file before it is linked) an unindexed name may hold a partial file; such
a name was never acknowledged, and the listener replaces it when the instance
is sent again (see ``StoreHandler._store_over_existing_name``).
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

    def flush(self, path: Path) -> None:
        """Force a fully written file's data to the disk."""
        if self.fsync:
            fsync_file(path)

    def place_new(self, temp_path: Path, final_path: Path) -> bool:
        """Give a completely written temporary file its final name, durably, unless that name exists.

        A hard link creates the name atomically and fails if it is taken, so a
        second copy of an instance can never silently overwrite the first.
        Returns False (and leaves everything as it was) when the name exists.
        If flushing fails, the name is taken back and the error raised.
        """
        created = self._make_dirs(final_path.parent)
        try:
            os.link(temp_path, final_path)
        except FileExistsError:
            return False
        try:
            if self.fsync:
                fsync_file(final_path)
                self._sync_entries(final_path, created)
        except BaseException:
            final_path.unlink(missing_ok=True)
            raise
        return True

    def replace(self, temp_path: Path, final_path: Path) -> None:
        """Atomically and durably put a completely written temporary file in place of ``final_path``."""
        self.flush(temp_path)  # before the rename: the name already holds a good file
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
