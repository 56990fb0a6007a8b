"""Worker half: copy verified chunks into the paged KV cache; save published prompts.

Nothing here holds the engine step for store I/O (``async_io``, the default):
- Loads are asynchronous in vLLM's sense: the request waits (``WAITING_FOR_REMOTE_KVS``)
  while a background job reads its chunks (in parallel), verifies, decodes and writes
  them into the request's blocks; ``get_finished`` reports it once the job has ended, and
  only then does vLLM register its blocks in the prefix cache. Writing from the job is
  safe: those blocks belong to the waiting request alone, and vLLM keeps them even when
  the request is aborted until we report it finished (``scheduler.finish_requests``
  delays the free of a ``WAITING_FOR_REMOTE_KVS`` request, vLLM 0.32).
- A chunk that is missing, truncated, corrupt or made under another fingerprint is never
  written: its blocks are reported through vLLM's load-error channel, vLLM caches only
  the blocks before them and recomputes the rest (``kv_load_failure_policy="recompute"``).
- A publish copies the document's KV out of the paged cache in the step that ends its
  prefill (a memory copy: the blocks may be reused right after), then encodes, checks
  and writes it in the background. Its result (or a verify's verdict) goes back to the
  scheduler as worker metadata (``WorkerReport``), never through the store.
- On CUDA a chunk goes to the GPU in one copy from its pinned read buffer, on the load
  thread's side stream (``device_copies``). At start the layout is checked against the
  engine's own cache-write op (``layout_probe``); if they differ, nothing loads or publishes.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as ReadTimeout  # not the builtin before 3.11
from dataclasses import dataclass, field
from pathlib import Path

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from vllm_kvcdn import catalog
from vllm_kvcdn.config import KVCDNConfig, injected_faults
from vllm_kvcdn.connector.block_cache import PackedBlockCache
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.image_tier import BlockImageFiles, layout_id
from vllm_kvcdn.connector.io_threads import IOThreadPlacement
from vllm_kvcdn.connector.jobs import Outbox, pool, start_threads
from vllm_kvcdn.connector.kv_layout import PagedKVLayout, layout_for
from vllm_kvcdn.connector.layout_probe import probe_layout
from vllm_kvcdn.connector.metadata import ChunkLoad, KVCDNMetadata, LoadSpec, SaveSpec
from vllm_kvcdn.connector.read_buffers import ReadBuffers
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.documents import DocumentKV, compare_document, read_chunk, write_document
from vllm_kvcdn.fingerprint import Fingerprint
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.manifest import ArtifactError
from vllm_kvcdn.store import Store, StoreError
from vllm_kvcdn.store.breaker import CircuitOpen

logger = get_logger(__name__)

IDLE_WAIT_S = 0.005  # longest an idle step waits for a background job to end

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """What the worker tells the scheduler after a step."""

    failed_loads: set[str] = field(default_factory=set)  # their responses must not claim a hit
    # Loads that ended with every chunk written: request id -> {"loaded_tokens", "kv_bytes",
    # "store_bytes", "load_seconds"} (the scheduler meters them: ledger.py).
    loads: dict[str, dict] = field(default_factory=dict)
    documents: dict[str, dict] = field(default_factory=dict)  # publish/verify request id -> result
    refusal: str | None = None  # this worker will not load (its layout probe failed): stop planning loads

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "WorkerReport":
        if isinstance(other, WorkerReport):
            self.failed_loads |= other.failed_loads
            self.loads.update(other.loads)
            self.documents.update(other.documents)
            self.refusal = self.refusal or other.refusal
        return self


@dataclass
class _LoadOutcome:
    req_id: str
    failed_blocks: set[int] = field(default_factory=set)
    stats: KVCDNStats = field(default_factory=KVCDNStats)
    receipt: dict | None = None  # WorkerReport.loads' entry, when every chunk was written


@dataclass
class _DocumentOutcome:
    req_id: str
    result: dict
    stats: KVCDNStats = field(default_factory=KVCDNStats)


@dataclass(frozen=True)
class _Read:
    source: str  # "chunk": (DocumentKV, bytes read); "image": whether it is now in the RAM tier
    future: Future
    buffer: memoryview | None = None  # the pooled read buffer a chunk read fills (its tensors view it)


_NO_BUFFER = object()  # a read not started: no read buffer free


@dataclass(frozen=True)
class KVGeometry:
    """What an artifact must match to go into this engine's cache."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    model_dtype: torch.dtype
    cache_dtype: str  # vLLM's cache_dtype string ("auto", "fp8", ...)

    @property
    def kv_dtype(self) -> torch.dtype:
        if self.cache_dtype == "auto":
            return self.model_dtype
        fp8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
        return fp8.get(self.cache_dtype) or getattr(torch, self.cache_dtype)


