"""The spool's files for incoming data sets: unnamed until stored, never left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacs_ai.receive.spool import Spool


@pytest.fixture(params=["unnamed", "named"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    if request.param == "unnamed":
        assert spool.unnamed_files, "O_TMPFILE should work on this machine's filesystem"
    else:
        spool.unnamed_files = False  # the fallback for filesystems without O_TMPFILE
    return spool


def _receive(spool: Spool, data: bytes):  # type: ignore[no-untyped-def]
    incoming = spool.create_incoming()
    os.write(incoming.descriptor, data)
    return incoming


def test_a_stored_file_has_its_final_name_only(spool: Spool) -> None:
    final = spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    incoming = _receive(spool, b"instance")
    assert incoming.named is not spool.unnamed_files
    assert spool.place_new(incoming.path, final)
    incoming.discard()
    assert final.read_bytes() == b"instance"
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_name_taken_already_is_not_overwritten_and_replace_swaps_it(spool: Spool) -> None:
    final = spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    first = _receive(spool, b"first copy")
    assert spool.place_new(first.path, final)
    first.discard()

    second = _receive(spool, b"second copy")
    assert not spool.place_new(second.path, final)
    assert final.read_bytes() == b"first copy"
    spool.replace(second.path, final)
    second.discard()
    assert final.read_bytes() == b"second copy"
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_refused_file_leaves_nothing(spool: Spool) -> None:
    incoming = _receive(spool, b"refused")
    assert incoming.path.read_bytes() == b"refused"  # readable back while it is open
    # An unnamed file has no name in the temporary directory at all while it is received.
    assert list(spool.tmp_dir.iterdir()) == ([incoming.path] if incoming.named else [])
    incoming.discard()
    assert list(spool.tmp_dir.iterdir()) == []
    assert not list(spool.root.rglob("*.dcm"))


def test_a_placed_file_and_the_folders_naming_it_are_flushed(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync reaches the file itself (through its open descriptor when unnamed) and each new folder."""
    flushed: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        status = os.fstat(descriptor)
        flushed.append((status.st_dev, status.st_ino))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)  # records, then flushes for real
    final = spool.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    incoming = _receive(spool, b"instance")
    assert spool.place_new(incoming.path, final)
    incoming.discard()

    def identity(path: Path) -> tuple[int, int]:
        return path.stat().st_dev, path.stat().st_ino

    # The file first, then the series folder holding its name and the folders naming the new ones.
    assert flushed[0] == identity(final)
    assert sorted(flushed[1:]) == sorted(identity(folder) for folder in final.parents[:3])
