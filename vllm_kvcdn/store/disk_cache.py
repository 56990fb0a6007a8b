"""A node's disk tier: a read-through cache of chunks in front of a shared store.

Chunks are content-addressed (one key, one content), so a cached copy is never stale;
only its bytes can rot, which the checksum on every load catches (``drop_cached`` then
forgets the copy and the next read goes to the origin). Manifests and listings always go
to the origin: they change, and a deletion there must stop hits everywhere.

Bounded in bytes, least recently used first out, under the node's one disk budget
(``lru``: the worker's block images count against it too); it survives a restart (the
order is rebuilt from the files' mtimes, which every hit refreshes). Several workers of
one node may share a directory: writes are atomic, and each keeps its own bound.
"""

from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path

from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.base import Store, StoreError, StoreWrapper
from vllm_kvcdn.store.file import FileStore
from vllm_kvcdn.store.keys import CHUNK_PREFIX
from vllm_kvcdn.store.lru import DiskLRU

logger = get_logger(__name__)

_TAG = "disk:"  # this tier's keys in the node's disk budget


class DiskCachedStore(StoreWrapper):
    """Chunks through the disk tier; everything else straight to the origin (``inner``)."""

    def __init__(self, origin: Store, directory: str | os.PathLike, capacity_bytes: int = 0,
                 budget: DiskLRU | None = None):
        """``budget``: shared with the node's other disk tiers (``lru``); else one of
        ``capacity_bytes`` of its own."""
        super().__init__(origin)
        self.cache = FileStore(directory, durable=False)  # a lost copy is read again
        self.budget = budget if budget is not None else DiskLRU(capacity_bytes)
        self._count_lock = threading.Lock()
        self.hits = self.misses = 0
        self.budget.restore((info.modified, _TAG + info.key, info.size, partial(self.cache.delete, info.key))
                            for info in self.cache.scan(CHUNK_PREFIX))
        logger.info("kvcdn: disk tier %s: %.2f of %.2f GiB of the node's disk budget in use, in front of %s",
                    self.cache.root, self.budget.nbytes / 2**30, self.budget.capacity_bytes / 2**30, origin.url)

    def get(self, key: str, into: memoryview | None = None) -> bytes | bytearray | memoryview | None:
        if not key.startswith(CHUNK_PREFIX):
            return self.inner.get(key, into)
        data = self.cache.get(key, into) if _TAG + key in self.budget else None
        if data is not None:
            self._touch(key)
            return data
        with self._count_lock:
            self.misses += 1
        data = self.inner.get(key, into)
        if data is not None:
            self._admit(key, data)
        return data

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        if key.startswith(CHUNK_PREFIX):
            self._admit(key, data)  # the publishing node reads its documents first

    def put_if_absent(self, key: str, data: bytes) -> bool:
        written = self.inner.put_if_absent(key, data)  # how a publish writes its chunks
        if written and key.startswith(CHUNK_PREFIX):
            self._admit(key, data)  # as ``put``: its RAM tier serves them until a restart, then this
        return written

    def delete(self, key: str) -> bool:
        self.drop_cached(key)
        return self.inner.delete(key)

    def drop_cached(self, key: str) -> bool:
        held = self.budget.discard(_TAG + key) is not None
        return self.cache.delete(key) or held

    def tier_counts(self) -> dict[str, int]:
        return {"disk_tier_hits": self.hits, "disk_tier_misses": self.misses}

    def disk_budget(self) -> DiskLRU:
        return self.budget

    # -- bookkeeping -------------------------------------------------------------------

    def _touch(self, key: str) -> None:
        with self._count_lock:
            self.hits += 1
        self.budget.touch(_TAG + key)
        try:
            os.utime(self.cache.local_path(key))  # the order survives a restart
        except OSError:
            pass  # evicted meanwhile

    def _admit(self, key: str, data) -> None:
        if not self.budget.fits(len(data)):
            return
        try:
            self.cache.put(key, data)
        except StoreError as e:  # a full or broken cache disk costs speed, never a read
            logger.warning("kvcdn: disk tier cannot keep %s: %s", key, e)
            return
        self.budget.add(_TAG + key, len(data), partial(self.cache.delete, key))

    @property
    def directory(self) -> Path:
        return self.cache.root
