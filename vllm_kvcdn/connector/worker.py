"""Worker half: runs the loads and saves the scheduler half planned, and reports back.

Nothing here holds the engine step for store I/O (``async_io``, the default):
- A load is asynchronous in vLLM's sense: the request waits (``WAITING_FOR_REMOTE_KVS``)
  while a background job (``loader``) reads, verifies and writes its chunks into the
  request's blocks; ``get_finished`` reports it once the job has ended, and only then does
  vLLM register its blocks in the prefix cache. Writing from the job is safe: those blocks
  belong to the waiting request alone, and vLLM keeps them even when the request is
  aborted until we report it finished (``scheduler.finish_requests`` delays the free of a
  ``WAITING_FOR_REMOTE_KVS`` request, vLLM 0.32).
- A chunk that cannot be used is never written: its blocks go out through vLLM's
  load-error channel, vLLM caches only the blocks before them and recomputes the rest
  (``kv_load_failure_policy="recompute"``).
- A publish (``saver``) copies the document's KV out in the step that ends its prefill and
  writes it in the background; its result goes back in the ``WorkerReport``. On a node with
  a disk tier of block images, the same step keeps the document's blocks in the block tier
  (a RAM slot, whose image goes to disk): after a restart the node reads the document back
  without the packing op, and until then serves it from RAM. Without one, a publish leaves
  the RAM tier to the documents requests read.
- At start the layout is checked against the engine's own cache-write op
  (``layout_probe``); if they differ, nothing loads or publishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from vllm_kvcdn.artifact.documents import DocumentKV, read_chunk
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.artifact.parts import KVPart
from vllm_kvcdn.artifact.provenance import tier_key
from vllm_kvcdn.config import KVCDNConfig, injected_faults
from vllm_kvcdn.connector.block_tier import BlockTier
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.geometry import KVGeometry, layers_in_order
from vllm_kvcdn.connector.image_tier import layout_id
from vllm_kvcdn.connector.io_threads import IOThreadPlacement
from vllm_kvcdn.connector.jobs import Outbox, pool, start_threads
from vllm_kvcdn.connector.kv_layout import layout_for
from vllm_kvcdn.connector.layout_probe import probe_layout
from vllm_kvcdn.connector.load_costs import LoadCosts
from vllm_kvcdn.connector.loader import ChunkLoader, LoadOutcome
from vllm_kvcdn.connector.read_buffers import ReadBuffers
from vllm_kvcdn.connector.saver import DocumentOutcome, DocumentSaver
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.connector.step_clock import StepClock
from vllm_kvcdn.connector.wire import ChunkLoad, DocumentResult, KVCDNMetadata, LoadSpec, SaveSpec, WorkerReport
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store
from vllm_kvcdn.store.lru import DiskLRU

logger = get_logger(__name__)


@dataclass
class _Staged:
    """A published chunk's copies, made in its step, named once its checksum is known."""

    key: str  # chunk key
    slot: int | None  # the staged RAM-tier slot of its whole blocks (None: none, or no slot free)
    blocks: int  # whole blocks in the slot
    tail: list[torch.Tensor] | None  # its partial last block: every layer's K, then V (None: none)


