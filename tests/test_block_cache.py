"""The worker's host-RAM tier: LRU by bytes."""

import torch

from vllm_kvcdn.connector.block_cache import PackedBlockCache


def image(nbytes: int) -> list[torch.Tensor]:
    return [torch.zeros(nbytes // 2, dtype=torch.int8), torch.zeros(nbytes // 2, dtype=torch.int8)]


def test_lru_eviction_by_bytes():
    cache = PackedBlockCache(capacity_bytes=300)
    cache.put("a", image(100))
    cache.put("b", image(100))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", image(150))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.used_bytes == 250 and len(cache) == 2


def test_too_large_or_duplicate_is_not_stored():
    cache = PackedBlockCache(capacity_bytes=100)
    cache.put("big", image(200))
    assert cache.get("big") is None and cache.used_bytes == 0
    cache.put("x", image(50))
    cache.put("x", image(50))
    assert cache.used_bytes == 50
