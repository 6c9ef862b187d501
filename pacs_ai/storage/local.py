"""A local folder as the storage: the embedded default, or a mount every host shares (``file://``).

With ``storage_url`` unset the storage is the data directory itself:
``instances/...`` keys live in the listener's spool (``data_dir/spool``) and
``results/...`` in ``data_dir/results``, exactly where they always were, so
the embedded setup copies nothing.  Writes go to a temporary name in the
target's directory, are fsynced and renamed, so a reader never sees half an
object and a written object survives a power loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from pacs_ai.durable import fsync_directory
from pacs_ai.storage.base import StorageBucketMissing, StorageError, StorageKeyMissing, check_key

__all__ = ["LocalFolderStorage", "write_atomically"]


class LocalFolderStorage:
    """Objects as files under ``root``; ``folders`` puts some top-level prefixes elsewhere."""

    def __init__(self, root: Path, *, folders: Mapping[str, Path] | None = None, fsync: bool = True) -> None:
        self.root = root
        self.folders = dict(folders or {})
        self.fsync = fsync
        self.description = f"local folder {root}"

    def local_path(self, key: str) -> Path:
        top, _, rest = check_key(key).partition("/")
        if top in self.folders:
            return self.folders[top] / rest if rest else self.folders[top]
        return self.root / key

    def put_file(self, key: str, path: Path) -> None:
        target = self.local_path(key)
        with contextlib.suppress(FileNotFoundError):
            if target.samefile(path):  # the embedded spool is the storage: nothing to copy
                return
        with open(path, "rb") as source:
            self._write(target, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(self.local_path(key), lambda handle: handle.write(data))

    def get_file(self, key: str, destination: Path) -> None:
        source = self.local_path(key)
        try:
            with open(source, "rb") as handle:
                write_atomically(
                    destination, lambda out: shutil.copyfileobj(handle, out, 1 << 20), fsync=False
                )
        except FileNotFoundError as exc:
            raise StorageKeyMissing(f"{key} is not in {self.description}") from exc

    def get_files(self, items: Sequence[tuple[str, Path]]) -> None:
        for key, destination in items:  # local copies: nothing to wait for in parallel
            self.get_file(key, destination)

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Remove the files of ``keys`` (a missing one counts as removed); key -> why, for the others."""
        failed: dict[str, str] = {}
        for key in keys:
            try:
                self.delete(key)
            except OSError as exc:
                failed[key] = f"cannot delete a file in {self.description}: {exc.strerror or exc}"
            except ValueError as exc:  # not a key (a host path recorded before keys): never deleted here
                failed[key] = str(exc)
        return failed

    def list(self, prefix: str = "") -> Iterator[str]:
        tops = [prefix.partition("/")[0]] if "/" in prefix else [*self.folders, *self._root_entries()]
        for top in dict.fromkeys(tops):
            base = self.folders.get(top, self.root / top)
            for directory, _, files in os.walk(base):
                relative = os.path.relpath(directory, base)
                for name in files:
                    key = f"{top}/{name}" if relative == "." else f"{top}/{relative}/{name}"
                    if key.startswith(prefix) and not name.startswith(".") and name != "tmp":
                        yield key

    def start_threads(self, setup: Callable[[], None]) -> None:
        """Nothing to start: files are copied on the callers' threads."""

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageBucketMissing(f"{self.description} does not exist; create it or fix storage_url")
        probe = f"check/{uuid.uuid4().hex}"
        try:
            self.put_bytes(probe, b"pacs-ai storage check")
            if self.local_path(probe).read_bytes() != b"pacs-ai storage check":
                raise StorageError(f"{self.description} returned other bytes than were written")
        except OSError as exc:
            raise StorageError(f"{self.description} cannot be written: {exc}") from exc
        finally:
            self.delete(probe)

    def _root_entries(self) -> Sequence[str]:
        return [entry.name for entry in os.scandir(self.root) if entry.is_dir()] if self.root.is_dir() else []

    def _write(self, target: Path, fill: Callable[[BinaryIO], object]) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, fill, fsync=self.fsync)
        except OSError as exc:
            raise StorageError(f"cannot write {target} in {self.description}: {exc}") from exc


def write_atomically(target: Path, fill: Callable[[BinaryIO], object], *, fsync: bool) -> None:
    """Create ``target`` whole or not at all: a temporary file filled by ``fill(handle)``, then renamed."""
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            fill(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(target.parent)
