"""Paged KV layouts on CPU: writes through vLLM's CPU op and our reads are exact inverses;
the startup probe agrees with the engine's op, and catches a layout that does not (the GPU
layout's own tests, on caches vLLM allocates, are in ``test_gpu_layouts``)."""

import pytest
import torch

from vllm_kvcdn.connector.kv_layout import CpuAttnLayout, SplitKVLayout, UnsupportedLayout, layout_for
from vllm_kvcdn.connector.layout_probe import probe_layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cpu_layout_round_trip_partial_blocks(dtype, head_dim):
    block, heads, blocks = 128, 2, 6
    layout = CpuAttnLayout(dtype, block, head_dim)
    cache = torch.zeros(blocks, heads, block, 2 * head_dim, dtype=dtype)
    slots = torch.tensor([5 * block + 3, block, 2 * block - 1, 2 * block + 64, 7])
    k = torch.randn(5, heads, head_dim).to(dtype)
    v = torch.randn(5, heads, head_dim).to(dtype)
    layout.write(cache, k, v, slots)
    k2, v2 = layout.read(cache, slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    # Only those slots were touched.
    assert int((cache != 0).sum()) == 2 * k.numel()


def test_cpu_layout_stores_k_transposed_on_vec():
    layout = CpuAttnLayout(torch.bfloat16, 128, 64)
    if layout.isa != "vec":
        pytest.skip(f"packing differs on isa={layout.isa}")
    # token t, dim d of K sits at d * block_size + t inside a (block, head) plane.
    assert layout.kmap[3, 5].item() == 5 * 128 + 3
    assert layout.vmap[3, 5].item() == 128 * 64 + 3 * 64 + 5


def test_layout_detection_and_refusal():
    cpu = torch.zeros(4, 2, 128, 128, dtype=torch.bfloat16)
    assert isinstance(layout_for(cpu, block_size=128, num_kv_heads=2, head_dim=64,
                                 model_dtype=torch.bfloat16, cache_dtype="auto"), CpuAttnLayout)
    with pytest.raises(UnsupportedLayout, match="does not know"):
        layout_for(torch.zeros(3, 3), block_size=128, num_kv_heads=2, head_dim=64,
                   model_dtype=torch.bfloat16, cache_dtype="auto")


class _SwappedTokens(CpuAttnLayout):
    """Reads tokens 0 and 1 of a block from each other's places: a wrong guess of the packing."""

    def __init__(self, *args):
        super().__init__(*args)
        self.kmap = self.kmap[[1, 0, *range(2, self.kmap.shape[0])]]


class _WritesVForK(CpuAttnLayout):
    def write(self, cache, k, v, slots):
        super().write(cache, v, k, slots)


def test_probe_agrees_with_the_cpu_op_and_catches_wrong_layouts():
    cache = torch.zeros(4, 2, 128, 128, dtype=torch.bfloat16)
    assert probe_layout(CpuAttnLayout(torch.bfloat16, 128, 64), cache, num_kv_heads=2, head_dim=64) is None
    # The op the probe trusts is the engine's own, not the layout's write: a layout whose
    # reads are wrong, or whose writes are, is caught either way.
    wrong_read = _SwappedTokens(torch.bfloat16, 128, 64)
    wrong_read.engine_write_op = CpuAttnLayout(torch.bfloat16, 128, 64).engine_write_op
    assert "read back differently" in probe_layout(wrong_read, cache, num_kv_heads=2, head_dim=64)
    wrong_write = _WritesVForK(torch.bfloat16, 128, 64)
    wrong_write.engine_write_op = CpuAttnLayout(torch.bfloat16, 128, 64).engine_write_op
    assert "land elsewhere" in probe_layout(wrong_write, cache, num_kv_heads=2, head_dim=64)
    assert int(cache.count_nonzero()) == 0  # the real cache is never touched


def test_the_gpu_layout_is_not_probed_without_the_cuda_op():
    if hasattr(torch.ops._C_cache_ops, "reshape_and_cache_flash"):
        pytest.skip("this vLLM build has the CUDA cache ops")
    with pytest.raises(LookupError):
        probe_layout(SplitKVLayout(16, 16, 64), torch.zeros(4, 2, 16, 128), num_kv_heads=2, head_dim=64)


@pytest.mark.gpu
@pytest.mark.parametrize("stride_order", ["NHD", "HND"])
def test_the_gpu_layout_agrees_with_reshape_and_cache_flash(stride_order):
    if not torch.cuda.is_available() or not hasattr(torch.ops._C_cache_ops, "reshape_and_cache_flash"):
        pytest.skip("needs a CUDA GPU and vLLM's CUDA build")
    blocks, heads, bs, dim = 4, 8, 16, 128
    physical = (blocks, bs, heads, 2 * dim) if stride_order == "NHD" else (blocks, heads, bs, 2 * dim)
    raw = torch.zeros(physical, dtype=torch.bfloat16, device="cuda")
    cache = raw.transpose(1, 2) if stride_order == "NHD" else raw  # the logical [B, H, N, 2D] view
    assert probe_layout(SplitKVLayout(bs, bs, dim), cache, num_kv_heads=heads, head_dim=dim) is None


def test_block_images_go_back_by_runs_of_consecutive_ids():
    """``write_blocks`` copies one slice per run of consecutive block ids: runs of several,
    single ids, and a run that wraps back, all land where the ids say."""
    layout = SplitKVLayout(16, 16, 8)
    caches = [torch.zeros(12, 2, 16, 16, dtype=torch.bfloat16) for _ in range(3)]
    images = torch.randn(3, 6, 2, 16, 16).to(torch.bfloat16)  # layers x blocks x ...
    ids = [3, 4, 5, 9, 0, 1]
    layout.write_blocks(caches, ids, images)
    for cache, image in zip(caches, images):
        for row, block in enumerate(ids):
            assert torch.equal(cache[block], image[row]), block
        untouched = [b for b in range(12) if b not in ids]
        assert torch.count_nonzero(cache[untouched]) == 0
