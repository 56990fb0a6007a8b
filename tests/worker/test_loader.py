"""The loader built directly from its collaborators, as the worker builds it: plain CPU
tensors in the GPU backends' layout (pure torch), a chunk reader that is a function over
in-memory chunks (a stand-in for the store: the store tiers have tests of their own),
read threads that run inline. No worker, no engine, no private name patched."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.jobs import InlineExecutor
from vllm_kvcdn.connector.kv_layout import SplitKVLayout
from vllm_kvcdn.connector.loader import ChunkLoader
from vllm_kvcdn.connector.read_buffers import ReadBuffers
from vllm_kvcdn.connector.wire import ChunkLoad, LoadSpec

BLOCK, HEADS, DIM, LAYERS, CHUNK = 16, 2, 8, 2, 32
GEOMETRY = KVGeometry(BLOCK, HEADS, DIM, torch.bfloat16, "auto")


def _chunks(n: int, tail: int = 0) -> tuple[list[ChunkLoad], dict[str, list[torch.Tensor]]]:
    """``n`` whole chunks and a ``tail``-token last one; each chunk's K/V per layer."""
    loads, kv, start = [], {}, 0
    for i, size in enumerate([CHUNK] * n + ([tail] if tail else [])):
        key = f"{i:064x}"
        loads.append(ChunkLoad(key, start, size, start, start + size, size < CHUNK, list(range(size))))
        kv[key] = [torch.randn(size, HEADS, DIM).to(torch.bfloat16) for _ in range(2 * LAYERS)]
        start += size
    return loads, kv


def _loader(kv: dict, bad: set[str] = frozenset()) -> ChunkLoader:
    caches = [torch.zeros(16, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]

    def read_chunk(chunk: ChunkLoad, into):
        if chunk.key in bad:
            raise ArtifactError("checksum", f"chunk {chunk.key[:16]} fails its checksum")
        tensors = kv[chunk.key]
        return SimpleNamespace(keys=tensors[:LAYERS], values=tensors[LAYERS:]), 1000

    return ChunkLoader(geometry=GEOMETRY, caches=caches, layout=SplitKVLayout(BLOCK, BLOCK, DIM),
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
    assert outcome.receipt is None and outcome.stats.data["failures"] == {"checksum": 1}
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
