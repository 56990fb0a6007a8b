"""A store wrapper that sleeps before each chunk GET: a remote store's round trip, for
benchmarks and tests on a local directory (``KVCDN_TEST_FAULTS=chunk_get_delay_s=0.05``).

Only chunk reads are delayed (the objects a load fetches); manifests, listings and
writes go straight through, so the index and publishes behave as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from vllm_kvcdn.store.base import Store


class LatencyStore(Store):
    def __init__(self, inner: Store, chunk_get_delay_s: float):
        self.inner = inner
        self.delay_s = chunk_get_delay_s
        self.url = inner.url

    def get(self, key: str) -> bytes | None:
        if key.startswith("chunks/"):
            time.sleep(self.delay_s)
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def contains(self, key: str) -> bool:
        return self.inner.contains(key)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def version(self, prefix: str) -> object:
        return self.inner.version(prefix)
