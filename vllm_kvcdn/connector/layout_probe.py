"""A startup check that our layout reads and writes what the engine's own op does.

Our layouts follow vLLM's definitions, but a build of vLLM, a backend or an ISA we have
not seen could pack the cache otherwise; a wrong guess would load KV into the wrong
places and answer wrongly without a sound. So at start the worker writes known K/V
through the engine's cache-write op into a scratch copy of two blocks (same shape and
strides as the real cache: the real one is never touched), reads them back with our
layout, and writes them with our layout into a second scratch: both must match bit for
bit. A mismatch turns loads and publishes off (counted misses, the engine computes).
"""

from __future__ import annotations

import torch

from vllm_kvcdn.connector.kv_layout import PagedKVLayout


def probe_layout(layout: PagedKVLayout, cache: torch.Tensor, *, num_kv_heads: int, head_dim: int,
                 seed: int = 0) -> str | None:
    """None when our layout agrees with the engine's op; else what differs. Raises
    ``LookupError`` where the engine's op is not in this build (nothing to compare with)."""
    op = layout.engine_write_op()
    if op is None:
        raise LookupError("this vLLM build has no cache-write op for the layout")
    blocks = 2  # the slots cross a block boundary
    slots = torch.randperm(blocks * layout.kernel_block_size, generator=torch.Generator().manual_seed(seed))
    slots = slots[: max(1, len(slots) - 3)]  # and leave a few out: a partial block
    gen = torch.Generator().manual_seed(seed + 1)
    k, v = (torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(cache.dtype).to(cache.device)
            for _ in range(2))
    slots = slots.to(cache.device)

    def scratch() -> torch.Tensor:
        t = torch.empty_strided((blocks, *cache.shape[1:]), cache.stride(), dtype=cache.dtype, device=cache.device)
        return t.zero_()

    by_engine, by_us = scratch(), scratch()
    op(by_engine, k, v, slots)
    k2, v2 = layout.read(by_engine, slots)
    if not (_same_bits(k, k2) and _same_bits(v, v2)):
        return "K/V written by the engine's op read back differently through our layout"
    layout.write(by_us, k, v, slots)
    if not _same_bits(by_engine, by_us):
        return "K/V written through our layout land elsewhere than the engine's op puts them"
    return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
