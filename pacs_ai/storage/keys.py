"""Storage keys of received instances and of results, and where the receiver's spool keeps them.

Keys are the same on every host: ``instances/<study>/<series>/<sop>.dcm`` for a
received instance, ``results/<study>/<sop>.dcm`` for a SEG or SR pacs-ai made.
The listener writes each instance to its local spool first (the spool's
layout is the key's without ``instances/``); the uploader then puts it in the
storage under the same key (see :mod:`pacs_ai.receive.uploader`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["INSTANCES", "RESULTS", "instance_key", "result_key", "spool_key", "spool_path"]

#: Top-level prefixes of the keys pacs-ai writes.
INSTANCES = "instances"
RESULTS = "results"


def instance_key(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """The key of a received instance."""
    return f"{INSTANCES}/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"


def result_key(study_uid: str, sop_instance_uid: str) -> str:
    """The key of a result object (SEG, SR) of a study."""
    return f"{RESULTS}/{study_uid}/{sop_instance_uid}.dcm"


def spool_key(spool_root: Path, path: Path) -> str:
    """The key of the instance filed at ``path`` in the spool at ``spool_root``.

    String slicing rather than ``Path.relative_to``: the listener calls this
    for every instance it receives.
    """
    root, text = str(spool_root), str(path)
    if not text.startswith(root + "/"):
        raise ValueError(f"{path} is not in the spool {spool_root}")
    return f"{INSTANCES}/{text[len(root) + 1 :]}"


def spool_path(spool_root: Path, key: str) -> Path:
    """Where the receiver's spool at ``spool_root`` keeps the instance of ``key``.

    A legacy absolute path (a row written before keys) is returned as it is.
    """
    if key.startswith("/"):
        return Path(key)
    prefix = INSTANCES + "/"
    if not key.startswith(prefix):
        raise ValueError(f"{key!r} is not the key of a received instance")
    return spool_root / key[len(prefix) :]
