"""The GPU backends' KV layout, on caches vLLM itself allocates.

Every cache here comes from vLLM 0.32's own code, as its GPU model runner makes it:
``get_kv_cache_config_from_groups`` (byte strides per ``KVCacheLayout``),
``prepare_kernel_block_sizes`` (a backend that takes smaller blocks splits the manager's)
and ``allocate_kv_cache`` (the per-layer views handed to ``register_kv_caches``), on CPU
tensors (CI has no GPU). K/V written through ``SplitKVLayout`` must then be where the
attention kernel reads them: at the kernel block vLLM's own block-table mapping gives
(``AttentionGroup.map_to_kernel_block_table``), in the backend's own K/V split, and at the
byte the layout's stride order names in the raw allocation; nothing else may change.
"""

from __future__ import annotations

import functools

import pytest
import torch

vllm_config_module = pytest.importorskip("vllm.config")

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.worker.utils import (  # noqa: E402
    AttentionGroup,
    allocate_kv_cache,
    customize_attention_spec,
    prepare_kernel_block_sizes,
)

from vllm_kvcdn.connector.block_cache import PackedBlockCache  # noqa: E402
from vllm_kvcdn.connector.kv_layout import SplitKVLayout, UnsupportedLayout, layout_for  # noqa: E402

HEADS, DIM, LAYERS, NUM_BLOCKS = 2, 64, 3, 8
DTYPE = torch.bfloat16


class FlashInferDeclared:
    """FlashInfer's declarations, as ``vllm/v1/attention/backends/flashinfer.py`` (0.32)
    makes them off Blackwell: any layout, kernel blocks of 16, 32 or 64 tokens. A stand-in
    because that module imports the ``flashinfer`` package, which has no CPU build."""

    @staticmethod
    def get_name() -> str:
        return "FLASHINFER"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [16, 32, 64]

    @classmethod
    def customize_spec(cls, spec):
        return spec

    @classmethod
    def supported_kv_cache_layouts(cls):
        return None


BACKENDS = {"FLASH_ATTN": FlashAttentionBackend, "FLASHINFER": FlashInferDeclared,
            "TRITON_ATTN": TritonAttentionBackend}
# NHD and HND (vLLM's legacy names for LBNHC, LBHNC), and the block-outermost pair.
LAYOUTS = ["LBNHC", "LBHNC", "BLNHC", "BLHNC"]


@functools.lru_cache(maxsize=None)
def _vllm_config(layout: str):
    from vllm.config import CacheConfig, VllmConfig
    from vllm.v1.attention.backends.utils import record_kv_cache_layout

    cache_config = CacheConfig()
    record_kv_cache_layout(cache_config, layout)  # as the engine core does once it has resolved one
    return VllmConfig(cache_config=cache_config)


def _allocate(backend, layout: str, block_size: int):
    """What the GPU runner makes: (per-layer views, the KVCacheTensor, kernel block size, group)."""
    spec = customize_attention_spec(backend, FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS,
                                                               head_size=DIM, dtype=DTYPE))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    config = get_kv_cache_config_from_groups(_vllm_config(layout), [KVCacheGroupSpec(names, spec)],
                                             available_memory=NUM_BLOCKS * LAYERS * spec.page_size_bytes)
    group = AttentionGroup(backend, names, spec, 0)
    (kernel_block_size,) = prepare_kernel_block_sizes(config, [[group]])
    caches = allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout[layout], [kernel_block_size])
    if kernel_block_size != block_size:  # as create_metadata_builders sets it up
        group.kernel_block_size = kernel_block_size
        ratio = block_size // kernel_block_size
        group.kernel_block_table = torch.zeros(1, 1, NUM_BLOCKS * ratio, dtype=torch.int32)
        group.kernel_block_offsets = torch.arange(ratio, dtype=torch.int32)
    return [caches[n] for n in names], config.kv_cache_tensors[0], kernel_block_size, group


