"""Delivering DICOM files into a folder, atomically, for systems that pick files up from a share."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread

from pacs_ai.dispatch.errors import DeliveryError
from pacs_ai.durable import fsync_directory, fsync_file
from pacs_ai.peer_settings import FolderDestination

log = logging.getLogger(__name__)


def copy_files(destination: FolderDestination, paths: Sequence[Path], *, calling_ae_title: str) -> None:
    """Copy each file to ``<folder>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.

    Each copy is written under a temporary name, fsynced and renamed, so a
    reader of the folder never sees a partial file; a later copy of the same
    instance replaces the earlier one.  ``calling_ae_title`` is unused.
    """
    for path in paths:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        target_dir = destination.path / str(header.StudyInstanceUID)
        target = target_dir / f"{header.SOPInstanceUID}.dcm"
        partial = target_dir / f".{header.SOPInstanceUID}.dcm.partial"
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, partial)
            fsync_file(partial)
            os.replace(partial, target)
            fsync_directory(target_dir)
        except OSError as exc:
            with contextlib.suppress(OSError):  # nothing to clean when the folder itself is unusable
                partial.unlink(missing_ok=True)
            raise DeliveryError(f"cannot write {target} ({destination.describe()}): {exc}") from exc
        log.info("copied %s to %s", header.SOPInstanceUID, target_dir)
