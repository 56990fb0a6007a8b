"""One request's load: its chunks, from wherever they are, into its blocks of the paged
KV cache (a background job of the worker; ``worker`` reports the outcome to vLLM).

Reads run ahead, in parallel, as far as free read buffers allow; chunks are written in
order as their reads end, each one's buffer freed once written. A chunk's whole blocks
come from the block tier when it holds them: a RAM slot, or the node's disk image (on CPU
read straight into the request's blocks by a read thread, else promoted into a RAM slot
first), found under the chunk's key *and* the checksum the plan's (signed) manifest
records (``provenance.tier_key``); everything else from the chunk object, verified against
the plan (key, tokens, fingerprint, the manifest's checksum) before a byte is written.
The first chunk that fails (missing, truncated, corrupt, forged, another model's, too
slow) fails itself and every chunk after it: their blocks are reported to vLLM, which
recomputes them. So do the chunks a source would
deliver later than the engine computes them (``load_costs``): all of a hit, a prefix of
it, or nothing loads, whichever arrives first.

Built from explicit collaborators (geometry, caches and their layout, the device, read
buffers, a chunk reader, the tier), so tests run it on plain tensors and fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from concurrent.futures import TimeoutError as ReadTimeout  # not the builtin before 3.11
from dataclasses import dataclass, field

import torch

from vllm_kvcdn.artifact.documents import DocumentKV
from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.artifact.provenance import tier_key
from vllm_kvcdn.connector.block_tier import BlockTier
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.kv_layout import PagedKVLayout
from vllm_kvcdn.connector.load_costs import LoadCosts
from vllm_kvcdn.connector.read_buffers import ReadBuffers
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.connector.wire import ChunkLoad, LoadReceipt, LoadSpec
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import StoreError
from vllm_kvcdn.store.breaker import CircuitOpen

logger = get_logger(__name__)

# Reads one chunk (into the buffer, if given) and checks it against the plan: its KV and
# the bytes read. Raises ArtifactError or StoreError for a chunk that cannot be used.
ChunkReader = Callable[[ChunkLoad, "memoryview | None"], "tuple[DocumentKV, int]"]


@dataclass
class LoadOutcome:
    req_id: str
    failed_blocks: set[int] = field(default_factory=set)  # vLLM recomputes them
    stats: KVCDNStats = field(default_factory=KVCDNStats)
    # What was written: every chunk, or those before the first failed one (vLLM keeps them and
    # recomputes from its first failed block); None when nothing was.
    receipt: LoadReceipt | None = None


@dataclass(frozen=True)
class _Read:
    # "chunk": (DocumentKV, bytes read); "image": whether it is now in a RAM slot; "direct":
    # whether the image is now in the request's blocks (a read that writes them: always
    # waited for before the load ends, ``_let_go``)
    source: str
    future: Future
    buffer: memoryview | None = None  # the pooled read buffer a chunk read fills (its tensors view it)


_NO_BUFFER = object()  # a read not started: no read buffer free


class ChunkLoader:
    def __init__(self, *, geometry: KVGeometry, caches: list[torch.Tensor], layout: PagedKVLayout,
                 device: CacheDevice, buffers: ReadBuffers, read_chunk: ChunkReader, reads: Executor,
                 tier: BlockTier | None = None, timeout_s: float = 30.0, skip_partial_tail: bool = False,
                 costs: LoadCosts | None = None, part: str = ""):
        """``part``: the KV heads this rank loads (``artifact.parts``; "": whole chunks)."""
        self.geometry, self.caches, self.layout, self.device = geometry, caches, layout, device
        self.buffers, self.tier = buffers, tier
        self.costs = costs or LoadCosts(parallel_reads=1, enabled=False)
        self._read_chunk, self._reads = read_chunk, reads
        self.timeout_s = timeout_s
        self.token_bytes = geometry.token_bytes(len(caches))
        self.part = part
        self._skip_partial_tail = skip_partial_tail  # test fault (config.injected_faults)

    def load(self, spec: LoadSpec) -> LoadOutcome:
        started = time.perf_counter()
        deadline = started + self.timeout_s
        outcome = LoadOutcome(spec.req_id)
        reads: list[_Read | None] = []
        loaded_tokens = 0
        chunks = self._worth_loading(spec, outcome)
        for n, chunk in enumerate(chunks):
            try:
                self._read_ahead(spec, chunks, n, reads, deadline)
                with self.device.side_stream():  # waits for its copies: then the buffer may go back
                    self._write_chunk(spec, n, reads, outcome.stats, deadline)
            except (ArtifactError, StoreError) as e:
                reason = e.reason if isinstance(e, ArtifactError) else _store_failure(e)
                self.fail(outcome, spec, spec.chunks[n:], reason, str(e))
                break
            except ReadTimeout:
                why = f"the store did not answer within load_timeout_s={self.timeout_s}s"
                self.fail(outcome, spec, spec.chunks[n:], "timeout", why)
                break
            except Exception as e:  # never take the engine down: recompute instead
                logger.exception("kvcdn: unexpected error loading chunk %s", chunk.key[:16])
                self.fail(outcome, spec, spec.chunks[n:], "error", repr(e))
                break
            finally:
                if n < len(reads):
                    self._let_go(reads[n])
                    reads[n] = None
            loaded_tokens += chunk.write_to - chunk.write_from
        for read in reads:
            self._let_go(read)  # those read ahead of a failed chunk
        seconds = time.perf_counter() - started
        outcome.stats.add("loaded_bytes", loaded_tokens * self.token_bytes)  # tokens: counted per request
        outcome.stats.observe("load_duration_seconds", seconds)
        if loaded_tokens:
            outcome.receipt = LoadReceipt(loaded_tokens, loaded_tokens * self.token_bytes,
                                          outcome.stats.data.get("store_read_bytes", 0), seconds)
        return outcome

    def fail(self, outcome: LoadOutcome, spec: LoadSpec, chunks: list[ChunkLoad], reason: str,
             message: str, warn: bool = True) -> LoadOutcome:
        """Report every block of ``chunks`` (the failed one and those after it) for recompute."""
        for chunk in chunks:
            outcome.failed_blocks.update(self.geometry.blocks_touched(spec.block_ids, chunk.write_from, chunk.write_to))
        outcome.stats.fail(reason)
        (logger.warning if warn else logger.info)("kvcdn: load miss for request %s (%s): %s; recomputing",
                                                  spec.req_id, reason, message)
        return outcome

    def _worth_loading(self, spec: LoadSpec, outcome: LoadOutcome) -> list[ChunkLoad]:
        """The chunks to load: up to the first one whose source (and every source after
        it) would deliver later than the engine computes the rest; those are failed for
        recompute (reason ``recompute_faster``) and their source probed."""
        sources = [self._source(chunk) for chunk in spec.chunks]
        for n, source in enumerate(sources):
            if source == "ram":
                continue
            rest = spec.chunks[n:]
            tokens = sum(c.write_to - c.write_from for c in rest)
            slow = [(s, sources[n:].count(s)) for s in ("image", "store") if s in sources[n:]]
            verdicts = [self.costs.verdict(s, count, tokens) for s, count in slow]
            if all(v.load for v in verdicts):
                break
            self.fail(outcome, spec, rest, "recompute_faster",
                      "; ".join(f"{s}: {v.why()}" for (s, _), v in zip(slow, verdicts)), warn=False)
            for (s, _), v in zip(slow, verdicts):
                if not v.load:
                    self._probe(s, next(c for c, where in zip(rest, sources[n:]) if where == s))
            return spec.chunks[:n]
        return spec.chunks

    def _source(self, chunk: ChunkLoad) -> str:
        """Where the chunk's write range will come from: "ram", "image" or "store"."""
        blocks = self._tier_blocks(chunk)
        if blocks is None:
            return "store"
        return (self.tier.where(self.tier_key(chunk), blocks) if blocks else "ram") or "store"

    def _probe(self, source: str, chunk: ChunkLoad) -> None:
        """One read of a chunk a load skipped, off the request path, so loads resume once
        its source is fast again (one in flight per source). A store probe reads into a
        free buffer (none free: no probe) and drops what it read; an image probe moves the
        image into a RAM slot, where the next load finds it."""
        if not self.costs.start_probe(source):
            return
        if source == "image":
            read, buffer = self._reads.submit(self._timed_promote, self.tier_key(chunk)), None
        else:
            buffer = self.buffers.acquire(0.0)
            if buffer is None:
                self.costs.end_probe(source)
                return
            read = self._reads.submit(self._timed_read, chunk, buffer)

        def done(_) -> None:
            if buffer is not None:
                self.buffers.release(buffer)
            self.costs.end_probe(source)

        read.add_done_callback(done)

    def tier_key(self, chunk: ChunkLoad) -> str:
        """What the tier holds this rank's copy of the chunk under: its key and the checksum
        the plan's manifest records (a copy made from other bytes is another entry)."""
        return tier_key(chunk.key, chunk.checksums.get(self.part, ""))

    def _timed_read(self, chunk: ChunkLoad, buffer: memoryview | None):
        started = time.perf_counter()
        result = self._read_chunk(chunk, buffer)
        self.costs.observe_read("store", time.perf_counter() - started)
        return result

    def _timed_promote(self, key: str) -> bool:
        started = time.perf_counter()
        promoted = self.tier.promote(key)
        if promoted:
            self.costs.observe_read("image", time.perf_counter() - started)
        return promoted

    def _timed_image_read(self, key: str, block_ids: list[int]) -> bool:
        started = time.perf_counter()
        done = self.tier.read_image(key, block_ids)
        if done:
            self.costs.observe_read("image", time.perf_counter() - started)
        return done

    def _tier_blocks(self, chunk: ChunkLoad) -> int | None:
        """How many of the chunk's whole blocks the tier must hold (with, past the last
        whole block, its tail) for the chunk's write range to need no chunk read; None
        when the range starts or ends inside a whole block (the chunk object is read)."""
        if self.tier is None:
            return None
        bs, tail_start = self.geometry.block_size, _tail_start(chunk, self.geometry.block_size)
        head_end = min(chunk.write_to, tail_start)  # the whole blocks' part of the range ends here
        if chunk.write_from < head_end and (chunk.write_from % bs or head_end % bs):
            return None
        if chunk.write_to > tail_start and not self.tier.holds_tail(
                self.tier_key(chunk), max(chunk.write_from, tail_start) - chunk.start, chunk.write_to - chunk.start):
            return None
        return (head_end - chunk.start) // bs if chunk.write_from < head_end else 0

    def _read_ahead(self, spec: LoadSpec, chunks: list[ChunkLoad], n: int, reads: list[_Read | None],
                    deadline: float) -> None:
        """Start the reads after ``reads`` (those started, in chunk order) while read
        buffers are free. When chunk ``n``, written next, has none started, wait for a
        buffer: this job then holds none (the chunks before it are written), and the jobs
        holding the others write and free theirs without waiting for any."""
        while len(reads) < len(chunks):
            must = len(reads) == n
            read = self._start_read(spec, chunks[len(reads)],
                                    max(0.0, deadline - time.perf_counter()) if must else 0.0)
            if read is _NO_BUFFER:
                if must:
                    raise ReadTimeout()
                return
            reads.append(read)

    def _start_read(self, spec: LoadSpec, chunk: ChunkLoad, wait_s: float = 0.0):
        """Nothing when a RAM slot holds what the chunk needs; else its block image when the
        node's disk holds one (into the request's blocks where it can, else into a RAM
        slot), else the chunk itself, into a read buffer free within ``wait_s``
        (``_NO_BUFFER`` if none)."""
        blocks = self._tier_blocks(chunk)
        if blocks is not None:
            key = self.tier_key(chunk)
            where = self.tier.where(key, blocks) if blocks else "ram"
            if where == "ram":
                return None
            if where == "image" and chunk.write_from == chunk.start and self.tier.reads_direct(key, blocks):
                first = chunk.start // self.geometry.block_size
                ids = spec.block_ids[first : first + blocks]
                return _Read("direct", self._reads.submit(self._timed_image_read, key, ids))
            if where == "image":
                return _Read("image", self._reads.submit(self._timed_promote, key))
        buffer = self.buffers.acquire(wait_s)
        if buffer is None:
            return _NO_BUFFER
        return _Read("chunk", self._reads.submit(self._timed_read, chunk, buffer), buffer)

    def _let_go(self, read: _Read | None) -> None:
        """Cancel the read if it has not started; its buffer goes back once it has ended
        (the caller no longer uses what it read). A read into the request's blocks that has
        started is waited for: vLLM may reuse them once the load is reported."""
        if read is None:
            return
        if not read.future.cancel() and read.source == "direct":
            wait([read.future])
        if read.buffer is not None:
            read.future.add_done_callback(lambda _: self.buffers.release(read.buffer))

    def _write_chunk(self, spec: LoadSpec, n: int, reads: list[_Read | None], stats: KVCDNStats,
                     deadline: float) -> None:
        """Write chunk ``n``'s tokens [write_from, write_to) into the request's slots: whole
        blocks from the tier's RAM slots when they hold them, everything else from the
        verified chunk object (read by ``reads[n]``, or by a read started here)."""
        chunk, read = spec.chunks[n], reads[n]
        if self._skip_partial_tail and chunk.is_tail:
            return  # test fault: claim the tail, leave its slots stale (proves the tests can see it)
        g, key = self.geometry, self.tier_key(chunk)
        first, last = g.whole_blocks(chunk.write_from, chunk.write_to)
        todo = [(chunk.write_from, chunk.write_to)]
        if read is not None and read.source in ("image", "direct"):
            # In a RAM slot (or the request's blocks) now, or not: then from the chunk object.
            if read.future.result(timeout=max(0.0, deadline - time.perf_counter())) and read.source == "direct":
                todo = [(last, chunk.write_to)] if last < chunk.write_to else []
            read = None
        if self.tier is not None and first < last and todo and todo[0][0] == chunk.write_from:
            def write_blocks(image: torch.Tensor) -> None:
                ids = spec.block_ids[first // g.block_size : last // g.block_size]
                self.layout.write_blocks(self.caches, ids, self.device.upload_view(image))

            bs = g.block_size
            if self.tier.copy_into(key, (first - chunk.start) // bs, (last - chunk.start) // bs, write_blocks):
                todo = [r for r in ((chunk.write_from, first), (last, chunk.write_to)) if r[0] < r[1]]
        tail_start = _tail_start(chunk, g.block_size)
        if self.tier is not None and todo and todo[-1][0] >= tail_start:
            lo, hi = todo[-1]

            def write_tail(tail: torch.Tensor) -> None:
                self._write_tokens(spec, lo, hi, list(self.device.upload_view(tail)))

            if self.tier.copy_tail(key, tail_start - chunk.start, lo - chunk.start, hi - chunk.start, write_tail):
                todo = todo[:-1]
        if not todo:
            return
        if read is None:  # the tier lost it meanwhile, or its image was no good
            buffer = self.buffers.acquire()  # none free: a buffer of its own (waiting could deadlock)
            read = reads[n] = _Read("chunk", self._reads.submit(self._timed_read, chunk, buffer), buffer)
        kv, nbytes = read.future.result(timeout=max(0.0, deadline - time.perf_counter()))
        stats.add("store_read_bytes", nbytes)
        on_device = self.device.upload(kv.keys + kv.values, read.buffer)  # one copy for the chunk
        for start, end in todo:
            a, b = start - chunk.start, end - chunk.start
            self._write_tokens(spec, start, end, [t[a:b] for t in on_device])
        if self.tier is None:
            return
        disk = not (chunk.private or getattr(kv, "sealed", False))  # a private chunk's copies: RAM only
        if todo[0][0] == chunk.start < tail_start <= todo[0][1]:  # all its whole blocks came from the object
            self.tier.keep(key, self.device.index(g.block_ids(spec.block_ids, chunk.start, tail_start)), disk=disk)
        if tail_start < chunk.start + chunk.num_tokens:  # verified: its tail serves later hits from RAM
            self.tier.keep_tail(key, tail_start - chunk.start,
                                [t[tail_start - chunk.start:] for t in kv.keys + kv.values], disk=disk)

    def _write_tokens(self, spec: LoadSpec, start: int, end: int, tensors: list[torch.Tensor]) -> None:
        """Write positions [start, end) into the request's slots: ``tensors`` are every
        layer's K, then every layer's V, ``[end - start, kv_heads, head_dim]`` each."""
        slots = self.device.index(self.geometry.slots(spec.block_ids, start, end))
        layers = len(self.caches)
        for cache, k, v in zip(self.caches, tensors[:layers], tensors[layers:]):
            self.layout.write(cache, k, v, slots)


def _tail_start(chunk: ChunkLoad, block_size: int) -> int:
    """Where the chunk's last whole block ends (its tail, if any, follows)."""
    return chunk.start + chunk.num_tokens // block_size * block_size


def _store_failure(e: StoreError) -> str:
    return "store_unavailable" if isinstance(e, CircuitOpen) else "store_error"
