"""How a load job's copies reach the KV cache's device.

On a CPU engine the cache is host memory: nothing moves. On CUDA, a chunk's K/V (every
layer's, decoded in place in a pinned read buffer) go to the device in **one**
host-to-device copy of the bytes they view, not one per layer; the slots go once per
chunk; the per-layer scatter into the cache then runs on the device. A load job runs its
copies on a side stream of its own thread, ordered after the engine's work already
queued (blocks a finished request gave back may still be read by it), and waits for them
before the job reports the load done and before its pinned buffer is reused: vLLM
schedules the request, and so reads those blocks on its own stream, only after that.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CacheDevice:
    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.moves = device.type != "cpu"  # whether K/V and slots must be copied to the cache's device
        self._streams = threading.local()

    @contextmanager
    def side_stream(self) -> Iterator[None]:
        """Run the block's device work on this thread's side stream; wait for it at the end."""
        if not self.is_cuda:
            yield
            return
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.default_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            stream.synchronize()

    def upload(self, tensors: list[torch.Tensor], buffer: memoryview | None) -> list[torch.Tensor]:
        """``tensors`` on the device. Where they all view ``buffer`` (a pinned read buffer),
        one copy of the span they cover; else one copy each."""
        if not self.moves:
            return tensors
        span = _span_in(tensors, buffer)
        if span is None:
            return [t.to(self.device, non_blocking=True) for t in tensors]
        host, lo, hi = span
        on_device = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
        on_device.copy_(host[lo:hi], non_blocking=True)
        base = host.data_ptr() + lo
        return [on_device[t.data_ptr() - base:][: t.nbytes].view(t.dtype).view(t.shape) for t in tensors]

    def upload_view(self, view: torch.Tensor) -> torch.Tensor:
        """A strided host view (a RAM-tier image) on the device: one copy of the storage
        span it covers, viewed with the same strides there."""
        if not self.moves:
            return view
        last = sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()))
        whole = torch.empty(0, dtype=view.dtype).set_(view.untyped_storage())
        span = whole[view.storage_offset() : view.storage_offset() + last + 1]
        return span.to(self.device, non_blocking=True).as_strided(view.shape, view.stride())

    def index(self, index: torch.Tensor) -> torch.Tensor:
        """Slots or block ids on the cache's device (once per chunk, not per layer)."""
        return index.to(self.device, non_blocking=True) if self.moves else index


def _span_in(tensors: list[torch.Tensor], buffer: memoryview | None):
    """(the buffer as a tensor, the byte range [lo, hi) the tensors cover), or None when
    one of them is not a contiguous view into it."""
    if buffer is None or not tensors:
        return None
    host = torch.frombuffer(buffer, dtype=torch.uint8)
    start, end = host.data_ptr(), host.data_ptr() + host.numel()
    if not all(t.is_contiguous() and start <= t.data_ptr() and t.data_ptr() + t.nbytes <= end for t in tensors):
        return None
    lo = min(t.data_ptr() for t in tensors) - start
    hi = max(t.data_ptr() + t.nbytes for t in tensors) - start
    return host, lo, hi