class KVCDNWorker:
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, store: Store, geometry: KVGeometry,
                 io_cpus: frozenset[int] | None = None, layout_factory=layout_for, part: KVPart | None = None):
        """``layout_factory(cache, **geometry)``: the ``PagedKVLayout`` of the engine's
        caches (``kv_layout.layout_for``; tests name one). ``part``: the KV heads this
        tensor-parallel rank holds (None: all; ``geometry.num_kv_heads`` counts them)."""
        self.config, self.fingerprint, self.store, self.geometry = config, fingerprint, store, geometry
        self.part = part
        self._part_name = part.name if part is not None else ""
        self._layout_factory = layout_factory
        self.stats = KVCDNStats()
        self.refusal: str | None = None  # why this worker neither loads nor publishes (a failed layout probe)
        # Signatures vouch for checksums: where they are needed, a chunk's data is always hashed.
        self._verify_data = config.verify_checksums or config.trust_policy().requires_signatures
        self.keys = config.keyring()  # opens (and seals) private documents' chunks
        self.tier: BlockTier | None = None  # RAM slots and their disk images (register_kv_caches)
        self.placement = IOThreadPlacement(io_cpus)
        self._pool_threads = {
            "kvcdn-read": config.io_threads,  # chunk reads, in parallel
            "kvcdn-load": config.load_jobs,  # one job per loading request
            "kvcdn-publish": 1,  # publishes, one at a time
            "kvcdn-image": 1,  # block images to disk
        }
        self._pools = {name: pool(n, name, inline=not config.async_io, on_start=self.placement.enter)
                       for name, n in self._pool_threads.items()}
        self._reads, self._loads, self._writes, self._image_writes = self._pools.values()
        self._outbox = Outbox()
        self._failed_blocks: set[int] = set()
        self._report = WorkerReport()
        self._finished_loads: set[str] = set()  # loads ended (failed or not) since vLLM last asked
        self._tier_counts: dict[str, int] = {}  # every tier's counters, as last reported
        self.costs = LoadCosts(config.io_threads, config.recompute_margin_s, enabled=config.load_policy == "measured")
        self._estimates: dict[str, float] = {}  # the costs' estimates, as last reported

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        g, config = self.geometry, self.config
        first_layer = self.part.first_layer if self.part is not None else 0
        self.caches = [kv_caches[name] for name in layers_in_order(kv_caches, first_layer)]
        self.layout = self._layout_factory(self.caches[0], block_size=g.block_size, num_kv_heads=g.num_kv_heads,
                                           head_dim=g.head_dim, model_dtype=g.model_dtype, cache_dtype=g.cache_dtype)
        self.device = CacheDevice(self.caches[0].device)
        self.clock = StepClock(self.caches[0].device, self.costs.observe_step)
        self._probe_layout()

        if config.ram_tier_gib and self.refusal is None:
            images = config.disk_cache_gib and config.disk_images
            budget = (self.store.disk_budget() or DiskLRU(int(config.disk_cache_gib * (1 << 30)))) if images else None
            self.tier = BlockTier([self.layout.blocks(c) for c in self.caches], int(config.ram_tier_gib * (1 << 30)),
                                  config.chunk_size // g.block_size,
                                  Path(config.disk_cache_dir) / "images" / self._layout_id() if images else None,
                                  budget, self._image_writes,
                                  tail_token=((2 * len(self.caches), g.num_kv_heads, g.head_dim), g.kv_dtype))
        # Every read thread busy, and two chunks read ahead of the ones being written.
        self.buffers = ReadBuffers(config.io_threads + 2, g.chunk_object_bytes(config.chunk_size, len(self.caches)),
                                   pin=self.device.is_cuda)
        collaborators = dict(geometry=g, caches=self.caches, layout=self.layout, device=self.device)
        self.loader = ChunkLoader(**collaborators, buffers=self.buffers, read_chunk=self._read_chunk,
                                  reads=self._reads, tier=self.tier, timeout_s=config.load_timeout_s,
                                  costs=self.costs, part=self._part_name,
                                  skip_partial_tail="skip_partial_tail" in injected_faults())
        self.saver = DocumentSaver(**collaborators, store=self.store, fingerprint=self.fingerprint,
                                   chunk_size=config.chunk_size, codec=config.chunk_codec, part=self.part,
                                   keys=self.keys)
        self.placement.bind(lambda: self.layout.prime_thread(self.caches[0]))
        for name, executor in self._pools.items():
            start_threads(executor, self._pool_threads[name])  # their setup is not a request's to pay
        io_cpus = self.placement.io_cpus
        where = f"CPUs {sorted(io_cpus)}, and the compute CPUs in idle steps" if io_cpus else "the engine's CPUs"
        logger.info(
            "kvcdn: worker ready: %d layers%s, layout %s, store %s, RAM tier %.1f GiB, %d read buffers of "
            "%.0f MB, %s",
            len(self.caches), f", KV heads {self._part_name}" if self._part_name else "", type(self.layout).__name__,
            self.store.url, config.ram_tier_gib,
            self.buffers.count, self.buffers.nbytes / 1e6,
            f"background I/O ({config.io_threads} read threads on {where})" if config.async_io else "in-step I/O",
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
        """What a block image depends on besides the chunk's tokens (each rank its own heads)."""
        return layout_id(fingerprint=self.fingerprint.digest, layout=type(self.layout).__name__,
                         isa=getattr(self.layout, "isa", ""), shape=list(self.caches[0].shape[1:]),
                         dtype=str(self.caches[0].dtype), layers=len(self.caches),
                         chunk_size=self.config.chunk_size, part=self._part_name)

    def _read_chunk(self, chunk: ChunkLoad, into: memoryview | None = None):
        g = self.geometry
        expected = chunk.checksums.get(self._part_name)
        if chunk.checksums and expected is None:
            raise ArtifactError("mismatch", f"chunk {chunk.key[:16]}: its manifest names no part "
                                            f"{self._part_name or '(whole)'}")
        return read_chunk(self.store, chunk.key, into, self._part_name, keys=self.keys,
                          fingerprint=self.fingerprint.digest,
                          dtype=g.kv_dtype, num_layers=len(self.caches), num_kv_heads=g.num_kv_heads,
                          head_dim=g.head_dim, tokens=chunk.tokens, verify=self._verify_data,
                          expected_checksum=expected)

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

    def step_started(self, meta: KVCDNMetadata) -> None:
        """The step's forward pass begins (timed: the engine's prefill rate, ``load_costs``)."""
        self.clock.step_started(meta.scheduled_tokens)

    def wait_for_save(self, meta: KVCDNMetadata) -> None:
        self.clock.step_ended()
        for spec in meta.saves:
            self._submit_save(spec)

    def collect(self, idle: bool = False) -> None:
        """Take the outcomes of jobs that ended since the last step; in a step that
        computed nothing, wait a little for one (vLLM steps again at once otherwise)."""
        for outcome in self._outbox.take(self.config.idle_wait_s if idle else 0.0):
            self.stats.aggregate(outcome.stats)
            if isinstance(outcome, LoadOutcome):
                self._finished_loads.add(outcome.req_id)
                if outcome.failed_blocks:
                    self._failed_blocks |= outcome.failed_blocks
                    self._report.failed_loads.add(outcome.req_id)
                if outcome.receipt is not None:  # in the same report as its failure, if any
                    self._report.loads.setdefault(outcome.req_id, []).append(outcome.receipt)
            else:
                self._report.documents.setdefault(outcome.req_id, []).append(outcome.result)
        for name, value in self.costs.estimates().items():  # the planner's view, for /metrics
            if value != self._estimates.get(name):
                self.stats.set_gauge(name, value)
                self._estimates[name] = value
        # After the outcomes: a job's tier counts are in before its outcome is queued.
        counts = {**self.store.tier_counts(), **(self.tier.tier_counts() if self.tier is not None else {})}
        for name, n in counts.items():
            if n != self._tier_counts.get(name, 0):
                self.stats.add(name, n - self._tier_counts.get(name, 0))
        self._tier_counts = counts

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
        if not self._report:
            return None
        report, self._report = self._report, WorkerReport()
        return report

    # -- jobs ----------------------------------------------------------------------

    def _submit_load(self, spec: LoadSpec) -> None:
        def on_error(e: BaseException) -> LoadOutcome:
            logger.error("kvcdn: load job for request %s failed: %r", spec.req_id, e)
            return self.loader.fail(LoadOutcome(spec.req_id), spec, spec.chunks, "error", repr(e))

        if self.refusal is not None:
            job = partial(self.loader.fail, LoadOutcome(spec.req_id), spec, spec.chunks, "layout_mismatch",
                          self.refusal)
        else:
            job = partial(self.loader.load, spec)
        self._outbox.run(self._loads, job, on_error)

    def _stage_blocks(self, spec: SaveSpec, kv: DocumentKV) -> list[_Staged]:
        """Each published chunk's whole blocks copied into a staged RAM-tier slot now (the
        blocks may be reused next step), and its partial last block's K/V (views of ``kv``):
        named once the publish has stored the chunks and knows their checksums
        (``_keep_published``). This engine's own bytes for those tokens."""
        g, staged = self.geometry, []
        for span in spec.spans:
            tail_start = span.start + span.num_tokens // g.block_size * g.block_size
            slot = None
            if tail_start > span.start:
                slot = self.tier.stage(self.device.index(g.block_ids(spec.block_ids, span.start, tail_start)))
            tail = None
            if tail_start < span.end:
                tail = [k[tail_start:span.end] for k, _ in kv] + [v[tail_start:span.end] for _, v in kv]
            staged.append(_Staged(span.key, slot, (tail_start - span.start) // g.block_size, tail))
        return staged

    def _keep_published(self, staged: list[_Staged], outcome: DocumentOutcome | None, private: bool) -> None:
        """Name the staged copies by the checksums the publish stored (``tier_key``), so a
        load finds them only for a manifest that records those bytes; a failed publish's
        copies go, and so do those of a chunk whose stored bytes are not these (a vouched
        one kept). A private document's stay in RAM."""
        stored = {c.key: c.checksum for c in outcome.result.stored} if outcome and outcome.result.ok else {}
        for chunk in staged:
            checksum = stored.get(chunk.key)
            if checksum is not None and outcome.computed.get(chunk.key) != checksum:
                checksum = None
            if chunk.slot is not None:
                if checksum is None:
                    self.tier.drop(chunk.slot)
                else:
                    self.tier.commit(tier_key(chunk.key, checksum), chunk.slot, chunk.blocks, disk=not private)
            if chunk.tail is not None and checksum is not None:
                self.tier.keep_tail(tier_key(chunk.key, checksum), chunk.blocks * self.geometry.block_size,
                                    chunk.tail, disk=not private)

    def _submit_save(self, spec: SaveSpec) -> None:
        if self.refusal is not None:
            logger.warning("kvcdn: request %s not %s: %s", spec.req_id, "verified" if spec.verify else "published",
                           self.refusal)
            self._report.documents.setdefault(spec.req_id, []).append(DocumentResult.failed(spec, self.refusal))
            return
        try:
            kv = self.saver.copy_out(spec)  # now: the blocks may be reused next step
        except Exception as e:
            logger.exception("kvcdn: could not copy request %s out of the KV cache", spec.req_id)
            self.stats.fail("publish_error")
            self._report.documents.setdefault(spec.req_id, []).append(DocumentResult.failed(spec, repr(e)))
            return
        staged = []
        if not spec.verify and self.tier is not None and self.tier.images is not None:
            staged = self._stage_blocks(spec, kv)

        def job() -> DocumentOutcome:
            outcome = None
            try:
                outcome = self.saver.run(spec, kv)
            finally:
                self._keep_published(staged, outcome, spec.private)
            return outcome

        def on_error(e: BaseException) -> DocumentOutcome:
            logger.error("kvcdn: %s of request %s failed: %r", "verify" if spec.verify else "publish",
                         spec.req_id, e)
            outcome = DocumentOutcome(spec.req_id, DocumentResult.failed(spec, repr(e)))
            outcome.stats.fail("publish_error")
            return outcome

        self._outbox.run(self._writes, job, on_error)
