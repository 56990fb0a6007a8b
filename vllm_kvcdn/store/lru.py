"""One byte budget for a node's disk tiers, least recently used first out.

The disk tier of chunks (``disk_cache``) and the worker's block images
(``connector/image_tier``) keep files under one ``disk_cache_gib``: they share one
``DiskLRU``. Each entry names how to remove its file, so whichever tier admits a file
evicts the least recently used file of any tier. Keys are the tiers' own, prefixed by
the tier so they never collide. The order survives a restart: each tier hands its files
with their mtimes to ``restore`` (every hit refreshes a file's mtime), and the entries of
all tiers are put back in that order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Entry:
    size: int
    remove: Callable[[], None]  # deletes the file (and the tier's record of it); must not raise
    used: float = 0.0  # mtime-like: only for ordering in ``restore``


class DiskLRU:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def fits(self, size: int) -> bool:
        return size <= self.capacity_bytes

    def restore(self, files: Iterable[tuple[float, str, int, Callable[[], None]]]) -> None:
        """Files found on disk at start: (mtime, key, size, remove); merged with the other
        tiers' by mtime, then the budget is enforced."""
        with self._lock:
            merged = [(e.used, k, e.size, e.remove) for k, e in self._entries.items()] + list(files)
            merged.sort(key=lambda f: f[0])
            self._entries = OrderedDict((k, _Entry(size, remove, used)) for used, k, size, remove in merged)
            self._bytes = sum(e.size for e in self._entries.values())
        self._evict()

    def add(self, key: str, size: int, remove: Callable[[], None]) -> None:
        """A file just written (the most recently used); older files go while over budget."""
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += size - (old.size if old else 0)
            self._entries[key] = _Entry(size, remove)
        self._evict()

    def touch(self, key: str) -> bool:
        """Mark a file used now; whether it is held."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            return True

    def discard(self, key: str) -> int | None:
        """Forget a file its tier removed itself; its size, or None if not held."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._bytes -= entry.size
            return entry.size

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.capacity_bytes or not self._entries:
                    return
                _, entry = self._entries.popitem(last=False)
                self._bytes -= entry.size
            entry.remove()  # outside the lock: a tier's remove takes its own
