"""A per-process cache of loaded models, bounded by memory, least recently used out first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ModelCache(Generic[T]):
    """Keeps models warm between jobs of one worker process.

    Keys are ``(model name, manifest sha256)``: re-registering a model under the
    same name gives a new key, and loading it drops the older entries of that
    name.  ``size_of`` estimates an entry's memory; after each load the least
    recently used entries are evicted until the total fits ``budget_bytes``.
    The entry just loaded always stays, even when it alone exceeds the budget
    (it is needed now; it is the first to go when the next model loads).
    """

    def __init__(self, budget_bytes: int, size_of: Callable[[T], int]) -> None:
        self.budget_bytes = budget_bytes
        self.size_of = size_of
        self._entries: OrderedDict[tuple[str, str], tuple[T, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[str, str]]:
        """Keys from least to most recently used."""
        return list(self._entries)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def get(self, key: tuple[str, str], load: Callable[[], T]) -> T:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        for stale in [k for k in self._entries if k[0] == key[0]]:
            del self._entries[stale]
        value = load()
        self._entries[key] = (value, self.size_of(value))
        while self.total_bytes > self.budget_bytes and len(self._entries) > 1:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
