"""Deterministic DICOM UIDs for the objects pacs-ai creates.

A job may run more than once for the same input: the broker redelivers a task
whose worker died, an administrator replays a failed delivery, a study is
re-analysed after a restart.  If every run minted fresh random UIDs, each run
would add another SEG and SR series to the patient's study in the PACS, and a
radiologist would see duplicates that disagree only in their identities.  When
the UIDs are instead a pure function of what identifies the result (source
series, profile, algorithm and version, object role), a re-run re-creates the
same Series and SOP Instance UIDs and the PACS replaces (or ignores) the
instances it already holds instead of duplicating them.

Two forms are produced, both valid per PS3.5 section 9 and Annex B:

* with an organisational root (``prefix``): ``<prefix><decimal of SHA-512>``,
  via :func:`pydicom.uid.generate_uid` with ``entropy_srcs``, truncated to 64
  characters;
* without one: ``2.25.<integer of a name-based (SHA-1, version 5) UUID>``, the
  UUID-derived form of PS3.5 B.2.  :func:`pydicom.uid.generate_uid` ignores
  ``entropy_srcs`` when ``prefix`` is ``None`` and returns a random UUID UID,
  so this form is built here.
"""

from __future__ import annotations

import json
import uuid

from pydicom.uid import UID, generate_uid

__all__ = ["derived_uid"]

#: Namespace of the name-based UUIDs; a constant so UIDs never change between
#: releases (changing it would break overwrite-on-redelivery).
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-ai:derived-uid")


def _entropy(parts: tuple[str, ...]) -> str:
    """Encode the parts unambiguously.

    pydicom concatenates ``entropy_srcs`` without a separator, so ``("ab", "c")``
    and ``("a", "bc")`` would collide; a JSON array keeps the boundaries.
    """
    return json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))


def _normalise_prefix(prefix: str) -> str:
    """Return ``prefix`` with the trailing dot pydicom expects."""
    return prefix if prefix.endswith(".") else prefix + "."


def derived_uid(*parts: str, prefix: str | None = None) -> str:
    """Return a UID that depends only on ``parts`` (and ``prefix``).

    Parameters
    ----------
    *parts:
        Strings that together identify the object, e.g. the source Series
        Instance UID, the profile name, the algorithm name and version and the
        role (``"seg-series"``, ``"seg-instance"``, ...).  Order matters.
    prefix:
        Organisational UID root (with or without the trailing dot, at most 54
        characters with it).  ``None`` gives a UUID-derived ``2.25.`` UID.

    Returns
    -------
    str
        A valid DICOM UID of at most 64 characters.

    Raises
    ------
    ValueError
        If no part is given, a part is not a string, or ``prefix`` is not a
        valid UID root.
    """
    if not parts:
        raise ValueError("derived_uid() needs at least one part that identifies the object")
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise ValueError(
                f"derived_uid() part {index} is {type(part).__name__}, not str; "
                "convert numbers explicitly (e.g. str(segment_number)) so the encoding is stable"
            )
    entropy = _entropy(parts)

    if prefix is None:
        name_based = uuid.uuid5(_UUID_NAMESPACE, entropy)
        return str(UID(f"2.25.{name_based.int}"))

    root = _normalise_prefix(prefix)
    try:
        return str(generate_uid(prefix=root, entropy_srcs=[entropy]))
    except ValueError as exc:
        raise ValueError(
            f"Invalid UID prefix {prefix!r}: {exc}. Use dot-separated numbers without "
            "leading zeros, at most 54 characters including the trailing dot "
            "(setting 'uid_prefix'), or leave it unset for 2.25 UUID-derived UIDs."
        ) from exc
