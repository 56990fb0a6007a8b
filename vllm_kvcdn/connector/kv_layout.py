"""Moving K/V between the canonical ``[tokens, kv_heads, head_dim]`` form and vLLM's
paged KV cache, slot by slot (``slot = block_id * block_size + offset``, the manager's
block size: vLLM's own slot mapping).

vLLM 0.32 hands every backend the same logical per-layer view, ``[blocks, kv_heads,
block_size, K|V]`` (``vllm/v1/worker/utils.py allocate_kv_cache``): the last dimension is
``head_dim`` of K then ``head_dim`` of V. Where it lives in memory is the ``KVCacheLayout``'s
stride order (NHD = ``LBNHC``, HND = ``LBHNC``, block-outermost ``BL..``); a backend that
takes smaller blocks than the manager's gets a view in kernel blocks, kernel block ``j`` of
block ``b`` being ``b * ratio + j``, so the manager's slot numbers hold unchanged.

- GPU backends (FlashAttention, FlashInfer, Triton): ``SplitKVLayout`` indexes the
  logical view, right for any strides; they read it as ``cache.transpose(1, 2).split(
  head_dim, dim=-1)``, and so do we.
- CPU (``CPU_ATTN``): the same view, but block interiors are packed per ISA (K transposed
  for "vec", tiled for "amx"). Writes go through the platform's own op,
  ``cpu_attn_reshape_and_cache``; reads use a gather map learnt once by writing known
  bit patterns through that same op, so reads are its exact inverse whatever the packing.

``layout_probe`` checks either against the engine's own cache-write op at start.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


class UnsupportedLayout(Exception):
    pass


# The engine's own cache write: (cache, k, v, slots) with k/v [n, kv_heads, head_dim].
CacheWriteOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class PagedKVLayout(ABC):
    def __init__(self, block_size: int, kernel_block_size: int):
        if block_size % kernel_block_size:
            raise UnsupportedLayout(f"kernel blocks of {kernel_block_size} tokens do not split {block_size}-token "
                                    "blocks; use a --block-size the attention backend supports")
        self.block_size = block_size  # the KV cache manager's (vLLM's slot mapping uses it)
        self.kernel_block_size = kernel_block_size  # the cache view's

    @abstractmethod
    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write ``k``/``v`` (``[n, kv_heads, head_dim]``) into the given slots."""

    @abstractmethod
    def read(self, cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (``[n, kv_heads, head_dim]``, on the cache's device) at the given slots."""

    def engine_write_op(self) -> CacheWriteOp | None:
        """The op the engine itself writes this cache with, where this build has it."""
        return None

    def prime_thread(self, cache: torch.Tensor) -> None:
        """Run ``write`` once on a scratch block in the calling thread, so whatever it
        sets up per thread (an OpenMP team and its binding) is done before it matters."""

    def blocks(self, cache: torch.Tensor) -> torch.Tensor:
        """The cache indexed by the manager's block ids on dim 0 (a view): a kernel-block
        view ``[blocks * ratio, ...]`` becomes ``[blocks, ratio, ...]``."""
        ratio = self.block_size // self.kernel_block_size
        return cache if ratio == 1 else cache.unflatten(0, (-1, ratio))

    def write_blocks(self, caches: list[torch.Tensor], block_ids: list[int], images: torch.Tensor) -> None:
        """Put images of whole blocks back at other block ids, every layer's at once
        (``images[layer]`` holds ``blocks(caches[layer])`` rows, see ``block_cache``): one
        slice copy per run of consecutive ids, all in one call. Measured in the engine's
        worker (issue 29, a hot 3,774-token hit of the Qwen3-0.6B shape, 433 MB):
        ``index_copy_`` moved 2.8 GB/s (~3 GB/s on one CPU thread), slice copies 7.6 GB/s."""
        dst, src = [], []
        for cache, image in zip(caches, images):
            blocks, image = self.blocks(cache), image.to(cache.device, non_blocking=True)
            for at, first, count in runs(block_ids):
                dst.append(blocks.narrow(0, first, count))
                src.append(image.narrow(0, at, count))
        torch._foreach_copy_(dst, src, non_blocking=True)


class SplitKVLayout(PagedKVLayout):
    """vLLM's logical ``[blocks, kv_heads, block_size, K|V]`` view, any physical strides."""

    def __init__(self, block_size: int, kernel_block_size: int, head_dim: int):
        super().__init__(block_size, kernel_block_size)
        self.head_dim = head_dim

    def _split(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as ``[blocks, block_size, kv_heads, head_dim]`` views: the backends' own split."""
        return cache.transpose(1, 2).split(self.head_dim, dim=-1)

    def _where(self, cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(cache.device, non_blocking=True)
        return slots // self.kernel_block_size, slots % self.kernel_block_size

    def write(self, cache, k, v, slots):
        where = self._where(cache, slots)
        key_cache, value_cache = self._split(cache)
        key_cache.index_put_(where, k.to(cache.device, non_blocking=True))
        value_cache.index_put_(where, v.to(cache.device, non_blocking=True))

    def read(self, cache, slots):
        where = self._where(cache, slots)
        key_cache, value_cache = self._split(cache)
        return key_cache[where], value_cache[where]

    def engine_write_op(self) -> CacheWriteOp | None:
        if not hasattr(torch.ops._C_cache_ops, "reshape_and_cache_flash"):
            return None  # a build without vLLM's CUDA kernels (the CPU wheel)
        from vllm import _custom_ops as ops

        def write(cache, k, v, slots):
            key_cache, value_cache = self._split(cache)
            scale = torch.ones((), dtype=torch.float32, device=cache.device)
            ops.reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto", scale, scale)

        return write


class CpuAttnLayout(PagedKVLayout):
    def __init__(self, dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str = "auto",
                 kernel_block_size: int | None = None):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        super().__init__(block_size, kernel_block_size or block_size)
        self.head_dim = head_dim
        self.isa = _get_attn_isa(dtype, self.kernel_block_size, head_dim, cache_dtype)
        self.kmap, self.vmap = _probe_plane_maps(dtype, self.kernel_block_size, head_dim, self.isa)

    def _split(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_blocks, heads, block_size, _ = cache.shape
        return cache.view(num_blocks, heads, block_size * 2, self.head_dim).chunk(2, dim=2)

    def write(self, cache, k, v, slots):
        from vllm._custom_ops import cpu_attn_reshape_and_cache

        key_cache, value_cache = self._split(cache)
        cpu_attn_reshape_and_cache(
            k.contiguous(), v.contiguous(), key_cache, value_cache, slots.to(torch.long), self.isa
        )

    def engine_write_op(self) -> CacheWriteOp:
        return self.write  # what CPU_ATTN itself calls

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


def runs(ids: list[int]):
    """(position in ``ids``, first id, length) of each run of consecutive ids."""
    at = 0
    while at < len(ids):
        end = at + 1
        while end < len(ids) and ids[end] == ids[end - 1] + 1:
            end += 1
        yield at, ids[at], end - at
        at = end


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


def layout_for(
    cache: torch.Tensor, *, block_size: int, num_kv_heads: int, head_dim: int, model_dtype, cache_dtype
) -> PagedKVLayout:
    """The layout of one layer's view as vLLM registers it (``register_kv_caches``)."""
    shape = tuple(cache.shape)
    if cache.dim() != 4 or shape[1] != num_kv_heads or shape[3] != 2 * head_dim:
        raise UnsupportedLayout(
            f"kvcdn does not know the KV cache layout {shape} on {cache.device.type}: it expects vLLM's "
            f"[blocks, kv_heads={num_kv_heads}, block_size, 2*head_dim={2 * head_dim}] per-layer view"
        )
    if cache_dtype not in ("auto", None) and "fp8" in cache_dtype:
        raise UnsupportedLayout("kvcdn does not yet move FP8 KV caches (their scales are not in the artifact); "
                                "drop --kv-cache-dtype")
    if cache.device.type == "cpu":
        return CpuAttnLayout(model_dtype, block_size, head_dim, cache_dtype, kernel_block_size=shape[2])
    return SplitKVLayout(block_size, shape[2], head_dim)
