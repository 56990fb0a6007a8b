"""Worker half: copy verified chunks into the paged KV cache; save published prompts.

Loads are asynchronous in vLLM's sense: the request waits (``WAITING_FOR_REMOTE_KVS``)
until ``take_finished_loads`` reports it, and only then does vLLM register its blocks in
the prefix cache. A chunk that is missing, truncated, corrupt or made under another
fingerprint is never written: its blocks are reported through vLLM's load-error
channel, vLLM caches only the blocks before them and recomputes the rest
(``kv_load_failure_policy="recompute"``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from vllm_kvcdn.artifact import ArtifactError, Manifest, ManifestChunk, decode_chunk, encode_chunk
from vllm_kvcdn.catalog import keep_or_put_chunk
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.block_cache import PackedBlockCache
from vllm_kvcdn.connector.kv_layout import PagedKVLayout, layout_for
from vllm_kvcdn.connector.metadata import KVCDNMetadata, LoadSpec, SaveSpec
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.fingerprint import Fingerprint
from vllm_kvcdn.index import chunk_object_key, manifest_object_key, verify_report_key
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store, StoreError

logger = get_logger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class FailedLoads(KVConnectorWorkerMetadata):
    """Requests whose load failed this step (so their responses do not claim a hit)."""

    req_ids: set[str] = field(default_factory=set)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "FailedLoads":
        if isinstance(other, FailedLoads):
            self.req_ids |= other.req_ids
        return self


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
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, store: Store, geometry: KVGeometry):
        self.config = config
        self.fingerprint = fingerprint
        self.store = store
        self.geometry = geometry
        self.stats = KVCDNStats()
        self.caches: list[torch.Tensor] = []
        self.layout: PagedKVLayout | None = None
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._finished_loads: set[str] = set()  # loads done (or failed) since vLLM last asked
        self.ram: PackedBlockCache | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_index(name: str) -> int:
            found = _LAYER_INDEX.search(name)
            if found is None:
                raise ValueError(f"kvcdn: cannot tell the layer index of KV cache {name!r}")
            return int(found.group(1))

        names = sorted(kv_caches, key=layer_index)
        self.caches = [kv_caches[n] for n in names]
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
        ram_bytes = int(self.config.ram_tier_gib * (1 << 30))
        if ram_bytes:
            self.ram = PackedBlockCache(ram_bytes, self.caches, self.layout.block_dim,
                                        self.config.chunk_size // g.block_size)
        logger.info(
            "kvcdn: worker ready: %d layers, layout %s, store %s, RAM tier %.1f GiB",
            len(self.caches), type(self.layout).__name__, self.store.url, self.config.ram_tier_gib,
        )

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end, dtype=torch.long)
        blocks = torch.tensor(block_ids, dtype=torch.long)[positions // self.geometry.block_size]
        return blocks * self.geometry.block_size + positions % self.geometry.block_size

    # -- loading ---------------------------------------------------------------

    def start_load_kv(self, meta: KVCDNMetadata) -> None:
        for spec in meta.loads:
            self._load_request(spec)
            self._finished_loads.add(spec.req_id)

    def take_finished_loads(self) -> set[str]:
        """Requests whose load ended, failed or not (vLLM's ``finished_recving``); a failed
        one's blocks were reported through ``get_block_ids_with_load_errors`` already."""
        done, self._finished_loads = self._finished_loads, set()
        return done

    def _load_request(self, spec: LoadSpec) -> None:
        started = time.perf_counter()
        loaded_tokens = 0
        for n, chunk in enumerate(spec.chunks):
            try:
                self._load_chunk(spec, chunk)
            except (ArtifactError, StoreError) as e:
                reason = e.reason if isinstance(e, ArtifactError) else "store_error"
                self._fail(spec, spec.chunks[n:], reason, str(e))
                break
            except Exception as e:  # never take the engine down: recompute instead
                logger.exception("kvcdn: unexpected error loading chunk %s", chunk.key[:16])
                self._fail(spec, spec.chunks[n:], "error", repr(e))
                break
            loaded_tokens += chunk.write_to - chunk.write_from
        self.stats.add("loaded_tokens", loaded_tokens)
        self.stats.add("loaded_bytes", loaded_tokens * self.bytes_per_token)
        self.stats.observe("load_duration_seconds", time.perf_counter() - started)

    def _load_chunk(self, spec: LoadSpec, chunk) -> None:
        """Write the chunk's tokens [write_from, write_to) into the request's slots: whole
        blocks from the RAM tier when it holds them, everything else from the verified file."""
        if self.config.debug_skip_partial_tail and chunk.is_tail:
            return  # fault injection for tests: claim the tail, leave its slots stale
        bs = self.geometry.block_size
        # Whole blocks of this chunk inside the write range (chunks start on block edges).
        first, last = -(-chunk.write_from // bs) * bs, chunk.write_to // bs * bs
        lo, hi = (first - chunk.start) // bs, (last - chunk.start) // bs
        image = self.ram.get(chunk.key, lo, hi) if self.ram is not None and first < last else None
        todo = [(chunk.write_from, chunk.write_to)]
        if image is not None:
            ids = self._block_ids(spec, first, last)
            for cache, layer_image in zip(self.caches, image):
                self.layout.write_blocks(cache, ids, layer_image)
            todo = [r for r in ((chunk.write_from, first), (last, chunk.write_to)) if r[0] < r[1]]
            self.stats.add("ram_tier_hits")
        if not todo:
            return
        kv = self._read_chunk(chunk)
        for start, end in todo:
            slots = self._slots(spec.block_ids, start, end)
            a, b = start - chunk.start, end - chunk.start
            for cache, k, v in zip(self.caches, kv.keys, kv.values):
                self.layout.write(cache, k[a:b], v[a:b], slots)
        whole_end = chunk.start + chunk.num_tokens // bs * bs
        if self.ram is not None and image is None and chunk.write_from == chunk.start and whole_end > chunk.start \
                and chunk.write_to >= whole_end:
            self.ram.put(chunk.key, self.caches, self._block_ids(spec, chunk.start, whole_end))

    def _read_chunk(self, chunk):
        g = self.geometry
        data = self.store.get(chunk_object_key(chunk.key))
        if data is None:
            raise ArtifactError("missing", f"chunk {chunk.key[:16]} is not in {self.store.url}")
        self.stats.add("store_read_bytes", len(data))
        return decode_chunk(
            data,
            key=chunk.key,
            fingerprint=self.fingerprint.digest,
            dtype=g.kv_dtype,
            num_layers=len(self.caches),
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            tokens=chunk.tokens,
            verify=self.config.verify_checksums,
        )

    def _block_ids(self, spec: LoadSpec, start: int, end: int) -> torch.Tensor:
        """Ids of the request's blocks holding positions [start, end) (block-aligned)."""
        bs = self.geometry.block_size
        return torch.tensor(spec.block_ids[start // bs : end // bs], dtype=torch.long)

    def _fail(self, spec: LoadSpec, chunks, reason: str, message: str) -> None:
        """Report every block from the failed chunk on: vLLM recomputes them."""
        bs = self.geometry.block_size
        for chunk in chunks:
            first, last = chunk.write_from // bs, (chunk.write_to - 1) // bs
            self._failed_blocks.update(spec.block_ids[first : last + 1])
        self._failed_reqs.add(spec.req_id)
        self.stats.fail(reason)
        logger.warning("kvcdn: load miss for request %s (%s): %s; recomputing", spec.req_id, reason, message)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_worker_meta(self) -> FailedLoads | None:
        if not self._failed_reqs:
            return None
        failed, self._failed_reqs = self._failed_reqs, set()
        return FailedLoads(req_ids=failed)

    # -- publishing --------------------------------------------------------------

    def wait_for_save(self, meta: KVCDNMetadata) -> None:
        for spec in meta.saves:
            try:
                self._save_document(spec)
            except Exception as e:  # a failed publish is logged and counted; serving goes on
                self.stats.fail("publish_error")
                logger.exception("kvcdn: publishing request %s failed: %s", spec.req_id, e)

    def _encode_chunks(self, spec: SaveSpec):
        """Read the request's KV out of the paged cache; yield (key, parent, n, bytes, header)."""
        slots = self._slots(spec.block_ids, 0, len(spec.token_ids))
        per_layer = [self.layout.read(cache, slots) for cache in self.caches]
        start = 0
        for key, parent, n in spec.chunk_keys:
            keys = [k[start : start + n].contiguous() for k, _ in per_layer]
            values = [v[start : start + n].contiguous() for _, v in per_layer]
            tokens = spec.token_ids[start : start + n]
            data, header = encode_chunk(key, parent, self.fingerprint.digest, tokens, keys, values)
            yield key, parent, n, data, header
            start += n

    def _verify_document(self, spec: SaveSpec) -> None:
        """Compare a fresh prefill with the stored chunks, byte for byte; store the report."""
        results = []
        for key, _, n, data, _ in self._encode_chunks(spec):
            stored = self.store.get(chunk_object_key(key))
            status = "missing" if stored is None else "identical" if bytes(stored) == data else "differs"
            results.append({"key": key, "num_tokens": n, "status": status})
        doc_id = spec.chunk_keys[-1][0]
        report = {"document": doc_id, "identical": all(r["status"] == "identical" for r in results),
                  "chunks": results, "checked_at": time.time(), "fingerprint": self.fingerprint.digest}
        self.store.put(verify_report_key(doc_id), json.dumps(report, indent=1).encode())
        logger.info("kvcdn: verified %s: %s", doc_id[:16], "identical" if report["identical"] else "DIFFERS")

    def _save_document(self, spec: SaveSpec) -> None:
        if spec.verify:
            return self._verify_document(spec)
        started = time.perf_counter()
        chunks, new_bytes, new_chunks = [], 0, 0
        start = 0
        for key, parent, n, data, header in self._encode_chunks(spec):
            entry, written = keep_or_put_chunk(self.store, ManifestChunk(key, parent, n, len(data), header.checksum),
                                               data, self.fingerprint.digest, spec.token_ids[start : start + n])
            new_bytes += len(data) if written else 0
            new_chunks += written
            chunks.append(entry)
            start += n
        doc_id = spec.chunk_keys[-1][0]
        manifest = Manifest(
            doc_id=doc_id,
            fingerprint=self.fingerprint.digest,
            num_tokens=len(spec.token_ids),
            chunk_size=self.config.chunk_size,
            chunks=chunks,
            profile=self.fingerprint.fields,
            salted=spec.salted,
            created=time.time(),
            producer={**_producer(), "prefill": spec.prefill},
            title=spec.title,
            metadata=spec.metadata,
        )
        self.store.put(manifest_object_key(doc_id), manifest.to_json())  # last: never dangling
        self.stats.add("published_documents")
        self.stats.add("published_chunks", new_chunks)
        self.stats.add("published_bytes", new_bytes)
        logger.info(
            "kvcdn: published document %s: %d tokens, %d chunks (%d new, %d bytes) in %.3fs",
            doc_id[:16], len(spec.token_ids), len(chunks), new_chunks, new_bytes, time.perf_counter() - started,
        )


def _producer() -> dict:
    import vllm

    from vllm_kvcdn import __version__

    return {"engine": "vllm", "vllm": vllm.__version__, "kvcdn": __version__, "torch": torch.__version__}
