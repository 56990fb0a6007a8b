"""The loader built directly from its collaborators, as the worker builds it: plain CPU
tensors in the GPU backends' layout (pure torch), a chunk reader that is a function over
in-memory chunks (a stand-in for the store: the store tiers have tests of their own),
read threads that run inline. No worker, no engine, no private name patched."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.connector.block_tier import BlockTier
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.jobs import InlineExecutor
from vllm_kvcdn.connector.kv_layout import SplitKVLayout
from vllm_kvcdn.connector.loader import ChunkLoader
from vllm_kvcdn.connector.read_buffers import ReadBuffers
from vllm_kvcdn.connector.wire import ChunkLoad, LoadSpec
from vllm_kvcdn.store.lru import DiskLRU

BLOCK, HEADS, DIM, LAYERS, CHUNK = 16, 2, 8, 2, 32
GEOMETRY = KVGeometry(BLOCK, HEADS, DIM, torch.bfloat16, "auto")


def _chunks(n: int, tail: int = 0) -> tuple[list[ChunkLoad], dict[str, list[torch.Tensor]]]:
    """``n`` whole chunks and a ``tail``-token last one; each chunk's K/V per layer."""
    loads, kv, start = [], {}, 0
    for i, size in enumerate([CHUNK] * n + ([tail] if tail else [])):
        key = f"{i:064x}"
        loads.append(ChunkLoad(key, start, size, start, start + size, size < CHUNK, list(range(size)),
                               {"": f"blake3:{i:064x}"}))
        kv[key] = [torch.randn(size, HEADS, DIM).to(torch.bfloat16) for _ in range(2 * LAYERS)]
        start += size
    return loads, kv


