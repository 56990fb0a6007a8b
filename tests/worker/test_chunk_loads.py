"""The worker's load jobs on their own: reads into reused buffers, read-ahead bounded by
them, failures mid-document (no engine: a worker over plain paged-cache tensors, a real
file store; the engine tests cover the same jobs under vLLM). Each test runs twice: over
CPU caches written with vLLM's own CPU op, and over the GPU backends' layout on CPU
tensors with the device path on (a chunk's K/V "uploaded" in one copy, slots moved once
per chunk: the copies land in host memory here, on the GPU in production).

A small geometry (128-token chunks of 2 layers) makes a document of many chunks, more than
the worker has read buffers (``io_threads`` + 2)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import write_document
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.kv_layout import SplitKVLayout, layout_for
from vllm_kvcdn.connector.read_buffers import ReadBuffers
from vllm_kvcdn.connector.wire import ChunkLoad, KVCDNMetadata, LoadSpec
from vllm_kvcdn.connector.worker import KVCDNWorker
from vllm_kvcdn.store.base import StoreWrapper
from vllm_kvcdn.store.file import FileStore
from vllm_kvcdn.store.keys import chunk_object_key
from vllm_kvcdn.store.latency import LatencyStore

BLOCK, HEADS, DIM, LAYERS, CHUNK = 128, 2, 64, 2, 128  # vLLM's CPU block size: its op runs on every ISA
DOC_TOKENS = 10 * CHUNK + 8  # ten whole chunks and a tail
FINGERPRINT = Fingerprint("f" * 64, {"test": "chunk loads"})


class _Recording(StoreWrapper):
    """Counts chunk reads that were handed a buffer to fill, and how many run at once."""

    def __init__(self, inner):
        super().__init__(inner)
        self.into, self.running, self.most_running = [], 0, 0
        self._lock = threading.Lock()

    def get(self, key, into=None):
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            data = self.inner.get(key, into)
            if key.startswith("chunks/"):
                self.into.append(isinstance(data, memoryview) and into is not None and data.obj is into.obj)
            return data
        finally:
            with self._lock:
                self.running -= 1


def _document(seed: int) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30000, (DOC_TOKENS,), generator=gen).tolist()
    kv = [(torch.randn(DOC_TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
           torch.randn(DOC_TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16)) for _ in range(LAYERS)]
    return tokens, kv


def _publish(store, tokens, kv, codec=None):
    spans = document_chunks(tokens, FINGERPRINT.digest, None, CHUNK)
    write_document(store, spans=spans, tokens=tokens, kv=kv, fingerprint=FINGERPRINT.digest, profile={},
                   chunk_size=CHUNK, producer={}, codec=codec)
    return spans


@pytest.fixture(params=["cpu_attn", "split"])
def layout(request) -> str:
    return request.param


def _split_layout(cache, **_):
    return SplitKVLayout(BLOCK, cache.shape[2], DIM)  # the GPU backends' layout, HND strides


def _worker(store, layout: str, io_threads: int = 1, blocks: int = 64, layout_factory=None,
            **settings) -> KVCDNWorker:
    config = KVCDNConfig(store_url=store.url, chunk_size=CHUNK, io_threads=io_threads,
                         **{"ram_tier_gib": 0, "load_timeout_s": 30, **settings})
    geometry = KVGeometry(BLOCK, HEADS, DIM, torch.bfloat16, "auto")
    factory = layout_factory or (_split_layout if layout == "split" else layout_for)
    worker = KVCDNWorker(config, FINGERPRINT, store, geometry, layout_factory=factory)
    worker.register_kv_caches({f"model.layers.{i}.attn": torch.zeros(blocks, HEADS, BLOCK, 2 * DIM,
                                                                      dtype=torch.bfloat16)
                               for i in range(LAYERS)})
    worker.device.moves = layout == "split"  # the GPU's copy path (one upload per chunk) on host memory
    return worker


def _spec(req_id: str, spans, tokens, first_block: int) -> LoadSpec:
    chunks = [ChunkLoad(s.key, s.start, s.num_tokens, s.start, s.end, s.num_tokens < CHUNK,
                        tokens[s.start : s.end]) for s in spans]
    blocks = -(-DOC_TOKENS // BLOCK)
    return LoadSpec(req_id, list(range(first_block, first_block + blocks)), chunks)


def _load(worker, *specs, timeout_s: float = 30.0) -> set[int]:
    """Run the loads to their end; the blocks reported failed."""
    worker.start_load_kv(KVCDNMetadata(loads=list(specs), idle=True))
    waiting, deadline = {s.req_id for s in specs}, time.monotonic() + timeout_s
    while waiting:
        assert time.monotonic() < deadline, f"loads {waiting} never ended"
        waiting -= worker.take_finished_loads(idle=True)
    return worker.get_block_ids_with_load_errors()


def _cached(worker, spec: LoadSpec, layer: int, end: int = DOC_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    slots = worker.geometry.slots(spec.block_ids, 0, end)
    return worker.layout.read(worker.caches[layer], slots)


def _all_buffers_back(worker, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while worker.buffers.free < worker.buffers.count and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker.buffers.free == worker.buffers.count


@pytest.fixture
def store(tmp_path):
    return _Recording(FileStore(tmp_path / "store", durable=False))


@pytest.mark.parametrize("codec", [None, "zstd:3"])  # format v1, and v2 (compressed: decoded into the buffer)
def test_a_document_longer_than_the_read_buffers_loads_exactly_through_them(store, layout, codec):
    tokens, kv = _document(0)
    spans = _publish(store, tokens, kv, codec)
    worker = _worker(store, layout, io_threads=1)
    try:
        assert worker.buffers.count == 3 < len(spans)
        store.into.clear()
        spec = _spec("r1", spans, tokens, first_block=0)
        assert _load(worker, spec) == set()
        for layer, (k, v) in enumerate(kv):
            k2, v2 = _cached(worker, spec, layer)
            assert torch.equal(k2, k) and torch.equal(v2, v)
        assert store.into == [True] * len(spans)  # every chunk read went into a pooled buffer
        assert _all_buffers_back(worker)
    finally:
        worker.shutdown()


def test_concurrent_loads_over_a_slow_store_share_few_buffers_without_deadlock(tmp_path, layout):
    origin = FileStore(tmp_path / "store", durable=False)
    docs = [_document(seed) for seed in (1, 2)]
    spans = [_publish(origin, *doc) for doc in docs]
    slow = _Recording(LatencyStore(origin, chunk_get_delay_s=0.02))
    worker = _worker(slow, layout, io_threads=2, blocks=64)
    try:
        specs = [_spec(f"r{i}", s, docs[i][0], first_block=i * 32) for i, s in enumerate(spans)]
        assert _load(worker, *specs) == set()
        for spec, (_, kv) in zip(specs, docs):
            k, _ = _cached(worker, spec, LAYERS - 1)
            assert torch.equal(k, kv[-1][0])
        assert slow.most_running <= worker.config.io_threads  # read-ahead bounded by the read threads
        assert _all_buffers_back(worker)
    finally:
        worker.shutdown()


@pytest.mark.parametrize("codec", [None, "zstd:3"])  # a flipped byte of raw data, or of a compressed stream
def test_a_chunk_failing_mid_document_fails_it_and_the_rest_and_frees_every_buffer(store, layout, codec):
    tokens, kv = _document(3)
    spans = _publish(store, tokens, kv, codec)
    bad = 4
    path = store.inner.root / chunk_object_key(spans[bad].key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    worker = _worker(store, layout, io_threads=1)
    try:
        spec = _spec("r1", spans, tokens, first_block=0)
        failed = _load(worker, spec)
        first_bad_block = spans[bad].start // BLOCK
        assert failed == set(spec.block_ids[first_bad_block:])
        good = spans[bad].start
        for layer, (k, v) in enumerate(kv):
            k2, v2 = _cached(worker, spec, layer, end=good)
            assert torch.equal(k2, k[:good]) and torch.equal(v2, v[:good])
        assert worker.stats.data["failures"] == {"checksum": 1}
        assert _all_buffers_back(worker)
    finally:
        worker.shutdown()


def test_a_chunk_larger_than_a_buffer_still_loads(store, layout):
    """A buffer fits this engine's chunks; an object that does not fit (a bigger header,
    say) is read into memory of its own."""
    tokens, kv = _document(4)
    spans = _publish(store, tokens, kv)
    worker = _worker(store, layout, io_threads=1)
    try:
        worker.buffers = worker.loader.buffers = ReadBuffers(3, 16)
        store.into.clear()
        spec = _spec("r1", spans, tokens, first_block=0)
        assert _load(worker, spec) == set()
        k, v = _cached(worker, spec, 0)
        assert torch.equal(k, kv[0][0]) and torch.equal(v, kv[0][1])
        assert store.into == [False] * len(spans)
    finally:
        worker.shutdown()


def test_a_worker_whose_layout_fails_the_probe_neither_loads_nor_publishes(store):
    """A layout that disagrees with vLLM's own CPU op (here: K and V swapped on write)
    must never write a byte: every load is a counted miss, publishes are refused, and the
    scheduler is told to stop planning loads."""
    from vllm_kvcdn.connector.kv_layout import CpuAttnLayout
    from vllm_kvcdn.connector.wire import SaveSpec

    class WritesVForK(CpuAttnLayout):
        def write(self, cache, k, v, slots):
            super().write(cache, v, k, slots)

        def engine_write_op(self):
            return CpuAttnLayout.write.__get__(self)  # the engine's op, untouched

    tokens, kv = _document(5)
    spans = _publish(store, tokens, kv)
    worker = _worker(store, "cpu_attn", io_threads=1,
                     layout_factory=lambda cache, **_: WritesVForK(torch.bfloat16, BLOCK, DIM, "auto"))
    try:
        assert "layout probe failed" in worker.refusal
        assert worker.stats.data["layout_probe_failures"] == 1
        spec = _spec("r1", spans, tokens, first_block=0)
        assert _load(worker, spec) == set(spec.block_ids)
        assert worker.stats.data["failures"] == {"layout_mismatch": 1}  # one counted miss per load
        assert all(int(c.count_nonzero()) == 0 for c in worker.caches)
        report = worker.build_worker_meta()
        assert report.refusal == worker.refusal and report.failed_loads == {"r1"}
        worker.wait_for_save(KVCDNMetadata(saves=[SaveSpec("p1", "doc", tokens[:BLOCK], [0], spans[:1])]))
        (result,) = worker.build_worker_meta().documents["p1"]
        assert not result.ok and result.as_report()["published"] is False
    finally:
        worker.shutdown()


@pytest.mark.parametrize("codec", [None, "zstd:3"])
def test_a_chunk_goes_to_the_cache_device_in_one_copy(store, codec):
    """Every layer's K and V of a chunk read into a (pinned, on CUDA) read buffer leave it
    in one copy: the tensors handed to the layout all view one new allocation. (On CPU the
    "device" copy lands in host memory; the path is the GPU's.) A compressed chunk is
    decoded into the same buffer, so it leaves the same way."""
    from vllm_kvcdn.artifact.documents import read_chunk
    from vllm_kvcdn.connector.device_copies import CacheDevice, _span_in

    tokens, kv = _document(6)
    spans = _publish(store, tokens, kv, codec)
    buffer = ReadBuffers(1, 1 << 20).acquire()
    chunk, _ = read_chunk(store, spans[0].key, buffer)
    assert _span_in(chunk.keys + chunk.values, buffer) is not None
    device = CacheDevice(torch.device("cpu"))
    device.moves = True
    moved = device.upload(chunk.keys + chunk.values, buffer)
    assert len({t.untyped_storage().data_ptr() for t in moved}) == 1
    assert all(t.untyped_storage().data_ptr() != chunk.keys[0].untyped_storage().data_ptr() for t in moved)
    for (k, v), k2, v2 in zip(kv, moved[:LAYERS], moved[LAYERS:]):
        assert torch.equal(k2, k[:CHUNK]) and torch.equal(v2, v[:CHUNK])


def _failed_for_recompute(worker) -> int:
    return worker.stats.data.get("failures", {}).get("recompute_faster", 0)


def test_a_slowed_store_gets_recompute_and_a_recovered_one_gets_loads_again(tmp_path, layout):
    """Reads of a real file store slowed and healed at run time (a delay file); the
    engine's prefill rate as its step clock reports it (1 us a token, an H100's order)."""
    delay = tmp_path / "delay"
    store = LatencyStore(FileStore(tmp_path / "store"), delay_file=str(delay))
    tokens, kv = _document(7)
    spans = _publish(store, tokens, kv)[:2]
    worker = _worker(store, layout)
    worker.costs.observe_step(10_000, 0.01)
    delay.write_text("0")
    assert _load(worker, _spec("fast", spans, tokens, 0)) == set()
    delay.write_text("0.2")
    assert _load(worker, _spec("slowed", spans, tokens, 0)) == set()  # measured fast so far: loaded
    for n in range(3):  # slow now: recomputed, each skip probing the store once
        if n == 1:
            delay.write_text("0")  # healed: the probes see it
        spec = _spec(f"skip{n}", spans, tokens, 10)
        assert _load(worker, spec) == set(spec.block_ids[:2]), n
        assert worker.costs.wait_for_probes(10)
    assert _failed_for_recompute(worker) == 3
    spec = _spec("back", spans, tokens, 20)
    assert _load(worker, spec) == set()  # two fast probes of three reads: loads again
    # What the planner believes goes out as gauges (vllm:kvcdn_store_read_seconds, ...).
    assert worker.stats.data["store_read_seconds"] < 0.2 and worker.stats.data["prefill_seconds_per_token"] == 1e-6
    for layer in range(LAYERS):
        k, v = _cached(worker, spec, layer, 2 * CHUNK)
        assert torch.equal(k, kv[layer][0][: 2 * CHUNK]) and torch.equal(v, kv[layer][1][: 2 * CHUNK])


def test_a_hot_prefix_loads_from_ram_and_the_slow_rest_is_recomputed(tmp_path, layout):
    """Per source: chunk 0 is in the RAM tier, the store is known slow (its last reads
    took 0.2 s each): chunk 0 loads, chunks 1 and 2 are recomputed."""
    tokens, kv = _document(8)
    store = FileStore(tmp_path / "store")
    spans = _publish(store, tokens, kv)[:3]
    worker = _worker(store, layout, ram_tier_gib=0.01)
    assert _load(worker, _spec("warm", spans[:1], tokens, 0)) == set()  # chunk 0 into the RAM tier
    worker.costs.observe_step(10_000, 0.01)
    for _ in range(3):
        worker.costs.observe_read("store", 0.2)
    spec = _spec("prefix", spans, tokens, 30)
    assert _load(worker, spec) == set(spec.block_ids[1:3])
    k, _ = _cached(worker, spec, 0, CHUNK)
    assert torch.equal(k, kv[0][0][:CHUNK])
    assert worker.stats.data["ram_tier_hits"] == 1 and _failed_for_recompute(worker) == 1
