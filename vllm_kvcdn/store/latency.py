"""A store wrapper that sleeps before each chunk GET: a remote store's round trip, for
benchmarks and tests on a local directory (``KVCDN_TEST_FAULTS=chunk_get_delay_s=0.05``,
or ``chunk_get_delay_file=PATH``: the seconds written in that file, read at every GET, so
a test can slow a running engine's store step by step and heal it).

Only chunk reads are delayed (the objects a load fetches); manifests, listings and
writes go straight through, so the index and publishes behave as before.
"""

from __future__ import annotations

import time
from pathlib import Path

from vllm_kvcdn.store.base import Store, StoreWrapper
from vllm_kvcdn.store.keys import CHUNK_PREFIX


class LatencyStore(StoreWrapper):
    def __init__(self, inner: Store, chunk_get_delay_s: float = 0.0, delay_file: str | None = None):
        super().__init__(inner)
        self.delay_s = chunk_get_delay_s
        self.delay_file = Path(delay_file) if delay_file else None

    def get(self, key: str, into: memoryview | None = None) -> bytes | bytearray | memoryview | None:
        if key.startswith(CHUNK_PREFIX):
            time.sleep(self._delay())
        return self.inner.get(key, into)

    def _delay(self) -> float:
        if self.delay_file is None:
            return self.delay_s
        try:
            return float(self.delay_file.read_text() or 0)
        except (OSError, ValueError):
            return 0.0
