"""Paged KV layouts: writes through vLLM's CPU op and our reads are exact inverses."""

import pytest
import torch

from vllm_kvcdn.connector.kv_layout import CpuAttnLayout, FlashLayout, UnsupportedLayout, layout_for


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


def test_flash_layout_round_trip():
    layout = FlashLayout(16)
    cache = torch.zeros(2, 4, 16, 2, 8)
    slots = torch.tensor([0, 17, 63])
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    layout.write(cache, k, v, slots)
    k2, v2 = layout.read(cache, slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert torch.equal(cache[0, 1, 1], k[1])


def test_layout_detection_and_refusal():
    cpu = torch.zeros(4, 2, 128, 128, dtype=torch.bfloat16)
    assert isinstance(layout_for(cpu, block_size=128, num_kv_heads=2, head_dim=64,
                                 model_dtype=torch.bfloat16, cache_dtype="auto"), CpuAttnLayout)
    with pytest.raises(UnsupportedLayout, match="does not know"):
        layout_for(torch.zeros(3, 3), block_size=128, num_kv_heads=2, head_dim=64,
                   model_dtype=torch.bfloat16, cache_dtype="auto")
