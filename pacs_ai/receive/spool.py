"""Durable storage of received instances, exactly as they were sent.

An instance is written whole to a new file on the spool's own filesystem
(unnamed, ``O_TMPFILE``, where possible: see :meth:`Spool.create_incoming`),
linked under its final name, and then the file and the directory entry are
flushed to the disk (``fsync``).  Only then may the index record it
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

import errno
import functools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from pacs_ai.durable import fsync_directory, fsync_file
from pacs_ai.receive.headers import is_valid_uid


class UnsafeIdentifier(ValueError):
    """A UID that is not safe or valid to use as a path component."""


def _check_uid(uid: str, what: str) -> str:
    if not is_valid_uid(uid):
        raise UnsafeIdentifier(f"{what} {uid!r} is not a valid DICOM UID")
    return uid


@dataclass(frozen=True)
class IncomingFile:
    """An empty file, open for writing, for a data set about to be received.

    ``path`` names it for :meth:`Spool.place_new` and for reading it back.
    An unnamed file (``named`` False, see :meth:`Spool.create_incoming`) is
    reached through ``/proc/self/fd`` only while ``descriptor`` is open, and
    vanishes when it is closed unless it was linked.
    """

    descriptor: int
    path: Path
    named: bool

    def discard(self) -> None:
        """Close the descriptor and drop the temporary name, if any (a linked name stays)."""
        os.close(self.descriptor)
        if self.named:
            self.path.unlink(missing_ok=True)


class Spool:
    """The directory tree holding accepted instances: ``study/series/sop.dcm``."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.fsync = fsync
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @functools.cached_property
    def unnamed_files(self) -> bool:
        """Whether :meth:`create_incoming` makes unnamed files; probed at its first call only,
        so spools that never receive (the admin CLI's, say) leave the filesystem alone."""
        return _unnamed_files_work(self.tmp_dir)

    def create_incoming(self) -> IncomingFile:
        """A new empty file on the spool's filesystem for a data set being received.

        Unnamed (``O_TMPFILE``) where the kernel and filesystem allow it: the
        received file then gets its one name when :meth:`place_new` links it,
        with no temporary name to create and unlink, and nothing left behind
        by a crash.  Creating and unlinking names in one temporary directory
        also serialised the listener processes on that directory's lock
        (seen in ``perf``: the unlinks spinning while a create allocated its
        inode).  Elsewhere, a named file in :attr:`tmp_dir`.
        """
        if self.unnamed_files:
            descriptor = os.open(self.tmp_dir, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            return IncomingFile(descriptor, Path(f"/proc/self/fd/{descriptor}"), named=False)
        descriptor, name = tempfile.mkstemp(suffix=".dcm", dir=self.tmp_dir)
        return IncomingFile(descriptor, Path(name), named=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; raises :class:`UnsafeIdentifier` for bad UIDs."""
        return self.root.joinpath(  # one path parse, not three (once per received instance)
            _check_uid(study_uid, "StudyInstanceUID"),
            _check_uid(series_uid, "SeriesInstanceUID"),
            f"{_check_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm",
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
            self._link(temp_path, final_path)
        except FileExistsError:
            return False
        try:
            if self.fsync:
                self._flush_linked(temp_path, final_path)
                self._sync_entries(final_path, created)
        except BaseException:
            final_path.unlink(missing_ok=True)
            raise
        return True

    def replace(self, temp_path: Path, final_path: Path) -> None:
        """Atomically and durably put a completely written temporary file in place of ``final_path``.

        An unnamed file (:meth:`create_incoming`) cannot be renamed: it is
        first linked under a temporary name in :attr:`tmp_dir`, which the
        rename then takes away.
        """
        self.flush(temp_path)  # before the rename: the name already holds a good file
        created = self._make_dirs(final_path.parent)
        if _open_descriptor(temp_path) is not None:
            staged = self.tmp_dir / f"{uuid.uuid4().hex}.dcm"
            self._link(temp_path, staged)
            temp_path = staged
        os.replace(temp_path, final_path)
        self._sync_entries(final_path, created)

    def _flush_linked(self, temp_path: Path, final_path: Path) -> None:
        """Force the file just linked as ``final_path`` to the disk.

        An unnamed file is still open, and its ``/proc/self/fd`` path names the
        descriptor: it is flushed through that rather than opened again.
        """
        descriptor = _open_descriptor(temp_path)
        if descriptor is not None:
            os.fsync(descriptor)
        else:
            fsync_file(final_path)

    def _link(self, source: Path, target: Path) -> None:
        """A new name ``target`` for ``source``; FileExistsError if it is taken."""
        descriptor = _open_descriptor(source)
        if descriptor is not None:
            _link_descriptor(descriptor, target)
        else:
            os.link(source, target)

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


_PROC_FDS = Path("/proc/self/fd")


def _open_descriptor(path: Path) -> int | None:
    """The descriptor an unnamed file's ``/proc/self/fd`` path names; None for a named file."""
    return int(path.name) if path.parent == _PROC_FDS else None


def _link_descriptor(descriptor: int, target: Path) -> None:
    """Give the file open as ``descriptor`` (unnamed or not) the name ``target``.

    ``os.link("/proc/self/fd/N", target)`` would call link(), which links the
    /proc symbolic link itself (EXDEV); linkat() with AT_SYMLINK_FOLLOW, reached
    through a descriptor of the /proc directory, links the file.
    """
    process_fds = os.open(_PROC_FDS, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(descriptor), target, src_dir_fd=process_fds, follow_symlinks=True)
    finally:
        os.close(process_fds)


def _unnamed_files_work(directory: Path) -> bool:
    """Whether an ``O_TMPFILE`` file made in ``directory`` can be written and then linked.

    Tried once per spool, when it first receives (:attr:`Spool.unnamed_files`):
    the kernel, the filesystem and a mounted ``/proc`` have to allow it.
    """
    try:
        descriptor = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return False
        raise
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        os.write(descriptor, b"probe")
        _link_descriptor(descriptor, probe)
    except OSError:
        return False
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)
    return True
