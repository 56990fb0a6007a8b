"""Chunk read buffers, allocated and touched once, reused for the worker's life.

A load reads each ~30 MB chunk into a buffer, decodes it in place and copies it into the
KV cache. A fresh buffer per chunk is fresh memory: the allocator hands big blocks back
to the kernel between loads, and the first touch of each new page costs (on the VMs we
measure, ~1.2 s per GiB; a background load that held all 32 buffers of an 8192-token
document at once read its chunks up to 4x slower in an engine's first loads). Reused
buffers are already mapped and touched, and page-aligned (``store.base.aligned_empty``).
For a CUDA cache they are pinned too: the chunk goes to the device in one asynchronous
copy straight from them (``device_copies``).

The pool also bounds read-ahead: a load starts a chunk's read only with a free buffer,
so a document of any length holds at most ``count`` chunks in memory at once.
"""

from __future__ import annotations

import threading
import time

from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.base import PAGE, aligned_empty

logger = get_logger(__name__)


class ReadBuffers:
    def __init__(self, count: int, nbytes: int, pin: bool = False):
        self.count, self.nbytes = count, nbytes
        started = time.perf_counter()
        self._free: list[memoryview] = []
        for _ in range(count):
            # aligned: the kernel's copy into it is ~3x faster
            buffer = _pinned_aligned(nbytes) if pin else aligned_empty(nbytes)
            buffer[:] = bytes(nbytes)  # touch every page now, at start, not during a request's load
            self._free.append(buffer)
        self._available = threading.Condition()
        logger.debug("kvcdn: %d read buffers of %.1f MB ready in %.2fs", count, nbytes / 1e6,
                     time.perf_counter() - started)

    def acquire(self, timeout_s: float | None = 0.0) -> memoryview | None:
        """A free buffer, or None when none frees up within ``timeout_s`` (None: wait on)."""
        with self._available:
            if not self._available.wait_for(lambda: self._free, timeout=timeout_s):
                return None
            return self._free.pop()

    def release(self, buffer: memoryview) -> None:
        """Give ``buffer`` back; nothing may read what it holds after this."""
        with self._available:
            self._free.append(buffer)
            self._available.notify()

    @property
    def free(self) -> int:
        with self._available:
            return len(self._free)


def _pinned_aligned(size: int) -> memoryview:
    """``size`` page-aligned bytes of page-locked (CUDA-pinned) host memory."""
    import torch

    raw = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=True).numpy()
    start = -raw.ctypes.data % PAGE
    return memoryview(raw[start : start + size])
