"""Writing result objects to disk so a crash never leaves a half-written file behind.

The dispatcher sends whatever it finds in the results directory; a truncated
SEG sent to a PACS is worse than none.  So each file is written to a temporary
name in the same directory, flushed and fsynced, then renamed over the final
name (atomic on POSIX), and the directory is fsynced so the rename survives a
power loss.

The bytes are pydicom's ``save_as(..., enforce_file_format=True)``; for the
Explicit VR Little Endian objects pacs-ai builds they are produced by
:mod:`pacs_ai.encode.explicit_le`, several times faster and identical.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from pydicom import Dataset

from pacs_ai.durable import fsync_directory
from pacs_ai.encode.explicit_le import encode_file

__all__ = ["write_dataset"]


def write_dataset(ds: Dataset, path: Path | str, *, fsync: bool = True) -> Path:
    """Atomically write ``ds`` as a DICOM Part 10 file at ``path``.

    The file is created owner-read/write only (``tempfile.mkstemp``): results
    carry patient data, and the dispatcher runs as the same user.

    Parameters
    ----------
    ds:
        A dataset with ``file_meta`` (highdicom objects have it).
    path:
        Final location; its directory must exist.  An existing file is replaced.
    fsync:
        Flush file and directory to stable storage (only tests of throwaway
        data should turn this off, as with the ``fsync`` setting).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileNotFoundError
        If the target directory does not exist.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"Cannot write {target}: directory {directory} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            parts = encode_file(ds)
            if parts is None:
                ds.save_as(handle, enforce_file_format=True)
            else:
                handle.writelines(parts)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    if fsync:
        fsync_directory(directory)
    return target
