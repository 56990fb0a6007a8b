"""The publish flow on the scheduler: publish and verify requests, the isolation gate
they pass, their saves, their results, and the requests that wait for them.

A publish (or verify) request finishes in the step that ends its prefill, before the
worker has written (or compared) the document in the background, so its response says
``"pending": true``. The worker's result comes back in the ``WorkerReport``; a later
request carrying ``{"wait_for": <document id>, "key": ...}`` waits in vLLM's queue
(``get_num_new_matched_tokens`` answers "ask again") until no publish or verify of that
document is in flight, then reports its last result (``wire.pending_wait`` builds it;
the side API and the offline helpers send it for their callers). A ``sync_index``
request waits the same way for an index refresh begun after it arrived.

Every rank stores its part of each chunk (tensor parallelism: its KV heads) and reports
what it stored; the desk writes the manifest, last, once every rank has reported its
part stored, so a manifest never names a part that is not there (one small object per
publish, written in the scheduler's step: publishes are rare). If any rank failed, no
manifest is written: the document is not published, and its stored parts are garbage
for ``kvcdn gc``. The manifest is signed with the server's key (``signing_key``;
``artifact.provenance``); a server whose store needs signatures and that has no key
refuses publishes up front, with the fix in the message.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm_kvcdn.artifact.chain import ChunkSpan, chain_seed, iter_chunks
from vllm_kvcdn.artifact.documents import put_manifest
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector import rank_results as ranks
from vllm_kvcdn.connector.publish_gate import PublishGate
from vllm_kvcdn.connector.request_profile import RequestProfile
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.connector.wire import DocumentResult, PublishAsk, SaveSpec, WorkerReport
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store

logger = get_logger(__name__)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


@dataclass
class Publishing:
    """A publish (or verify) request on its way through prefill."""

    ask: PublishAsk
    prompt: list[int]
    doc_id: str | None  # the document written (its last chunk's key) or verified
    spans: list[ChunkSpan]  # the chunks to write (a verify compares the manifest's)
    profile: RequestProfile
    block_ids: list[int] = field(default_factory=list)
    planned: bool = False
    # Per prefill step: [first position, tokens computed, requests in the step].
    steps: list[list[int]] = field(default_factory=list)

    @property
    def prefill(self) -> dict:
        """How the document was computed: its bytes are a function of the tokens and the
        compute profile only when it ran alone, from position 0 (README "Exactness")."""
        alone = bool(self.steps) and self.steps[0][0] == 0 and all(batch == 1 for *_, batch in self.steps)
        return {"steps": self.steps, "alone": alone}

    @property
    def verify(self) -> bool:
        """Recompute and compare with the stored chunks instead of writing."""
        return self.ask.verify is not None


@dataclass
class Waiting:
    """A wait_for or sync_index request."""

    wait_for: str | None  # the document whose publish/verify result it waits for (None: sync_index)
    arrived: float = field(default_factory=time.monotonic)
    waited: dict | None = None  # that result, taken when its wait ended (later publishes start meanwhile)


class PublishDesk:
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, index: ChunkIndex, gate: PublishGate,
                 store: Store, stats: KVCDNStats, parts: list[str], ranks: int):
        """``parts``: the part names of every chunk (``[""]``: whole chunks); ``ranks``: the
        workers that each report a result for every publish and verify."""
        self.config, self.fingerprint, self.index, self.gate = config, fingerprint.digest, index, gate
        self.profile_fields, self.store, self.stats = fingerprint.fields, store, stats
        self.parts, self.ranks = parts, ranks
        self.signer = config.signer()  # None: manifests go out unsigned
        self.keys = config.keyring()  # seals private documents
        self._unsigned_refused = self.signer is None and index.trust.requires_signatures
        self._reported: dict[str, list[DocumentResult]] = {}  # request id -> its ranks' results so far
        self._publishing: dict[str, Publishing] = {}
        self._waiting: dict[str, Waiting] = {}
        self._held: list["Request"] = []  # publishes told "ask again" in this scheduling pass
        self._saving: dict[str, SaveSpec] = {}  # publish/verify request id -> its save, until the worker reports
        self._results: OrderedDict[str, dict] = OrderedDict()  # document id -> last publish/verify result

    def on_ask(self, request: "Request", ask: PublishAsk, profile: RequestProfile | None) -> str | None:
        """Take a request that asks something of kvcdn; why it is served as an ordinary
        request instead, if it is (``profile`` is needed for a publish or verify only)."""
        req_id = request.request_id
        if ask.wait_for or ask.sync_index:
            self._waiting[req_id] = Waiting(ask.wait_for)
            if ask.sync_index:
                self.index.request_refresh()
            return None
        if profile.unsupported:
            return f"not {'verified' if ask.verify else 'published'}: {profile.detail}"
        if ask.private and self.keys.sealer is None:
            return ("not published: a private document is sealed with a tenant key and this server has none; set "
                    "kv_connector_extra_config.tenant_keys or $KVCDN_TENANT_KEY (`kvcdn keygen --tenant PATH`)")
        if ask.require_grant and self.signer is None:
            return ("not published: reads of a document that requires a grant are sold with grants signed by its "
                    "publisher's key, and this server has none; set kv_connector_extra_config.signing_key")
        if self._unsigned_refused and not ask.verify:
            return ("not published: this store serves signed documents only and this server has no signing key; "
                    "set kv_connector_extra_config.signing_key or $KVCDN_SIGNING_KEY to a key file (`kvcdn keygen`)")
        # A publish computes the whole document itself: blocks vLLM's prefix cache holds
        # were computed in other requests' steps and may differ in the last bits.
        request.skip_reading_prefix_cache = True
        prompt = list(request.prompt_token_ids or [])
        if ask.verify:
            doc_id, spans = ask.verify, []  # the worker compares with the manifest's chunks
        else:
            seed = chain_seed(self.fingerprint, profile.cache_salt, profile.adapter)
            spans = list(iter_chunks(prompt, seed, self.config.chunk_size))
            doc_id = spans[-1].key if spans else None
        self._publishing[req_id] = Publishing(ask=ask, prompt=prompt, doc_id=doc_id, spans=spans, profile=profile)
        return None

    def admission(self, request: "Request") -> tuple[int | None, bool] | None:
        """vLLM's ``get_num_new_matched_tokens`` for the desk's requests (None: not one)."""
        req_id = request.request_id
        if req_id in self._publishing:  # computes its own KV, alone (see publish_gate)
            if self.gate.may_admit_publish(req_id):
                return 0, False
            # vLLM 0.32 turns any answer into 0 for a request that skips reading the prefix
            # cache; lower the flag for this answer only: it is raised again at the end of
            # this scheduling pass (release_held), before the next cache lookup.
            request.skip_reading_prefix_cache = False
            self._held.append(request)
            return None, False
        waiting = self._waiting.get(req_id)
        if waiting is None:
            return None
        # None: ask again next step. Once done waiting it still waits for the gate: a
        # publish running alone is joined by nobody, not even a one-token wait.
        if self._still_waiting(waiting) or not self.gate.may_admit(req_id):
            return None, False
        if waiting.wait_for is not None:  # another publish of it may start before this one finishes
            waiting.waited = self._wait_report(waiting.wait_for)
        return 0, False

    def is_publishing(self, req_id: str) -> bool:
        return req_id in self._publishing

    def release_held(self) -> None:
        """The end of a scheduling pass: held publishes skip the prefix cache again."""
        for request in self._held:
            request.skip_reading_prefix_cache = True
        self._held = []

    def plan_saves(self, out: "SchedulerOutput") -> list[SaveSpec]:
        """Follow publish requests' blocks; a save in the step that ends their prefill."""
        progress: list[tuple[Publishing, str, int]] = []
        for new_req in out.scheduled_new_reqs:
            pub = self._publishing.get(new_req.req_id)
            if pub is not None:
                pub.block_ids = list(new_req.block_ids[0])
                progress.append((pub, new_req.req_id, new_req.num_computed_tokens))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            pub = self._publishing.get(req_id)
            if pub is None or pub.planned:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    pub.block_ids = list(new_ids[0])
                else:
                    pub.block_ids.extend(new_ids[0])
            progress.append((pub, req_id, cached.num_computed_tokens[i]))
        saves = []
        for pub, req_id, computed in progress:
            scheduled = out.num_scheduled_tokens.get(req_id, 0)
            if pub.planned or not scheduled:
                continue
            pub.steps.append([computed, scheduled, len(out.num_scheduled_tokens)])
            if computed + scheduled < len(pub.prompt):
                continue
            pub.planned = True
            self.gate.on_prefill_done(req_id)
            if pub.doc_id:
                saves.append(self._save(req_id, pub))
        return saves

    def _save(self, req_id: str, pub: Publishing) -> SaveSpec:
        save = SaveSpec(
            req_id=req_id, doc_id=pub.doc_id, token_ids=pub.prompt, block_ids=list(pub.block_ids), spans=pub.spans,
            title=pub.ask.title, metadata=dict(pub.ask.metadata), salted=bool(pub.profile.cache_salt),
            adapter=pub.profile.adapter or "", adapter_name=pub.profile.adapter_name or "", verify=pub.verify,
            prefill=pub.prefill, vouched=self.index.vouched([span.key for span in pub.spans]), private=pub.ask.private,
            require_grant=pub.ask.require_grant,
        )
        self._saving[req_id] = save
        self._results.pop(pub.doc_id, None)  # a wait_for now waits for this one
        return save

    def on_report(self, report: WorkerReport) -> None:
        for req_id, results in report.documents.items():
            save = self._saving.get(req_id)
            if save is None:
                continue
            reported = self._reported.setdefault(req_id, [])
            reported += results
            if len(reported) < self.ranks:
                continue  # another rank is still writing (or comparing) its part
            del self._saving[req_id], self._reported[req_id]
            result = self._verdict(save, reported) if save.verify else self._publish(save, reported)
            self._results[save.doc_id] = result.as_report()
            while len(self._results) > self.config.max_results:
                self._results.popitem(last=False)

    def _publish(self, save: SaveSpec, results: list[DocumentResult]) -> DocumentResult:
        """Every rank stored its part: the manifest, last."""
        failed = [r for r in results if not r.ok]
        if failed:
            return failed[0]
        try:
            manifest = ranks.manifest_of(save, results, self.parts, fingerprint=self.fingerprint,
                                         profile=self.profile_fields, chunk_size=self.config.chunk_size,
                                         tenant_key=self.keys.sealer.key_id if save.private else None)
            if self.signer is not None:
                manifest = self.signer.sign(manifest)
            put_manifest(self.store, manifest)
        except Exception as e:  # a store outage, or ranks that disagree: not published, said so
            logger.error("kvcdn: document %s not published: %r", save.doc_id[:16], e)
            self.stats.fail("publish_error")
            return DocumentResult.failed(save, f"manifest not written: {e!r}")
        self.index.add(manifest)  # hits from now on, before any refresh
        self.stats.add("published_documents")
        logger.info("kvcdn: published document %s: %d tokens, %d chunks%s", save.doc_id[:16], manifest.num_tokens,
                    len(manifest.chunks), f" in parts {', '.join(manifest.parts)}" if manifest.parts else "")
        return DocumentResult(save.doc_id, False, True, save.prefill, ranks.publish_details(results, manifest))

    def _verdict(self, save: SaveSpec, results: list[DocumentResult]) -> DocumentResult:
        failed = [r for r in results if not r.ok]
        if failed:
            return failed[0]
        return DocumentResult(save.doc_id, True, True, save.prefill, ranks.verdict(results))

    def finish(self, req_id: str) -> dict | None:
        """The report of one of the desk's requests (None: not one)."""
        pub = self._publishing.pop(req_id, None)
        if pub is not None:
            return self._publish_report(req_id, pub)
        waiting = self._waiting.pop(req_id, None)
        if waiting is None:
            return None
        if waiting.wait_for is not None:
            return waiting.waited or self._wait_report(waiting.wait_for)
        return {"index_synced": self.index.refreshed_at >= waiting.arrived, "documents": self.index.num_documents}

    def _in_flight(self, doc_id: str) -> bool:
        return any(save.doc_id == doc_id for save in self._saving.values())

    def _still_waiting(self, waiting: Waiting) -> bool:
        """A sync_index request before a refresh that began after it has finished, or a
        wait_for request while its document's publish/verify is in flight (both capped)."""
        if time.monotonic() - waiting.arrived >= self.config.wait_limit_s:
            return False
        if waiting.wait_for is None:
            return self.index.refreshed_at < waiting.arrived
        return self._in_flight(waiting.wait_for)

    def _publish_report(self, req_id: str, pub: Publishing) -> dict:
        report = {
            "document": pub.doc_id,
            "num_tokens": len(pub.prompt),
            "fingerprint": self.fingerprint,
            "prefill": pub.prefill,
            **({} if pub.verify else {"num_chunks": len(pub.spans)}),
        }
        if req_id in self._saving:
            return {**report, "pending": True}  # written in the background: wait_for it
        return {**report, "verified" if pub.verify else "published": False, "error": "the prefill did not complete"}

    def _wait_report(self, doc_id: str) -> dict:
        if self._in_flight(doc_id):
            return {"document": doc_id, "pending": True}
        result = self._results.get(doc_id)
        if result is None:
            return {"document": doc_id, "error": "no publish or verify of this document is known to this engine"}
        return dict(result)