def _loader(kv: dict, bad: set[str] = frozenset(), ram_tier_bytes: int = 0, reads: list | None = None,
            images_dir=None) -> ChunkLoader:
    """``reads``: the keys of the chunks read, appended to as they are; ``images_dir``:
    the node's disk tier of block images (written inline)."""
    caches = [torch.zeros(16, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]

    def read_chunk(chunk: ChunkLoad, into):
        if reads is not None:
            reads.append(chunk.key)
        if chunk.key in bad:
            raise ArtifactError("checksum", f"chunk {chunk.key[:16]} fails its checksum")
        tensors = kv[chunk.key]
        return SimpleNamespace(keys=tensors[:LAYERS], values=tensors[LAYERS:]), 1000

    layout = SplitKVLayout(BLOCK, BLOCK, DIM)
    tier = BlockTier([layout.blocks(c) for c in caches], ram_tier_bytes, CHUNK // BLOCK, images_dir,
                     DiskLRU(1 << 20) if images_dir else None, InlineExecutor(),
                     tail_token=((2 * LAYERS, HEADS, DIM), torch.bfloat16)) if ram_tier_bytes else None
    return ChunkLoader(geometry=GEOMETRY, caches=caches, layout=layout, tier=tier,
                       device=CacheDevice(torch.device("cpu")), buffers=ReadBuffers(2, 64),
                       read_chunk=read_chunk, reads=InlineExecutor(), timeout_s=5)


def _read_back(loader: ChunkLoader, spec: LoadSpec, layer: int, end: int):
    return loader.layout.read(loader.caches[layer], GEOMETRY.slots(spec.block_ids, 0, end))


def test_every_chunk_lands_in_the_requests_blocks_and_is_receipted():
    chunks, kv = _chunks(3, tail=10)
    spec = LoadSpec("r", [5, 2, 9, 7, 11, 3, 4], chunks)  # scattered blocks
    loader = _loader(kv)
    outcome = loader.load(spec)
    assert outcome.failed_blocks == set()
    end = chunks[-1].write_to
    assert (outcome.receipt.loaded_tokens, outcome.receipt.store_bytes) == (end, 4000)
    assert outcome.receipt.kv_bytes == end * GEOMETRY.token_bytes(LAYERS)
    for layer in range(LAYERS):
        k, v = _read_back(loader, spec, layer, end)
        assert torch.equal(k, torch.cat([kv[c.key][layer] for c in chunks]))
        assert torch.equal(v, torch.cat([kv[c.key][LAYERS + layer] for c in chunks]))


def test_a_failing_chunk_fails_itself_and_every_later_one_and_leaves_the_earlier_ones():
    chunks, kv = _chunks(4)
    spec = LoadSpec("r", list(range(8)), chunks)
    loader = _loader(kv, bad={chunks[2].key})
    outcome = loader.load(spec)
    assert outcome.failed_blocks == {4, 5, 6, 7}  # chunks 2 and 3: two 16-token blocks each
    assert outcome.stats.data["failures"] == {"checksum": 1}
    assert outcome.receipt.loaded_tokens == 2 * CHUNK  # the chunks vLLM keeps: they are metered
    k, _ = _read_back(loader, spec, 0, 2 * CHUNK)
    assert torch.equal(k, torch.cat([kv[c.key][0] for c in chunks[:2]]))


def test_a_partial_write_range_writes_only_its_positions():
    """vLLM's prefix cache held the first block: the plan starts mid-chunk."""
    chunks, kv = _chunks(1)
    chunks[0].write_from = BLOCK
    spec = LoadSpec("r", [3, 6], chunks)
    loader = _loader(kv)
    assert loader.load(spec).receipt.loaded_tokens == CHUNK - BLOCK
    k, _ = _read_back(loader, spec, 1, CHUNK)
    assert torch.count_nonzero(k[:BLOCK]) == 0 and torch.equal(k[BLOCK:], kv[chunks[0].key][1][BLOCK:])


def _assert_loaded(loader: ChunkLoader, spec: LoadSpec, kv: dict, start: int = 0) -> None:
    end = spec.chunks[-1].write_to
    for layer in range(LAYERS):
        k, v = loader.layout.read(loader.caches[layer], GEOMETRY.slots(spec.block_ids, start, end))
        whole_k = torch.cat([kv[c.key][layer] for c in spec.chunks])
        whole_v = torch.cat([kv[c.key][LAYERS + layer] for c in spec.chunks])
        assert torch.equal(k, whole_k[start - spec.chunks[0].start:]) and \
            torch.equal(v, whole_v[start - spec.chunks[0].start:])


def test_a_hot_document_with_a_tail_loads_from_ram_without_reading_a_chunk():
    """The partial last block is kept beside the whole blocks: a tail of one whole block
    and 4 tokens, and a tail shorter than a block."""
    for tail in (BLOCK + 4, 10):
        chunks, kv = _chunks(1, tail=tail)
        reads: list[str] = []
        loader = _loader(kv, ram_tier_bytes=1 << 20, reads=reads)
        assert loader.load(LoadSpec("cold", [1, 2, 3, 4], chunks)).receipt is not None
        assert reads == [c.key for c in chunks]
        hot = LoadSpec("hot", [9, 5, 12, 7], chunks)  # other blocks
        outcome = loader.load(hot)
        assert outcome.receipt is not None and reads == [c.key for c in chunks], reads  # nothing read again
        _assert_loaded(loader, hot, kv)
        assert loader.tier.tier_counts()["ram_tier_tail_hits"] == 1


def test_a_plan_that_starts_at_the_tail_block_takes_it_from_ram():
    """vLLM's prefix cache holds the whole blocks (another request's load): only the
    positions past them are planned, and they come from RAM."""
    chunks, kv = _chunks(1, tail=BLOCK + 4)
    reads: list[str] = []
    loader = _loader(kv, ram_tier_bytes=1 << 20, reads=reads)
    loader.load(LoadSpec("first", [1, 2, 3, 4], chunks))
    tail = chunks[-1]
    tail_only = [ChunkLoad(tail.key, tail.start, tail.num_tokens, tail.start + BLOCK, tail.write_to, True,
                           tail.tokens, tail.checksums)]
    spec = LoadSpec("second", [1, 2, 3, 8], tail_only)
    assert loader.load(spec).receipt.loaded_tokens == 4 and len(reads) == 2
    k, v = loader.layout.read(loader.caches[1], GEOMETRY.slots(spec.block_ids, tail.start + BLOCK, tail.write_to))
    assert torch.equal(k, kv[tail.key][1][BLOCK:]) and torch.equal(v, kv[tail.key][LAYERS + 1][BLOCK:])


def test_a_restarted_node_reads_block_images_straight_into_the_requests_blocks(tmp_path):
    """On CPU a chunk's disk image goes straight into the request's blocks (no RAM slot,
    no packing) and its tail comes from its tail file: no chunk is read, the bytes equal
    the chunks'. A damaged image or tail file is dropped and its chunk read instead (over
    the garbage an image read left)."""
    chunks, kv = _chunks(2, tail=BLOCK + 4)
    first = _loader(kv, ram_tier_bytes=1 << 20, images_dir=tmp_path)
    assert first.load(LoadSpec("cold", list(range(6)), chunks)).receipt is not None
    assert len(list(tmp_path.glob("*/*.img"))) == 3  # the tail chunk's whole block too
    assert [p.name for p in tmp_path.glob("*/*.tail")] == [f"{first.tier_key(chunks[-1])}.4.tail"]
    reads: list[str] = []
    restarted = _loader(kv, ram_tier_bytes=1 << 20, reads=reads, images_dir=tmp_path)
    spec = LoadSpec("after restart", [9, 5, 12, 7, 3, 14], chunks)  # scattered blocks
    assert restarted.load(spec).receipt is not None
    _assert_loaded(restarted, spec, kv)
    assert reads == []
    counts = restarted.tier.tier_counts()
    assert (counts["image_tier_hits"], counts["ram_tier_hits"]) == (3, 0)  # read direct, not via RAM slots
    assert (counts["image_tier_tail_hits"], counts["ram_tier_tail_hits"]) == (1, 1)

    for path in (next(tmp_path.glob(f"*/{first.tier_key(chunks[0])}.*.img")), next(tmp_path.glob("*/*.tail"))):
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    damaged = _loader(kv, ram_tier_bytes=1 << 20, reads=reads, images_dir=tmp_path)
    spec = LoadSpec("damaged", [9, 5, 12, 7, 3, 14], chunks)
    for cache in damaged.caches:
        cache.fill_(1.0)
    assert damaged.load(spec).receipt is not None
    _assert_loaded(damaged, spec, kv)
    assert sorted(reads) == sorted([chunks[0].key, chunks[-1].key])
    assert damaged.tier.images.damaged == 1 and damaged.tier.tail_files.damaged == 1
    assert damaged.tier.tail_files.blocks(damaged.tier_key(chunks[-1])) == 4  # written again from the chunk read


def test_the_tiers_hold_a_chunk_under_its_checksum_a_plan_for_other_bytes_reads_the_chunk(tmp_path):
    """A RAM slot, a disk image and a tail made from one version of a chunk never serve a
    manifest that records another (the chunk was replaced and republished: a plan names
    the new checksum): the chunk object is read and checked instead."""
    chunks, kv = _chunks(1, tail=BLOCK + 4)
    reads: list[str] = []
    loader = _loader(kv, ram_tier_bytes=1 << 20, reads=reads, images_dir=tmp_path)
    loader.load(LoadSpec("first", [1, 2, 3, 4], chunks))
    assert len(reads) == 2
    loader.load(LoadSpec("hot", [5, 6, 7, 8], chunks))
    assert len(reads) == 2  # RAM and images
    other = [replace(c, checksums={"": "blake3:" + "e" * 64}) for c in chunks]
    loader.load(LoadSpec("other bytes", [5, 6, 7, 8], other))
    assert reads[2:] == [c.key for c in chunks]
    restarted = _loader(kv, ram_tier_bytes=1 << 20, reads=reads, images_dir=tmp_path)
    restarted.load(LoadSpec("restarted", [5, 6, 7, 8], [replace(c, checksums={"": "blake3:" + "f" * 64})
                                                         for c in chunks]))
    assert reads[4:] == [c.key for c in chunks] and restarted.tier.tier_counts()["image_tier_hits"] == 0
