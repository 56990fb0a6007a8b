"""A store wrapper that sleeps before each chunk GET: a remote store's round trip, for
benchmarks and tests on a local directory (``KVCDN_TEST_FAULTS=chunk_get_delay_s=0.05``).

Only chunk reads are delayed (the objects a load fetches); manifests, listings and
writes go straight through, so the index and publishes behave as before.
"""

from __future__ import annotations

import time

from vllm_kvcdn.store.base import Store, StoreWrapper
from vllm_kvcdn.store.keys import CHUNK_PREFIX


class LatencyStore(StoreWrapper):
    def __init__(self, inner: Store, chunk_get_delay_s: float):
        super().__init__(inner)
        self.delay_s = chunk_get_delay_s

    def get(self, key: str, into: memoryview | None = None) -> bytes | bytearray | memoryview | None:
        if key.startswith(CHUNK_PREFIX):
            time.sleep(self.delay_s)
        return self.inner.get(key, into)
