"""A node's disk tier: a read-through cache of chunks in front of a shared store.

Chunks are content-addressed (one key, one content), so a cached copy is never stale;
only its bytes can rot, which the checksum on every load catches (``drop_cached`` then
forgets the copy and the next read goes to the origin). Manifests and listings always go
to the origin: they change, and a deletion there must stop hits everywhere.

Bounded in bytes, least recently used first out; it survives a restart (the order is
rebuilt from the files' mtimes, which every hit refreshes). Several workers of one node
may share a directory: writes are atomic, and each keeps its own bound.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.base import Store, StoreError, StoreWrapper
from vllm_kvcdn.store.file import FileStore
from vllm_kvcdn.store.keys import CHUNK_PREFIX

logger = get_logger(__name__)


class DiskCachedStore(StoreWrapper):
    """Chunks through the disk tier; everything else straight to the origin (``inner``)."""

    def __init__(self, origin: Store, directory: str | os.PathLike, capacity_bytes: int):
        super().__init__(origin)
        self.cache = FileStore(directory, durable=False)  # a lost copy is read again
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        for info in sorted(self.cache.scan(CHUNK_PREFIX), key=lambda i: i.modified):
            self._lru[info.key] = info.size
        self._bytes = sum(self._lru.values())
        self.hits = self.misses = 0
        self._evict()
        logger.info("kvcdn: disk tier %s: %d chunks, %.2f of %.2f GiB, in front of %s", self.cache.root,
                    len(self._lru), self._bytes / 2**30, capacity_bytes / 2**30, origin.url)

    def get(self, key: str, into: memoryview | None = None) -> bytes | bytearray | memoryview | None:
        if not key.startswith(CHUNK_PREFIX):
            return self.inner.get(key, into)
        data = self.cache.get(key, into) if key in self._lru else None
        if data is not None:
            self._touch(key)
            return data
        with self._lock:
            self.misses += 1
        data = self.inner.get(key, into)
        if data is not None:
            self._admit(key, data)
        return data

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        if key.startswith(CHUNK_PREFIX):
            self._admit(key, data)  # the publishing node reads its documents first

    def delete(self, key: str) -> bool:
        self.drop_cached(key)
        return self.inner.delete(key)

    def drop_cached(self, key: str) -> bool:
        with self._lock:
            size = self._lru.pop(key, None)
            if size is not None:
                self._bytes -= size
        return self.cache.delete(key) or size is not None

    def tier_counts(self) -> dict[str, int]:
        return {"disk_tier_hits": self.hits, "disk_tier_misses": self.misses}

    # -- bookkeeping -------------------------------------------------------------------

    def _touch(self, key: str) -> None:
        with self._lock:
            self.hits += 1
            if key in self._lru:
                self._lru.move_to_end(key)
        try:
            os.utime(self.cache.local_path(key))  # the order survives a restart
        except OSError:
            pass  # evicted meanwhile

    def _admit(self, key: str, data) -> None:
        if len(data) > self.capacity_bytes:
            return
        try:
            self.cache.put(key, data)
        except StoreError as e:  # a full or broken cache disk costs speed, never a read
            logger.warning("kvcdn: disk tier cannot keep %s: %s", key, e)
            return
        with self._lock:
            self._bytes += len(data) - self._lru.pop(key, 0)
            self._lru[key] = len(data)
        self._evict()

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.capacity_bytes or not self._lru:
                    return
                key, size = self._lru.popitem(last=False)
                self._bytes -= size
            self.cache.delete(key)

    @property
    def directory(self) -> Path:
        return self.cache.root