def _slots(block_ids: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """vLLM's slot mapping (manager blocks): ``block_table[pos // bs] * bs + pos % bs``."""
    pos = torch.arange(num_tokens)
    return torch.tensor(block_ids)[pos // block_size] * block_size + pos % block_size


def _raw_offset(tensor, layout: str, layer: int, block: int, token: int, head: int, block_size: int,
                kernel_block_size: int) -> int:
    """Byte of (layer, manager block, token, head, K dim 0) in the backing allocation, from
    the KVCacheTensor's strides and the layout's order of [H, N, C] inside a kernel block."""
    content = 2 * DIM * DTYPE.itemsize
    page = tensor.offset + layer * tensor.layer_stride + block * tensor.block_stride
    kernel_page = HEADS * kernel_block_size * content
    j, n = divmod(token, kernel_block_size)
    inner = n * HEADS * content + head * content if layout.endswith("NHC") else \
        head * kernel_block_size * content + n * content
    return page + j * kernel_page + inner


CASES = [(b, lay, bs) for b in BACKENDS for lay in LAYOUTS for bs in (16, 128)]


@pytest.mark.parametrize("backend,layout,block_size", CASES, ids=[f"{b}-{lay}-bs{bs}" for b, lay, bs in CASES])
def test_kv_lands_where_the_backend_reads_it(backend, layout, block_size):
    caches, tensor, kernel_bs, group = _allocate(BACKENDS[backend], layout, block_size)
    assert caches[0].shape == (NUM_BLOCKS * block_size // kernel_bs, HEADS, kernel_bs, 2 * DIM)
    ours = SplitKVLayout(block_size, kernel_bs, DIM)
    block_ids = [5, 1, 3]
    num_tokens = 2 * block_size + 5  # the last block partial
    slots = _slots(block_ids, num_tokens, block_size)
    gen = torch.Generator().manual_seed(hash((backend, layout, block_size)) % 2**31)
    kv = [(torch.randn(num_tokens, HEADS, DIM, generator=gen).to(DTYPE),
           torch.randn(num_tokens, HEADS, DIM, generator=gen).to(DTYPE)) for _ in caches]
    for cache, (k, v) in zip(caches, kv):
        ours.write(cache, k, v, slots)

    # Where the kernel reads: its block table from vLLM's own mapping, its own K/V split.
    table = group.map_to_kernel_block_table(torch.tensor([block_ids], dtype=torch.int32))[0]
    pos = torch.arange(num_tokens)
    kernel_blocks, offsets = table[pos // kernel_bs].long(), pos % kernel_bs
    raw = caches[0].untyped_storage()
    backing = torch.empty(0, dtype=torch.uint8).set_(raw)
    for layer, (cache, (k, v)) in enumerate(zip(caches, kv)):
        key_cache, value_cache = cache.transpose(1, 2).split(DIM, dim=-1)
        assert torch.equal(key_cache[kernel_blocks, offsets], k)
        assert torch.equal(value_cache[kernel_blocks, offsets], v)
        read_k, read_v = ours.read(cache, slots)
        assert torch.equal(read_k, k) and torch.equal(read_v, v)
        for token, head in [(0, 0), (block_size - 1, 1), (block_size + 7, 0), (num_tokens - 1, 1)]:
            at = _raw_offset(tensor, layout, layer, block_ids[token // block_size], token % block_size, head,
                             block_size, kernel_bs)
            want = torch.cat([k[token, head], v[token, head]]).view(torch.uint8)
            assert torch.equal(backing[at : at + want.numel()], want), (layer, token, head)

    # Nothing else changed: zeroing what we wrote leaves the whole allocation zero.
    for cache in caches:
        zeros = torch.zeros(num_tokens, HEADS, DIM, dtype=DTYPE)
        ours.write(cache, zeros, zeros, slots)
    assert int(backing.count_nonzero()) == 0


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_whole_block_images_move_between_block_ids(layout):
    """The RAM tier's images: whole blocks copied out by block id and back in elsewhere,
    kernel-split caches included (FlashInfer's 64-token kernel blocks under 128)."""
    block_size = 128
    caches, _, kernel_bs, _ = _allocate(FlashInferDeclared, layout, block_size)
    ours = SplitKVLayout(block_size, kernel_bs, DIM)
    src, dst = [6, 2], [0, 4]  # a run of one id each (runs of several: test_kv_layout)
    slots = _slots(src, 2 * block_size, block_size)
    kv = [(torch.randn(2 * block_size, HEADS, DIM).to(DTYPE), torch.randn(2 * block_size, HEADS, DIM).to(DTYPE))
          for _ in caches]
    for cache, (k, v) in zip(caches, kv):
        ours.write(cache, k, v, slots)
    ram = PackedBlockCache(1 << 22, [ours.blocks(c) for c in caches], blocks_per_chunk=2)
    ram.put("chunk", [ours.blocks(c) for c in caches], torch.tensor(src))
    image = ram.get("chunk", 0, 2)
    ours.write_blocks(caches, dst, image)
    for cache, (k, v) in zip(caches, kv):
        assert all(torch.equal(a, b) for a, b in zip(ours.read(cache, _slots(dst, 2 * block_size, block_size)), (k, v)))


def test_layout_for_takes_vllm_views_and_refuses_what_it_cannot_move():
    gpu_view = torch.empty(8, HEADS, 16, 2 * DIM, dtype=DTYPE, device="meta")  # any non-CPU device
    chosen = layout_for(gpu_view, block_size=32, num_kv_heads=HEADS, head_dim=DIM, model_dtype=DTYPE,
                        cache_dtype="auto")
    assert isinstance(chosen, SplitKVLayout) and chosen.kernel_block_size == 16 and chosen.block_size == 32
    with pytest.raises(UnsupportedLayout, match="expects vLLM's"):  # vLLM < 0.32's [2, blocks, bs, heads, dim]
        layout_for(torch.empty(2, 8, 16, HEADS, DIM, device="meta"), block_size=16, num_kv_heads=HEADS,
                   head_dim=DIM, model_dtype=DTYPE, cache_dtype="auto")
    with pytest.raises(UnsupportedLayout, match="FP8"):
        layout_for(gpu_view, block_size=16, num_kv_heads=HEADS, head_dim=DIM, model_dtype=DTYPE,
                   cache_dtype="fp8")
    with pytest.raises(UnsupportedLayout, match="do not split"):
        layout_for(gpu_view, block_size=24, num_kv_heads=HEADS, head_dim=DIM, model_dtype=DTYPE,
                   cache_dtype="auto")