class KVCDNWorker:
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, store: Store, geometry: KVGeometry,
                 io_cpus: frozenset[int] | None = None):
        self.config = config
        self.fingerprint = fingerprint
        self.store = store
        self.geometry = geometry
        self.stats = KVCDNStats()
        self.caches: list[torch.Tensor] = []
        self.layout: PagedKVLayout | None = None
        self.device: CacheDevice | None = None
        self.refusal: str | None = None  # why this worker neither loads nor publishes (a failed layout probe)
        self.ram: PackedBlockCache | None = None
        self.images: BlockImageFiles | None = None  # the RAM tier's slots on the node's disk
        self.buffers: ReadBuffers | None = None  # chunk reads go into these
        self._ram_lock = threading.Lock()  # the RAM tier is shared by concurrent load jobs
        inline = not config.async_io
        self.placement = IOThreadPlacement(io_cpus)
        start = self.placement.enter
        self._pool_threads = {
            "kvcdn-read": config.io_threads,  # chunk reads, in parallel
            "kvcdn-load": 2,  # one job per loading request
            "kvcdn-publish": 1,  # publishes, one at a time
            "kvcdn-image": 1,  # block images to disk
        }
        self._pools = {name: pool(n, name, inline=inline, on_start=start) for name, n in self._pool_threads.items()}
        self._reads, self._loads, self._writes, self._image_writes = self._pools.values()
        self._outbox = Outbox()
        self._failed_blocks: set[int] = set()
        self._report = WorkerReport()
        self._finished_loads: set[str] = set()  # loads ended (failed or not) since vLLM last asked
        self._tier_counts: dict[str, int] = {}  # the store's disk-tier counters, as last reported
        self._skip_partial_tail = "skip_partial_tail" in injected_faults()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.caches = [kv_caches[name] for name in layers_in_order(kv_caches)]
        g = self.geometry
        self.bytes_per_token = len(self.caches) * 2 * g.num_kv_heads * g.head_dim * g.kv_dtype.itemsize
        self.layout = layout_for(
            self.caches[0],
            block_size=g.block_size,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            model_dtype=g.model_dtype,
            cache_dtype=g.cache_dtype,
        )
        self.device = CacheDevice(self.caches[0].device)
        self._probe_layout()
        self._blocks = [self.layout.blocks(c) for c in self.caches]  # indexed by the manager's block ids
        ram_bytes = int(self.config.ram_tier_gib * (1 << 30))
        if ram_bytes and self.refusal is None:
            self.ram = PackedBlockCache(ram_bytes, self._blocks, self.config.chunk_size // g.block_size)
        if self.ram is not None and self.ram.num_slots and self.config.disk_cache_gib and self.config.disk_images:
            self.images = BlockImageFiles(Path(self.config.disk_cache_dir) / "images" / self._layout_id(),
                                          int(self.config.disk_cache_gib * (1 << 30)))
        # Every read thread busy, and two chunks read ahead of the ones being written.
        self.buffers = ReadBuffers(self.config.io_threads + 2, _chunk_object_bytes(
            self.config.chunk_size, len(self.caches), g.num_kv_heads, g.head_dim, g.kv_dtype),
            pin=self.device.is_cuda)
        self.placement.bind(lambda: self.layout.prime_thread(self.caches[0]))
        for name, executor in self._pools.items():
            start_threads(executor, self._pool_threads[name])  # their setup is not a request's to pay
        io_cpus = self.placement.io_cpus
        where = f"CPUs {sorted(io_cpus)}, and the compute CPUs in idle steps" if io_cpus else "the engine's CPUs"
        logger.info(
            "kvcdn: worker ready: %d layers, layout %s, store %s, RAM tier %.1f GiB, %d read buffers of "
            "%.0f MB, %s",
            len(self.caches), type(self.layout).__name__, self.store.url, self.config.ram_tier_gib,
            self.buffers.count, self.buffers.nbytes / 1e6,
            f"background I/O ({self.config.io_threads} read threads on {where})" if self.config.async_io
            else "in-step I/O",
        )

    def _probe_layout(self) -> None:
        """Check our layout against the engine's own cache-write op (``layout_probe``)."""
        g = self.geometry
        try:
            mismatch = probe_layout(self.layout, self.caches[0], num_kv_heads=g.num_kv_heads, head_dim=g.head_dim)
        except LookupError as e:
            logger.warning("kvcdn: KV layout %s not probed: %s", type(self.layout).__name__, e)
            return
        if mismatch is not None:
            cache = self.caches[0]
            self.refusal = (f"KV layout probe failed ({type(self.layout).__name__}, cache {tuple(cache.shape)} "
                            f"strides {cache.stride()}): {mismatch}")
            self.stats.add("layout_probe_failures")
            self._report.refusal = self.refusal
            logger.error("kvcdn: %s; this worker will not load or publish (requests are computed as usual)",
                         self.refusal)

    def _layout_id(self) -> str:
        """What a block image depends on besides the chunk's tokens."""
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        except (AssertionError, ImportError):  # no parallel state: a single worker
            rank = 0
        return layout_id(fingerprint=self.fingerprint.digest, layout=type(self.layout).__name__,
                         isa=getattr(self.layout, "isa", ""), shape=list(self.caches[0].shape[1:]),
                         dtype=str(self.caches[0].dtype), layers=len(self.caches),
                         chunk_size=self.config.chunk_size, rank=rank)

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end, dtype=torch.long)
        blocks = torch.tensor(block_ids, dtype=torch.long)[positions // self.geometry.block_size]
        return blocks * self.geometry.block_size + positions % self.geometry.block_size

    def shutdown(self) -> None:
        for executor in (self._reads, self._loads):
            executor.shutdown(wait=False, cancel_futures=True)
        self._writes.shutdown(wait=True)  # a publish under way finishes: its manifest is written last
        self._image_writes.shutdown(wait=True)  # a few files: the next start reads them

    # -- per step ----------------------------------------------------------------

    def start_load_kv(self, meta: KVCDNMetadata) -> None:
        self.placement.engine_idle(meta.idle)
        for spec in meta.loads:
            self._submit_load(spec)

    def wait_for_save(self, meta: KVCDNMetadata) -> None:
        for spec in meta.saves:
            self._submit_save(spec)

    def collect(self, idle: bool = False) -> None:
        """Take the outcomes of jobs that ended since the last step; in a step that
        computed nothing, wait a little for one (vLLM steps again at once otherwise)."""
        counts = self.store.tier_counts()
        for name, n in counts.items():
            if n != self._tier_counts.get(name, 0):
                self.stats.add(name, n - self._tier_counts.get(name, 0))
        self._tier_counts = counts
        for outcome in self._outbox.take(IDLE_WAIT_S if idle else 0.0):
            self.stats.aggregate(outcome.stats)
            if isinstance(outcome, _LoadOutcome):
                self._finished_loads.add(outcome.req_id)
                if outcome.failed_blocks:
                    self._failed_blocks |= outcome.failed_blocks
                    self._report.failed_loads.add(outcome.req_id)
                elif outcome.receipt is not None:
                    self._report.loads[outcome.req_id] = outcome.receipt
            else:
                self._report.documents[outcome.req_id] = outcome.result

    def take_finished_loads(self, idle: bool = False) -> set[str]:
        """Requests whose load ended, failed or not (vLLM's ``finished_recving``); a failed
        one's blocks go out through ``get_block_ids_with_load_errors`` in the same pass."""
        self.collect(idle)
        done, self._finished_loads = self._finished_loads, set()
        return done

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_worker_meta(self) -> WorkerReport | None:
        r = self._report
        if not r.failed_loads and not r.loads and not r.documents and not r.refusal:
            return None
        report, self._report = self._report, WorkerReport()
        return report

    # -- loading (a background job per request) ------------------------------------

    def _submit_load(self, spec: LoadSpec) -> None:
        def on_error(e: BaseException) -> _LoadOutcome:
            logger.error("kvcdn: load job for request %s failed: %r", spec.req_id, e)
            outcome = _LoadOutcome(spec.req_id)
            self._fail(outcome, spec, spec.chunks, "error", repr(e))
            return outcome

        self._outbox.run(self._loads, lambda: self._load_request(spec), on_error)

    def _load_request(self, spec: LoadSpec) -> _LoadOutcome:
        started = time.perf_counter()
        deadline = started + self.config.load_timeout_s
        outcome = _LoadOutcome(spec.req_id)
        if self.refusal is not None:
            self._fail(outcome, spec, spec.chunks, "layout_mismatch", self.refusal)
            return outcome
        # Reads run ahead, in parallel, as far as free read buffers allow; chunks are
        # written in order as their reads end, each one's buffer freed once written.
        reads: list[_Read | None] = []
        loaded_tokens = 0
        for n, chunk in enumerate(spec.chunks):
            try:
                self._read_ahead(spec.chunks, n, reads, deadline)
                with self.device.side_stream():  # waits for its copies: then the buffer may go back
                    self._write_chunk(spec, n, reads, outcome.stats, deadline)
            except (ArtifactError, StoreError) as e:
                reason = e.reason if isinstance(e, ArtifactError) else _store_failure(e)
                self._fail(outcome, spec, spec.chunks[n:], reason, str(e))
                break
            except ReadTimeout:
                why = f"the store did not answer within load_timeout_s={self.config.load_timeout_s}s"
                self._fail(outcome, spec, spec.chunks[n:], "timeout", why)
                break
            except Exception as e:  # never take the engine down: recompute instead
                logger.exception("kvcdn: unexpected error loading chunk %s", chunk.key[:16])
                self._fail(outcome, spec, spec.chunks[n:], "error", repr(e))
                break
            finally:
                if n < len(reads):
                    self._let_go(reads[n])
                    reads[n] = None
            loaded_tokens += chunk.write_to - chunk.write_from
        for read in reads:
            self._let_go(read)  # those read ahead of a failed chunk
        seconds = time.perf_counter() - started
        outcome.stats.add("loaded_tokens", loaded_tokens)
        outcome.stats.add("loaded_bytes", loaded_tokens * self.bytes_per_token)
        outcome.stats.observe("load_duration_seconds", seconds)
        if not outcome.failed_blocks:
            outcome.receipt = {"loaded_tokens": loaded_tokens, "kv_bytes": loaded_tokens * self.bytes_per_token,
                               "store_bytes": outcome.stats.data.get("store_read_bytes", 0), "load_seconds": seconds}
        return outcome

    def _whole_blocks(self, chunk: ChunkLoad) -> tuple[int, int]:
        """Prompt positions [first, last) of the chunk's whole blocks inside its write range."""
        bs = self.geometry.block_size
        return -(-chunk.write_from // bs) * bs, chunk.write_to // bs * bs

    def _read_ahead(self, chunks: list[ChunkLoad], n: int, reads: list[_Read | None], deadline: float) -> None:
        """Start the reads after ``reads`` (those started, in chunk order) while read
        buffers are free. When chunk ``n``, written next, has none started, wait for a
        buffer: this job then holds none (the chunks before it are written), and the jobs
        holding the others write and free theirs without waiting for any."""
        while len(reads) < len(chunks):
            must = len(reads) == n
            read = self._start_read(chunks[len(reads)], max(0.0, deadline - time.perf_counter()) if must else 0.0)
            if read is _NO_BUFFER:
                if must:
                    raise ReadTimeout()
                return
            reads.append(read)

    def _start_read(self, chunk: ChunkLoad, wait_s: float = 0.0):
        """Nothing when the RAM tier holds what the chunk needs; else its block image (into
        the RAM tier) when the node's disk holds one, else the chunk itself, into a read
        buffer free within ``wait_s`` (``_NO_BUFFER`` if none)."""
        first, last = self._whole_blocks(chunk)
        if self.ram is not None and first < last and first <= chunk.write_from and last >= chunk.write_to:
            blocks = (last - chunk.start) // self.geometry.block_size
            if self.ram.holds(chunk.key, blocks):
                return None
            if self.images is not None and self.images.blocks(chunk.key) >= blocks:
                return _Read("image", self._reads.submit(self._read_image, chunk.key))
        buffer = self.buffers.acquire(wait_s)
        if buffer is None:
            return _NO_BUFFER
        return _Read("chunk", self._reads.submit(self._read_chunk, chunk, buffer), buffer)

    def _let_go(self, read: _Read | None) -> None:
        """Cancel the read if it has not started; its buffer goes back once it has ended
        (the caller no longer uses what it read)."""
        if read is None:
            return
        read.future.cancel()
        if read.buffer is not None:
            read.future.add_done_callback(lambda _: self.buffers.release(read.buffer))

    def _write_chunk(self, spec: LoadSpec, n: int, reads: list[_Read | None], stats: KVCDNStats,
                     deadline: float) -> None:
        """Write chunk ``n``'s tokens [write_from, write_to) into the request's slots: whole
        blocks from the RAM tier when it holds them, everything else from the verified file
        (read by ``reads[n]``, or by a read started here into ``reads[n]``)."""
        chunk, read = spec.chunks[n], reads[n]
        if self._skip_partial_tail and chunk.is_tail:
            return  # test fault: claim the tail, leave its slots stale (proves the tests can see it)
        if read is not None and read.source == "image":
            promoted = read.future.result(timeout=max(0.0, deadline - time.perf_counter()))
            stats.add("image_tier_hits" if promoted else "image_tier_misses")
            read = None
        bs = self.geometry.block_size
        first, last = self._whole_blocks(chunk)
        todo = [(chunk.write_from, chunk.write_to)]
        if self.ram is not None and first < last:
            with self._ram_lock:  # an eviction must not reuse the slot while we copy from it
                image = self.ram.get(chunk.key, (first - chunk.start) // bs, (last - chunk.start) // bs)
                if image is not None:
                    ids = self.device.index(self._block_ids(spec, first, last))
                    for cache, layer_image in zip(self.caches, self.device.upload_view(image)):
                        self.layout.write_blocks(cache, ids, layer_image)
            if image is not None:
                todo = [r for r in ((chunk.write_from, first), (last, chunk.write_to)) if r[0] < r[1]]
                stats.add("ram_tier_hits")
        if not todo:
            return
        if read is None:  # the RAM tier lost it meanwhile, or its image was no good
            buffer = self.buffers.acquire()  # none free: a buffer of its own (waiting could deadlock)
            read = reads[n] = _Read("chunk", self._reads.submit(self._read_chunk, chunk, buffer), buffer)
        kv, nbytes = read.future.result(timeout=max(0.0, deadline - time.perf_counter()))
        stats.add("store_read_bytes", nbytes)
        layers = len(kv.keys)
        on_device = self.device.upload(kv.keys + kv.values, read.buffer)  # one copy for the chunk
        for start, end in todo:
            slots = self.device.index(self._slots(spec.block_ids, start, end))
            a, b = start - chunk.start, end - chunk.start
            for cache, k, v in zip(self.caches, on_device[:layers], on_device[layers:]):
                self.layout.write(cache, k[a:b], v[a:b], slots)
        whole_end = chunk.start + chunk.num_tokens // bs * bs
        if self.ram is not None and todo == [(chunk.write_from, chunk.write_to)] and chunk.write_from == chunk.start \
                and whole_end > chunk.start and chunk.write_to >= whole_end:
            with self._ram_lock:
                ids = self.device.index(self._block_ids(spec, chunk.start, whole_end))
                self.ram.put(chunk.key, self._blocks, ids)
                pinned = self.ram.pin(chunk.key) if self.images is not None else None
            if pinned is not None:
                self._image_writes.submit(self._write_image, chunk.key, *pinned)

    def _read_image(self, key: str) -> bool:
        """Read the chunk's block image from the node's disk into a RAM-tier slot."""
        with self._ram_lock:
            slot = self.ram.reserve()
        if slot is None:
            return False
        blocks = 0
        try:
            blocks = self.images.read_into(key, self.ram.slot(slot))
        finally:
            with self._ram_lock:
                if blocks:
                    self.ram.commit(key, slot, blocks)
                else:
                    self.ram.release(slot)
        return blocks > 0

    def _write_image(self, key: str, slot: torch.Tensor, blocks: int) -> None:
        try:
            self.images.write(key, slot, blocks)
        except Exception:  # a background copy: it costs a later read speed, never a load
            logger.exception("kvcdn: could not write the block image of chunk %s", key[:16])
        finally:
            with self._ram_lock:
                self.ram.unpin(key)

    def _read_chunk(self, chunk: ChunkLoad, into: memoryview | None = None):
        g = self.geometry
        return read_chunk(
            self.store, chunk.key, into, fingerprint=self.fingerprint.digest, dtype=g.kv_dtype,
            num_layers=len(self.caches), num_kv_heads=g.num_kv_heads, head_dim=g.head_dim,
            tokens=chunk.tokens, verify=self.config.verify_checksums,
        )

    def _block_ids(self, spec: LoadSpec, start: int, end: int) -> torch.Tensor:
        """Ids of the request's blocks holding positions [start, end) (block-aligned)."""
        bs = self.geometry.block_size
        return torch.tensor(spec.block_ids[start // bs : end // bs], dtype=torch.long)

    def _fail(self, outcome: _LoadOutcome, spec: LoadSpec, chunks, reason: str, message: str) -> None:
        """Report every block from the failed chunk on: vLLM recomputes them."""
        bs = self.geometry.block_size
        for chunk in chunks:
            first, last = chunk.write_from // bs, (chunk.write_to - 1) // bs
            outcome.failed_blocks.update(spec.block_ids[first : last + 1])
        outcome.stats.fail(reason)
        logger.warning("kvcdn: load miss for request %s (%s): %s; recomputing", spec.req_id, reason, message)

    # -- publishing and verifying (copied out in the step, written in the background) ----

    def _submit_save(self, spec: SaveSpec) -> None:
        if self.refusal is not None:
            logger.warning("kvcdn: request %s not %s: %s", spec.req_id, "verified" if spec.verify else "published",
                           self.refusal)
            self._report.documents[spec.req_id] = _failed_result(spec, self.refusal)
            return
        try:
            slots = self.device.index(self._slots(spec.block_ids, 0, len(spec.token_ids)))
            # a copy, to the host: the blocks may be reused next step
            kv = [tuple(t.cpu() for t in self.layout.read(cache, slots)) for cache in self.caches]
        except Exception as e:
            logger.exception("kvcdn: could not copy request %s out of the KV cache", spec.req_id)
            self.stats.fail("publish_error")
            self._report.documents[spec.req_id] = _failed_result(spec, repr(e))
            return

        def on_error(e: BaseException) -> _DocumentOutcome:
            logger.error("kvcdn: %s of request %s failed: %r", "verify" if spec.verify else "publish",
                         spec.req_id, e)
            outcome = _DocumentOutcome(spec.req_id, _failed_result(spec, repr(e)))
            outcome.stats.fail("publish_error")
            return outcome

        job = (lambda: self._verify_document(spec, kv)) if spec.verify else (lambda: self._write_document(spec, kv))
        self._outbox.run(self._writes, job, on_error)

    def _write_document(self, spec: SaveSpec, kv: DocumentKV) -> _DocumentOutcome:
        written = write_document(
            self.store, spans=spec.spans, tokens=spec.token_ids, kv=kv, fingerprint=self.fingerprint.digest,
            profile=self.fingerprint.fields, chunk_size=self.config.chunk_size,
            producer={**_producer(), "prefill": spec.prefill, "adapter": spec.adapter_name or None},
            salted=spec.salted, adapter=spec.adapter, title=spec.title, metadata=spec.metadata,
            codec=self.config.chunk_codec,
        )
        m = written.manifest
        outcome = _DocumentOutcome(spec.req_id, {
            "published": True, "document": m.doc_id, "num_tokens": m.num_tokens, "num_chunks": len(m.chunks),
            "new_chunks": written.new_chunks, "new_bytes": written.new_bytes,
            "write_seconds": round(written.seconds, 4), "prefill": spec.prefill,
        })
        outcome.stats.add("published_documents")
        outcome.stats.add("published_chunks", written.new_chunks)
        outcome.stats.add("published_bytes", written.new_bytes)
        outcome.stats.observe("publish_duration_seconds", written.seconds)
        logger.info(
            "kvcdn: published document %s: %d tokens, %d chunks (%d new, %d bytes) in %.3fs",
            m.doc_id[:16], m.num_tokens, len(m.chunks), written.new_chunks, written.new_bytes, written.seconds,
        )
        return outcome

    def _verify_document(self, spec: SaveSpec, kv: DocumentKV) -> _DocumentOutcome:
        """Compare a fresh prefill with the stored chunks, byte for byte."""
        manifest = catalog.get_manifest(self.store, spec.doc_id)
        if manifest is None or manifest.num_tokens != len(spec.token_ids) \
                or manifest.fingerprint != self.fingerprint.digest or manifest.adapter != spec.adapter:
            why = "not published for this model and adapter, or published from other tokens"
            return _DocumentOutcome(spec.req_id, _failed_result(spec, f"cannot verify {spec.doc_id[:16]}: {why}"))
        verdict = compare_document(self.store, manifest, spec.token_ids, kv)
        logger.info("kvcdn: verified %s: %s", spec.doc_id[:16], "identical" if verdict["identical"] else "DIFFERS")
        return _DocumentOutcome(spec.req_id, {"verified": True, **verdict, "prefill": spec.prefill})


def layers_in_order(kv_caches: dict) -> list[str]:
    """The caches' layer names by layer index: an artifact's layer i is the model's layer
    i. Two caches with one index (a draft model's layer 0 beside the target's) or a gap
    would put KV in the wrong layer: refused."""
    by_index: dict[int, str] = {}
    for name in kv_caches:
        found = _LAYER_INDEX.search(name)
        if found is None:
            raise ValueError(f"kvcdn: cannot tell the layer index of KV cache {name!r}")
        index = int(found.group(1))
        if index in by_index:
            raise ValueError(f"kvcdn: KV caches {by_index[index]!r} and {name!r} are both layer {index} "
                             "(a draft model's layers?); kvcdn loads one model's layers")
        by_index[index] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"kvcdn: KV cache layers {sorted(by_index)} are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _chunk_object_bytes(chunk_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
    """Room for a stored chunk of this geometry: its K and V, its token ids and a header."""
    header_room = 64 << 10  # the safetensors header: a few hundred bytes per layer
    return chunk_size * (num_layers * 2 * num_kv_heads * head_dim * dtype.itemsize + 4) + header_room


def _store_failure(e: StoreError) -> str:
    return "store_unavailable" if isinstance(e, CircuitOpen) else "store_error"


def _failed_result(spec: SaveSpec, error: str) -> dict:
    return {"verified" if spec.verify else "published": False, "document": spec.doc_id, "error": error,
            "prefill": spec.prefill}


def _producer() -> dict:
    import vllm

    from vllm_kvcdn import __version__

    return {"engine": "vllm", "vllm": vllm.__version__, "kvcdn": __version__, "torch": torch.__version__}
