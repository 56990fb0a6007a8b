"""The worker's host-RAM tier: fixed slots in a preallocated arena, least recently used first."""

import torch

from vllm_kvcdn.connector.block_cache import PackedBlockCache


def caches(layers=2, blocks=8):
    return [torch.arange(blocks * 4 * 6, dtype=torch.float32).view(blocks, 4, 6) + 1000 * i for i in range(layers)]


def test_put_get_round_trip_and_lru():
    cs = caches()
    slot_bytes = 2 * 2 * 4 * 6 * 4  # 2 layers x 2 blocks per chunk
    ram = PackedBlockCache(2 * slot_bytes, cs, block_dim=0, blocks_per_chunk=2)
    assert ram.num_slots == 2 and ram.capacity_bytes == 2 * slot_bytes
    ram.put("a", cs, torch.tensor([3, 5]))
    got = ram.get("a", 0, 2)
    assert all(torch.equal(g, c[[3, 5]]) for g, c in zip(got, cs))
    assert torch.equal(ram.get("a", 1, 2)[1], cs[1][[5]])
    ram.put("b", cs, torch.tensor([1]))  # a tail chunk: one whole block
    assert ram.get("b", 0, 2) is None and ram.get("b", 0, 1) is not None
    ram.get("a", 0, 1)  # a is now the most recent
    ram.put("c", cs, torch.tensor([0, 1]))  # evicts b
    assert ram.get("b", 0, 1) is None and ram.get("a", 0, 2) is not None and len(ram) == 2


def test_too_small_capacity_holds_nothing():
    cs = caches()
    ram = PackedBlockCache(10, cs, block_dim=0, blocks_per_chunk=2)
    ram.put("a", cs, torch.tensor([0, 1]))
    assert ram.num_slots == 0 and ram.get("a", 0, 1) is None
