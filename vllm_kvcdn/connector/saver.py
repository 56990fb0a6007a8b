"""A publish or a verify on the worker: the document's KV copied out of the paged cache in
the step that ends its prefill (its blocks may be reused right after), then written to
the store as chunks and a manifest (publish) or compared byte for byte with the stored
chunks (verify) in a background job. Its result goes back to the scheduler in the
``WorkerReport``, never through the store.

Built from explicit collaborators (store, fingerprint, geometry, caches and their layout,
the device), so tests run it on plain tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.documents import DocumentKV, compare_document, write_document
from vllm_kvcdn.artifact.fingerprint import Fingerprint
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


class DocumentSaver:
    def __init__(self, *, store: Store, fingerprint: Fingerprint, geometry: KVGeometry, caches: list[torch.Tensor],
                 layout: PagedKVLayout, device: CacheDevice, chunk_size: int, codec: str | None):
        self.store, self.fingerprint, self.geometry = store, fingerprint, geometry
        self.caches, self.layout, self.device = caches, layout, device
        self.chunk_size, self.codec = chunk_size, codec

    def copy_out(self, spec: SaveSpec) -> DocumentKV:
        """The document's K and V per layer, copied to the host now (in the step)."""
        slots = self.device.index(self.geometry.slots(spec.block_ids, 0, len(spec.token_ids)))
        return [tuple(t.cpu() for t in self.layout.read(cache, slots)) for cache in self.caches]

    def run(self, spec: SaveSpec, kv: DocumentKV) -> DocumentOutcome:
        """The background half: verify or publish."""
        return self._verify(spec, kv) if spec.verify else self._publish(spec, kv)

    def _publish(self, spec: SaveSpec, kv: DocumentKV) -> DocumentOutcome:
        written = write_document(
            self.store, spans=spec.spans, tokens=spec.token_ids, kv=kv, fingerprint=self.fingerprint.digest,
            profile=self.fingerprint.fields, chunk_size=self.chunk_size,
            producer={**_producer(), "prefill": spec.prefill, "adapter": spec.adapter_name or None},
            salted=spec.salted, adapter=spec.adapter, title=spec.title, metadata=spec.metadata,
            codec=self.codec,
        )
        m = written.manifest
        outcome = DocumentOutcome(spec.req_id, DocumentResult(m.doc_id, False, True, spec.prefill, {
            "num_tokens": m.num_tokens, "num_chunks": len(m.chunks), "new_chunks": written.new_chunks,
            "new_bytes": written.new_bytes, "write_seconds": round(written.seconds, 4),
        }))
        outcome.stats.add("published_documents")
        outcome.stats.add("published_chunks", written.new_chunks)
        outcome.stats.add("published_bytes", written.new_bytes)
        outcome.stats.observe("publish_duration_seconds", written.seconds)
        logger.info(
            "kvcdn: published document %s: %d tokens, %d chunks (%d new, %d bytes) in %.3fs",
            m.doc_id[:16], m.num_tokens, len(m.chunks), written.new_chunks, written.new_bytes, written.seconds,
        )
        return outcome

    def _verify(self, spec: SaveSpec, kv: DocumentKV) -> DocumentOutcome:
        """Compare a fresh prefill with the stored chunks, byte for byte."""
        manifest = catalog.get_manifest(self.store, spec.doc_id)
        if manifest is None or manifest.num_tokens != len(spec.token_ids) \
                or manifest.fingerprint != self.fingerprint.digest or manifest.adapter != spec.adapter:
            why = "not published for this model and adapter, or published from other tokens"
            return DocumentOutcome(spec.req_id, DocumentResult.failed(spec, f"cannot verify {spec.doc_id[:16]}: {why}"))
        verdict = compare_document(self.store, manifest, spec.token_ids, kv)
        logger.info("kvcdn: verified %s: %s", spec.doc_id[:16], "identical" if verdict["identical"] else "DIFFERS")
        return DocumentOutcome(spec.req_id, DocumentResult(spec.doc_id, True, True, spec.prefill, verdict))


def _producer() -> dict:
    import vllm

    from vllm_kvcdn import __version__

    return {"engine": "vllm", "vllm": vllm.__version__, "kvcdn": __version__, "torch": torch.__version__}
