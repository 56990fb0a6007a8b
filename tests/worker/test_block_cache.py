"""The worker's host-RAM tier: fixed slots in a preallocated arena, least recently used first."""

import torch

from vllm_kvcdn.connector.block_cache import PackedBlockCache


def caches(layers=2, blocks=8):
    return [torch.arange(blocks * 4 * 6, dtype=torch.float32).view(blocks, 4, 6) + 1000 * i for i in range(layers)]


def test_put_get_round_trip_and_lru():
    cs = caches()
    slot_bytes = 2 * 2 * 4 * 6 * 4  # 2 layers x 2 blocks per chunk
    ram = PackedBlockCache(2 * slot_bytes, cs, blocks_per_chunk=2)
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
    ram = PackedBlockCache(10, cs, blocks_per_chunk=2)
    ram.put("a", cs, torch.tensor([0, 1]))
    assert ram.num_slots == 0 and ram.get("a", 0, 1) is None


def test_pinned_and_reserved_slots_are_not_evicted():
    cs = caches()
    slot_bytes = 2 * 2 * 4 * 6 * 4
    ram = PackedBlockCache(2 * slot_bytes, cs, blocks_per_chunk=2)
    ram.put("a", cs, torch.tensor([0, 1]))
    image, blocks = ram.pin("a")  # being written to disk
    assert blocks == 2 and torch.equal(image[1], cs[1][[0, 1]])
    reserved = ram.reserve()  # being filled from disk: the free slot
    ram.put("b", cs, torch.tensor([2, 3]))  # nothing left to evict but the pinned one: not kept
    assert ram.get("b", 0, 2) is None and ram.get("a", 0, 2) is not None
    ram.slot(reserved)[0].copy_(cs[0][[4, 5]])
    ram.slot(reserved)[1].copy_(cs[1][[4, 5]])
    ram.commit("c", reserved, 2)
    assert torch.equal(ram.get("c", 0, 2)[1], cs[1][[4, 5]])
    ram.unpin("a")
    ram.put("d", cs, torch.tensor([6, 7]))  # now "a" (least recent) can go
    assert ram.get("a", 0, 1) is None and ram.get("d", 0, 2) is not None


def test_a_second_commit_of_one_chunk_gives_its_slot_back():
    cs = caches()
    ram = PackedBlockCache(2 * 2 * 2 * 4 * 6 * 4, cs, blocks_per_chunk=2)
    first, second = ram.reserve(), ram.reserve()
    assert ram.reserve() is None  # both slots out, none held to evict
    ram.commit("a", first, 2)
    ram.commit("a", second, 2)  # two loads read the same image at once
    assert len(ram) == 1 and ram.reserve() == second


def test_tails_are_kept_least_recently_used_out_within_their_bytes():
    from vllm_kvcdn.connector.tail_cache import TailCache

    def tail(n: int, value: float) -> torch.Tensor:
        return torch.full((4, n, 2, 4), value, dtype=torch.bfloat16)  # 2 layers' K, V

    one = 4 * 10 * 2 * 4 * 2  # bytes of a 10-token tail
    tails = TailCache(2 * one)
    tails.put("a", 128, tail(10, 1.0))
    tails.put("b", 128, tail(10, 2.0))
    assert tails.holds("a", 128, 138) and not tails.holds("a", 127, 138) and not tails.holds("a", 128, 139)
    got = tails.get("a", 130, 135)  # "a" is now the most recent
    assert got.shape == (4, 5, 2, 4) and torch.all(got == 1.0)
    tails.put("c", 128, tail(10, 3.0))
    assert len(tails) == 2 and tails.holds("a", 128, 138) and not tails.holds("b", 128, 138)
    tails.put("big", 0, tail(30, 4.0))  # larger than the whole cache: not kept
    assert not tails.holds("big", 0, 1) and tails.nbytes == 2 * one
