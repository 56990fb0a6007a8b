"""Scheduler half: match prompts against published chunks, plan loads and publishes.

Runs in the scheduler process; does no tensor work and no store I/O on the request path
(the index refreshes itself in a background thread, see ``index``).

Publish results: a publish (or verify) request finishes in the step that ends its
prefill, before the worker has written (or compared) the document in the background,
so its response says ``"pending": true``. The worker's result comes back as worker
metadata (``WorkerReport``); a later request carrying ``{"wait_for": <document id>,
"key": ...}`` waits in vLLM's queue (``get_num_new_matched_tokens`` answers "ask again")
until no publish or verify of that document is in flight, then reports its last result.
The side API and the offline helpers do that second request for their callers.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm_kvcdn.chain import ChunkSpan, chain_seed, iter_chunks
from vllm_kvcdn.config import PUBLISH_PARAM, KVCDNConfig
from vllm_kvcdn.connector.metadata import ChunkLoad, KVCDNMetadata, LoadSpec, SaveSpec
from vllm_kvcdn.connector.params import PublishAsk, parse_params
from vllm_kvcdn.connector.publish_gate import PublishGate
from vllm_kvcdn.connector.request_profile import AdapterDigests, RequestProfile, request_profile
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.fingerprint import Fingerprint
from vllm_kvcdn.index import ChunkIndex, Match
from vllm_kvcdn.ledger import LedgerWriter, Read, tenant_of
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from vllm_kvcdn.connector.worker import WorkerReport

logger = get_logger(__name__)

WAIT_LIMIT_S = 600.0  # a wait_for (sync_index) request gives up after this and reports "pending" (not synced)
MAX_RESULTS = 4096  # publish/verify results kept for wait_for requests (oldest dropped)


@dataclass
class _Publishing:
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
class _Hit:
    doc_id: str | None
    matched_tokens: int  # from vLLM's prefix cache and the store
    loaded_tokens: int  # from the store
    prompt_tokens: int
    tenant: str  # ledger.tenant_of(cache_salt)
    failed: bool = False


@dataclass
class _RequestState:
    """Everything the scheduler half knows about one request."""

    rejected: str | None = None  # why its kvcdn params were ignored
    profile: RequestProfile | None = None  # what its chunk keys carry besides tokens (request_profile)
    publishing: _Publishing | None = None
    wait_for: str | None = None  # the document whose publish/verify result it waits for
    waited: dict | None = None  # that result, taken when its wait ended (later publishes start meanwhile)
    sync_index: bool = False  # waits for an index refresh begun after it arrived
    arrived: float = field(default_factory=time.monotonic)
    planned: tuple[Match, int] | None = None  # (match, tokens to hit) until its blocks are allocated
    hit: _Hit | None = None


class KVCDNScheduler:
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, store: Store):
        self.config = config
        self.fingerprint = fingerprint
        self.index = ChunkIndex(store, fingerprint.digest, config.chunk_size, config.index_refresh_s)
        self.index.start_refresher()
        self.stats = KVCDNStats()
        self.gate = PublishGate(config.publish_isolation_s)
        self._held_publishes: list["Request"] = []  # told "ask again" in this scheduling pass
        self._requests: dict[str, _RequestState] = {}
        self._loads: list[LoadSpec] = []
        self._saving: dict[str, SaveSpec] = {}  # publish/verify request id -> its save, until the worker reports
        self._results: OrderedDict[str, dict] = OrderedDict()  # document id -> last publish/verify result
        self.refusal: str | None = None  # why the worker cannot load (reported once, at its first step)
        self.adapters = AdapterDigests()
        self._unsupported_logged: set[str] = set()  # reasons logged once each
        self.ledger = self._open_ledger(config.ledger_path)

    @staticmethod
    def _open_ledger(path: str) -> LedgerWriter | None:
        if not path:
            return None
        try:
            writer = LedgerWriter(path)
        except (OSError, sqlite3.Error) as e:  # serving goes on; the operator must see it
            logger.error("kvcdn: cache reads are NOT metered: cannot open the ledger %s (%s); set "
                         "kv_connector_extra_config.ledger_path or $KVCDN_LEDGER to a writable file", path, e)
            return None
        logger.info("kvcdn: metering cache reads in %s", writer.path)
        return writer

    def shutdown(self) -> None:
        self.index.stop()
        if self.ledger is not None:
            self.ledger.close()

    def _state(self, req_id: str) -> _RequestState:
        return self._requests.setdefault(req_id, _RequestState())

    # -- matching -------------------------------------------------------------

    def _profile(self, request: "Request", state: _RequestState) -> RequestProfile:
        """The request's profile, worked out once; an unsupported one is counted and its
        reason logged the first time it is seen."""
        if state.profile is None:
            state.profile = profile = request_profile(request, self.adapters)
            if profile.unsupported:
                self.stats.add_labelled("unsupported_requests", profile.unsupported)
                if profile.unsupported not in self._unsupported_logged:
                    self._unsupported_logged.add(profile.unsupported)
                    logger.warning("kvcdn: request %s is served without kvcdn (no load, no publish): %s; "
                                   "further requests like it are only counted in vllm:kvcdn_unsupported_requests"
                                   "{reason=%r}", request.request_id, profile.detail, profile.unsupported)
        return state.profile

    def on_new_request(self, request: "Request") -> None:
        state = self._state(request.request_id)
        parsed = parse_params(request.kv_transfer_params, self.config.publish_key)
        if parsed.rejected:
            state.rejected = parsed.rejected
            self.stats.add_labelled("rejected_params", parsed.reason)
            logger.warning("kvcdn: request %s: kvcdn params ignored: %s", request.request_id, parsed.rejected)
        ask = parsed.ask
        if ask is None:
            self.stats.add("lookups")
            self._profile(request, state)
            return
        if ask.wait_for:
            state.wait_for = ask.wait_for
            return
        if ask.sync_index:
            state.sync_index = True
            self.index.request_refresh()
            return
        profile = self._profile(request, state)
        if profile.unsupported:
            state.rejected = f"not {'verified' if ask.verify else 'published'}: {profile.detail}"
            return
        # A publish computes the whole document itself: blocks vLLM's prefix cache holds
        # were computed in other requests' steps and may differ in the last bits.
        request.skip_reading_prefix_cache = True
        prompt = list(request.prompt_token_ids or [])
        if ask.verify:
            doc_id, spans = ask.verify, []  # the worker compares with the manifest's chunks
        else:
            seed = chain_seed(self.fingerprint.digest, profile.cache_salt, profile.adapter)
            spans = list(iter_chunks(prompt, seed, self.config.chunk_size))
            doc_id = spans[-1].key if spans else None
        state.publishing = _Publishing(ask=ask, prompt=prompt, doc_id=doc_id, spans=spans, profile=profile)

    def _in_flight(self, doc_id: str) -> bool:
        return any(save.doc_id == doc_id for save in self._saving.values())

    def _still_waiting(self, state: _RequestState) -> bool:
        """A sync_index request before a refresh that began after it has finished, or a
        wait_for request while its document's publish/verify is in flight (both capped)."""
        if time.monotonic() - state.arrived >= WAIT_LIMIT_S:
            return False
        if state.sync_index:
            return self.index.refreshed_at < state.arrived
        return self._in_flight(state.wait_for)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        req_id = request.request_id
        prompt = request.prompt_token_ids or []
        state = self._state(req_id)
        if state.publishing is not None:  # computes its own KV, alone (see publish_gate)
            if self.gate.may_admit_publish(req_id):
                return 0, False
            # vLLM 0.32 turns any answer into 0 for a request that skips reading the prefix
            # cache; lower the flag for this answer only: it is raised again at the end of
            # this scheduling pass (build_connector_meta), before the next cache lookup.
            request.skip_reading_prefix_cache = False
            self._held_publishes.append(request)
            return None, False
        if state.sync_index or state.wait_for is not None:
            # None: ask again next step. Once done waiting it still waits for the gate: a
            # publish running alone is joined by nobody, not even a one-token wait.
            if self._still_waiting(state) or not self.gate.may_admit(req_id):
                return None, False
            if state.wait_for is not None:  # another publish of it may start before this one finishes
                state.waited = self._wait_report(state.wait_for)
            return 0, False
        if not self.gate.may_admit(req_id):
            return None, False  # a publish runs alone right now: ask again next step
        if len(prompt) < 2:  # vLLM needs the last prompt token computed
            return 0, False
        if state.hit is not None and state.hit.failed:
            return 0, False  # its load failed: recompute, never retry the same chunks
        if self.refusal is not None:
            return 0, False  # the worker cannot load into this engine's cache (its layout probe failed)
        profile = self._profile(request, state)
        if profile.unsupported:
            return 0, False  # its KV depends on inputs its tokens do not name: computed as usual
        match = self.index.match(prompt, profile.cache_salt, profile.adapter)
        hit = min(match.num_tokens, len(prompt) - 1)
        if hit <= num_computed_tokens:
            state.planned = None
            return 0, False
        state.planned = (match, hit)
        # Asynchronous, so vLLM registers the loaded blocks in its prefix cache only after
        # the worker reports the load finished, and only the blocks before the first one
        # that failed: a failed load, even of a request aborted before its recompute,
        # never leaves blocks another request can hit (a synchronous load's blocks are
        # registered when allocated, before any byte is written).
        return hit - num_computed_tokens, True

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        req_id = request.request_id
        state = self._state(req_id)
        self.gate.on_admitted(req_id, publish=state.publishing is not None)
        planned, state.planned = state.planned, None
        if num_external_tokens == 0 or planned is None:
            return
        match, hit = planned
        write_start = hit - num_external_tokens
        chunks = [
            ChunkLoad(
                key=span.key,
                start=span.start,
                num_tokens=span.num_tokens,
                write_from=max(span.start, write_start),
                write_to=min(span.end, hit),
                is_tail=span.num_tokens < self.config.chunk_size,
                tokens=list(request.prompt_token_ids[span.start : span.end]),
            )
            for span in match.spans
            if span.end > write_start and span.start < hit
        ]
        block_ids = list(blocks.get_block_ids()[0])
        self._loads.append(LoadSpec(req_id=req_id, block_ids=block_ids, chunks=chunks))
        state.hit = _Hit(match.doc_id, hit, num_external_tokens, len(request.prompt_token_ids),
                         tenant_of(request.cache_salt))
        self.stats.add("matched_requests")
        self.stats.add("matched_tokens", num_external_tokens)
        logger.info(
            "kvcdn: request %s hits document %s: %d tokens loaded from the store (%d were local)",
            req_id, (match.doc_id or "?")[:16], num_external_tokens, write_start,
        )

    # -- per step ---------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVCDNMetadata:
        for request in self._held_publishes:
            request.skip_reading_prefix_cache = True
        self._held_publishes = []
        meta = KVCDNMetadata(loads=self._loads, idle=not scheduler_output.total_num_scheduled_tokens)
        self._loads = []
        meta.saves = self._plan_publishes(scheduler_output)
        return meta

    def _publishing(self, req_id: str) -> _Publishing | None:
        state = self._requests.get(req_id)
        return state.publishing if state is not None else None

    def _plan_publishes(self, out: "SchedulerOutput") -> list[SaveSpec]:
        """Follow publish requests' blocks; emit a save in the step that ends their prefill."""
        progress: list[tuple[_Publishing, str, int]] = []
        for new_req in out.scheduled_new_reqs:
            pub = self._publishing(new_req.req_id)
            if pub is not None:
                pub.block_ids = list(new_req.block_ids[0])
                progress.append((pub, new_req.req_id, new_req.num_computed_tokens))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            pub = self._publishing(req_id)
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
            if not pub.doc_id:
                continue
            save = SaveSpec(
                req_id=req_id,
                doc_id=pub.doc_id,
                token_ids=pub.prompt,
                block_ids=list(pub.block_ids),
                spans=pub.spans,
                title=pub.ask.title,
                metadata=dict(pub.ask.metadata),
                salted=bool(pub.profile.cache_salt),
                adapter=pub.profile.adapter or "",
                adapter_name=pub.profile.adapter_name or "",
                verify=pub.verify,
                prefill=pub.prefill,
            )
            self._saving[req_id] = save
            self._results.pop(pub.doc_id, None)  # a wait_for now waits for this one
            saves.append(save)
        return saves

    def update_connector_output(self, report: "WorkerReport") -> None:
        if report.refusal is not None and self.refusal is None:
            self.refusal = report.refusal
            logger.error("kvcdn: no more loads are planned: %s", report.refusal)
        for req_id in report.failed_loads:
            state = self._requests.get(req_id)
            if state is not None and state.hit is not None:
                state.hit.failed = True
        for req_id, receipt in report.loads.items():
            state = self._requests.get(req_id)
            if state is not None and state.hit is not None:  # gone: aborted while loading, not served
                self._meter(req_id, state.hit, receipt)
        for req_id, result in report.documents.items():
            save = self._saving.pop(req_id, None)
            if save is None:
                continue
            if result.get("published"):
                self.index.add(save.doc_id, save.spans)  # hits from now on, before any refresh
            self._results[save.doc_id] = result
            while len(self._results) > MAX_RESULTS:
                self._results.popitem(last=False)

    def _meter(self, req_id: str, hit: _Hit, receipt: dict) -> None:
        """A read that succeeded: counted, and one row in the ledger."""
        self.stats.add("reads")
        if self.ledger is None:
            return
        self.ledger.record(Read(
            time=time.time(), request_id=req_id, document=hit.doc_id or "", tenant=hit.tenant,
            prompt_tokens=hit.prompt_tokens, loaded_tokens=hit.loaded_tokens,
            cached_tokens=hit.matched_tokens - hit.loaded_tokens,
            computed_tokens=hit.prompt_tokens - hit.matched_tokens,
            kv_bytes=int(receipt.get("kv_bytes", 0)), store_bytes=int(receipt.get("store_bytes", 0)),
            load_seconds=float(receipt.get("load_seconds", 0.0)),
        ))

    # -- finish -------------------------------------------------------------------

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self.gate.on_finished(req_id)
        state = self._requests.pop(req_id, None) or _RequestState()
        hit = state.hit
        if state.publishing is not None:
            report = self._publish_report(req_id, state.publishing)
        elif state.wait_for is not None:
            report = state.waited or self._wait_report(state.wait_for)
        elif state.sync_index:
            report = {"index_synced": self.index.refreshed_at >= state.arrived, "documents": self.index.num_documents}
        elif hit is None:
            report = {"hit": False, "loaded_tokens": 0}
        else:
            report = {
                "hit": not hit.failed,
                "document": hit.doc_id,
                "matched_tokens": hit.matched_tokens,
                "loaded_tokens": 0 if hit.failed else hit.loaded_tokens,
                **({"error": "load failed; tokens were recomputed"} if hit.failed else {}),
            }
        if state.rejected:
            report["rejected"] = state.rejected
        return False, {PUBLISH_PARAM: report}

    def _publish_report(self, req_id: str, pub: _Publishing) -> dict:
        report = {
            "document": pub.doc_id,
            "num_tokens": len(pub.prompt),
            "fingerprint": self.fingerprint.digest,
            "prefill": pub.prefill,
            **({} if pub.verify else {"num_chunks": len(pub.spans)}),
        }
        if req_id in self._saving:
            return {**report, "pending": True}  # written in the background: wait_for it
        return {**report, "verified" if pub.verify else "published": False,
                "error": "the prefill did not complete"}

    def _wait_report(self, doc_id: str) -> dict:
        if self._in_flight(doc_id):
            return {"document": doc_id, "pending": True}
        result = self._results.get(doc_id)
        if result is None:
            return {"document": doc_id, "error": "no publish or verify of this document is known to this engine"}
        return dict(result)
