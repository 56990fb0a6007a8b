"""A publish or a verify on the worker: the document's KV copied out of the paged cache in
the step that ends its prefill (its blocks may be reused right after), then written to
the store as chunks (publish) or compared byte for byte with the stored chunks (verify)
in a background job. Under tensor parallelism each rank writes or compares its own part
of every chunk (``artifact.parts``). Its result, with what it stored, goes back to the
scheduler in the ``WorkerReport``; the scheduler writes the manifest once every rank's
part is stored (``publish_desk``).

Built from explicit collaborators (store, fingerprint, geometry, caches and their layout,
the device), so tests run it on plain tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.documents import DocumentKV, compare_document, write_chunks
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.parts import KVPart
from vllm_kvcdn.artifact.sealing import NO_KEYS, TenantKeys
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.kv_layout import PagedKVLayout
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.connector.wire import DocumentResult, SaveSpec
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store

logger = get_logger(__name__)


@dataclass
class DocumentOutcome:
    req_id: str
    result: DocumentResult
    stats: KVCDNStats = field(default_factory=KVCDNStats)
    # A publish: chunk key -> the checksum of what this engine computed (the store may have
    # kept a vouched chunk with other last bits: ``documents.keep_or_put_chunk``).
    computed: dict[str, str] = field(default_factory=dict)


class DocumentSaver:
    def __init__(self, *, store: Store, fingerprint: Fingerprint, geometry: KVGeometry, caches: list[torch.Tensor],
                 layout: PagedKVLayout, device: CacheDevice, chunk_size: int, codec: str | None,
                 part: KVPart | None = None, keys: TenantKeys = NO_KEYS):
        """``part``: the KV heads this rank holds (None: all of them, one rank); ``keys``:
        the tenant keys that seal private documents (``artifact.sealing``)."""
        self.keys = keys
        self.store, self.fingerprint, self.geometry = store, fingerprint, geometry
        self.caches, self.layout, self.device = caches, layout, device
        self.chunk_size, self.codec = chunk_size, codec
        self.part = part.name if part is not None else ""

    def copy_out(self, spec: SaveSpec) -> DocumentKV:
        """The document's K and V per layer, copied to the host now (in the step)."""
        slots = self.device.index(self.geometry.slots(spec.block_ids, 0, len(spec.token_ids)))
        return [tuple(t.cpu() for t in self.layout.read(cache, slots)) for cache in self.caches]

    def run(self, spec: SaveSpec, kv: DocumentKV) -> DocumentOutcome:
        """The background half: verify or publish."""
        return self._verify(spec, kv) if spec.verify else self._publish(spec, kv)

    def _publish(self, spec: SaveSpec, kv: DocumentKV) -> DocumentOutcome:
        vouched = {key: [parts[self.part]] for key, parts in spec.vouched.items() if self.part in parts}
        written = write_chunks(self.store, spans=spec.spans, tokens=spec.token_ids, kv=kv,
                               fingerprint=self.fingerprint.digest, codec=self.codec, part=self.part, vouched=vouched,
                               keys=self.keys, private=spec.private)
        outcome = DocumentOutcome(spec.req_id, DocumentResult(spec.doc_id, False, True, spec.prefill, {
            "num_tokens": len(spec.token_ids), "num_chunks": len(written.chunks), "new_chunks": written.new_chunks,
            "new_bytes": written.new_bytes, "write_seconds": round(written.seconds, 4),
            **({"replaced_chunks": written.replaced_chunks} if written.replaced_chunks else {}),
        }, part=self.part, stored=written.chunks), computed={
            span.key: checksum for span, checksum in zip(spec.spans, written.computed)})
        outcome.stats.add("published_chunks", written.new_chunks)
        outcome.stats.add("replaced_chunks", written.replaced_chunks)
        outcome.stats.add("published_bytes", written.new_bytes)
        outcome.stats.observe("publish_duration_seconds", written.seconds)
        logger.info(
            "kvcdn: stored document %s%s: %d tokens, %d chunks (%d new, %d bytes) in %.3fs",
            spec.doc_id[:16], f" part {self.part}" if self.part else "", len(spec.token_ids), len(written.chunks),
            written.new_chunks, written.new_bytes, written.seconds,
        )
        return outcome

    def _verify(self, spec: SaveSpec, kv: DocumentKV) -> DocumentOutcome:
        """Compare a fresh prefill with the stored chunks, byte for byte."""
        manifest = catalog.get_manifest(self.store, spec.doc_id)
        if manifest is None or manifest.num_tokens != len(spec.token_ids) \
                or manifest.fingerprint != self.fingerprint.digest or manifest.adapter != spec.adapter:
            why = "not published for this model and adapter, or published from other tokens"
            return DocumentOutcome(spec.req_id, DocumentResult.failed(spec, f"cannot verify {spec.doc_id[:16]}: {why}"))
        if (manifest.parts or [""]).count(self.part) != 1:
            why = f"stored in parts {manifest.parts or ['(whole)']}, this rank holds {self.part or '(whole)'}"
            return DocumentOutcome(spec.req_id, DocumentResult.failed(spec, f"cannot verify {spec.doc_id[:16]}: {why}"))
        verdict = compare_document(self.store, manifest, spec.token_ids, kv, self.part, self.keys)
        logger.info("kvcdn: verified %s%s: %s", spec.doc_id[:16], f" part {self.part}" if self.part else "",
                    "identical" if verdict["identical"] else "DIFFERS")
        return DocumentOutcome(spec.req_id, DocumentResult(spec.doc_id, True, True, spec.prefill, verdict,
                                                           part=self.part))
