"""Moving K/V between the canonical ``[tokens, kv_heads, head_dim]`` form and vLLM's
paged KV cache, slot by slot (``slot = block_id * block_size + offset``).

CPU (``CPU_ATTN``): one tensor per layer ``[num_blocks, kv_heads, block_size, 2*head_dim]``
whose block interiors are packed per ISA (K transposed for "vec", tiled for "amx").
Writes go through the platform's own op, ``cpu_attn_reshape_and_cache``; reads use a
gather map learnt once by writing known bit patterns through that same op, so reads
are its exact inverse whatever the packing.

CUDA flash-attention style: ``[2, num_blocks, block_size, kv_heads, head_dim]``, plain
indexing.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch


class UnsupportedLayout(Exception):
    pass


class PagedKVLayout(ABC):
    @abstractmethod
    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write ``k``/``v`` (``[n, kv_heads, head_dim]``) into the given slots."""

    @abstractmethod
    def read(self, cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (``[n, kv_heads, head_dim]``) stored at the given slots."""

    block_dim = 0  # the dimension of the cache tensor that indexes blocks

    def prime_thread(self, cache: torch.Tensor) -> None:
        """Run ``write`` once on a scratch block in the calling thread, so whatever it
        sets up per thread (an OpenMP team and its binding) is done before it matters."""

    def write_blocks(self, cache: torch.Tensor, block_ids: torch.Tensor, image: torch.Tensor) -> None:
        """Put images of whole blocks (engine-native packing, see ``block_cache``) back at
        other block ids: a plain copy."""
        cache.index_copy_(self.block_dim, block_ids.to(cache.device), image.to(cache.device, non_blocking=True))


class CpuAttnLayout(PagedKVLayout):
    def __init__(self, dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str = "auto"):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        if cache_dtype not in ("auto", None) and "fp8" in cache_dtype:
            raise UnsupportedLayout("kvcdn does not yet move FP8 KV caches on CPU")
        self.block_size = block_size
        self.head_dim = head_dim
        self.isa = _get_attn_isa(dtype, block_size, head_dim, cache_dtype)
        self.kmap, self.vmap = _probe_plane_maps(dtype, block_size, head_dim, self.isa)

    def _split(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_blocks, heads, block_size, _ = cache.shape
        return cache.view(num_blocks, heads, block_size * 2, self.head_dim).chunk(2, dim=2)

    def write(self, cache, k, v, slots):
        from vllm._custom_ops import cpu_attn_reshape_and_cache

        key_cache, value_cache = self._split(cache)
        cpu_attn_reshape_and_cache(
            k.contiguous(), v.contiguous(), key_cache, value_cache, slots.to(torch.long), self.isa
        )

    def prime_thread(self, cache):
        scratch = torch.zeros_like(cache[:1])
        kv = torch.zeros(1, cache.shape[1], self.head_dim, dtype=cache.dtype)
        self.write(scratch, kv, kv, torch.zeros(1, dtype=torch.long))

    def read(self, cache, slots):
        num_blocks, heads, block_size, width = cache.shape
        planes = cache.view(num_blocks, heads, block_size * width)
        blocks = (slots // block_size).view(-1, 1, 1)
        offsets = slots % block_size
        head_idx = torch.arange(heads).view(1, -1, 1)
        k = planes[blocks, head_idx, self.kmap[offsets].unsqueeze(1)]
        v = planes[blocks, head_idx, self.vmap[offsets].unsqueeze(1)]
        return k, v


@functools.lru_cache(maxsize=8)
def _probe_plane_maps(dtype: torch.dtype, block_size: int, head_dim: int, isa: str):
    """Where the op puts (token offset, dim) of K and of V inside one (block, head) plane."""
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    int_dtype = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    n = block_size * head_dim
    base = 256  # distinct, finite, normal bit patterns in every float dtype we allow
    maps = []
    for which in ("k", "v"):
        cache = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = cache.view(1, 1, 2 * block_size, head_dim).chunk(2, dim=2)
        ids = (torch.arange(n, dtype=torch.int32) + base).to(int_dtype).view(dtype)
        ids = ids.view(block_size, 1, head_dim)
        zeros = torch.zeros_like(ids)
        k, v = (ids, zeros) if which == "k" else (zeros, ids)
        cpu_attn_reshape_and_cache(
            k, v, key_cache, value_cache, torch.arange(block_size, dtype=torch.long), isa
        )
        plane = cache.view(int_dtype).flatten().to(torch.long)
        where = torch.nonzero(plane).flatten()
        if where.numel() != n:
            raise UnsupportedLayout(f"CPU KV packing for isa={isa} is not a permutation")
        index = torch.empty(n, dtype=torch.long)
        index[plane[where] - base] = where
        maps.append(index.view(block_size, head_dim))
    return maps[0], maps[1]


class FlashLayout(PagedKVLayout):
    """``[2, num_blocks, block_size, kv_heads, head_dim]`` (FlashAttention and kin)."""

    block_dim = 1

    def __init__(self, block_size: int):
        self.block_size = block_size

    def write(self, cache, k, v, slots):
        slots = slots.to(cache.device)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        cache[0, blocks, offsets] = k.to(cache.device, non_blocking=True)
        cache[1, blocks, offsets] = v.to(cache.device, non_blocking=True)

    def read(self, cache, slots):
        slots = slots.to(cache.device)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        return cache[0, blocks, offsets].cpu(), cache[1, blocks, offsets].cpu()


def layout_for(
    cache: torch.Tensor, *, block_size: int, num_kv_heads: int, head_dim: int, model_dtype, cache_dtype
) -> PagedKVLayout:
    shape = tuple(cache.shape)
    if cache.device.type == "cpu" and cache.dim() == 4 and shape[1:] == (
        num_kv_heads, block_size, 2 * head_dim
    ):
        return CpuAttnLayout(model_dtype, block_size, head_dim, cache_dtype)
    if cache.dim() == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_dim):
        return FlashLayout(block_size)
    raise UnsupportedLayout(
        f"kvcdn does not know the KV cache layout {shape} on {cache.device.type}; "
        "supported: CPU_ATTN and FlashAttention-style [2, blocks, block_size, heads, dim]"
    )
