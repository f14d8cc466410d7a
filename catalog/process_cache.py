"""What a process loads once and keeps: models, index copies, category heads, open archives.

Each cache loads a value on first use and loads it again when the stamp it was loaded under no
longer matches (a file's size and modification time, a version number): one mechanism, one lock
per cache, and ``clear_all`` to forget everything at once (tests).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_NO_STAMP = object()
_caches: list[ProcessCache] = []


class ProcessCache(Generic[K, V]):
    """Values by key, at most ``size`` of them (the oldest goes first, ``close``d if given)."""

    def __init__(self, name: str, *, size: int | None = None, close: Callable[[V], object] | None = None) -> None:
        self.name = name
        self.size = size
        self._close = close
        self._entries: OrderedDict[K, tuple[object, V]] = OrderedDict()
        self._lock = threading.RLock()
        _caches.append(self)

    def get(self, key: K, load: Callable[[], V], *, stamp: Hashable = _NO_STAMP) -> V:
        """The value for ``key``: ``load()`` on first use, or when ``stamp`` differs from the one it was loaded under."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (stamp is _NO_STAMP or entry[0] == stamp):
                return entry[1]
            value = load()
            self.put(key, value, stamp=stamp)
            return value

    def peek(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            return entry[1] if entry is not None else None

    def put(self, key: K, value: V, *, stamp: Hashable = _NO_STAMP) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None and old[1] is not value:
                self._closing(old[1])
            self._entries[key] = (stamp, value)
            while self.size is not None and len(self._entries) > self.size:
                self._closing(self._entries.popitem(last=False)[1][1])

    def pop(self, key: K) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._closing(entry[1])

    def clear(self) -> None:
        with self._lock:
            for _, value in self._entries.values():
                self._closing(value)
            self._entries.clear()

    def _closing(self, value: V) -> None:
        if self._close is not None:
            self._close(value)

    def __repr__(self) -> str:
        return f"<ProcessCache {self.name}: {len(self._entries)} entries>"


def clear_all() -> None:
    """Forget every cached value of this process (tests, between settings)."""
    for cache in _caches:
        cache.clear()


def file_stamp(path) -> tuple | None:
    """What changes when a file is replaced or rewritten: its inode, modification time and size (None: absent)."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size
