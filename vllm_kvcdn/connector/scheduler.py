"""Scheduler half: match prompts against published chunks, plan loads and publishes.

Runs in the scheduler process; does no tensor work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm_kvcdn.artifact import ArtifactError, Manifest
from vllm_kvcdn.chain import chain_seed, iter_chunks
from vllm_kvcdn.config import PUBLISH_PARAM, KVCDNConfig
from vllm_kvcdn.connector.metadata import ChunkLoad, KVCDNMetadata, LoadSpec, SaveSpec
from vllm_kvcdn.connector.params import PublishAsk, parse_params
from vllm_kvcdn.connector.publish_gate import PublishGate
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.fingerprint import Fingerprint
from vllm_kvcdn.index import ChunkIndex, Match, manifest_object_key, verify_report_key
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store, StoreError

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


@dataclass
class _Publishing:
    """A publish (or verify) request on its way through prefill."""

    ask: PublishAsk
    prompt: list[int]
    chunk_keys: list[tuple[str, str, int]]  # (key, parent, num_tokens) of each chunk to write
    salted: bool = False
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

    @property
    def doc_id(self) -> str | None:
        return self.chunk_keys[-1][0] if self.chunk_keys else None


@dataclass
class _Hit:
    doc_id: str | None
    matched_tokens: int
    loaded_tokens: int
    failed: bool = False


class KVCDNScheduler:
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, store: Store):
        self.config = config
        self.fingerprint = fingerprint
        self.store = store
        self.index = ChunkIndex(store, fingerprint.digest, config.chunk_size)
        self.index.refresh(force=True)
        self.stats = KVCDNStats()
        self.gate = PublishGate(config.publish_isolation_s)
        self._held_publishes: list["Request"] = []  # told "ask again" in this scheduling pass
        self._matches: dict[str, tuple[Match, int]] = {}
        self._loads: list[LoadSpec] = []
        self._publishing: dict[str, _Publishing] = {}
        self._hits: dict[str, _Hit] = {}
        self._rejected: dict[str, str] = {}  # request id -> why its kvcdn params were ignored

    # -- matching -------------------------------------------------------------

    def on_new_request(self, request: "Request") -> None:
        parsed = parse_params(request.kv_transfer_params, self.config.publish_key)
        if parsed.rejected:
            self._rejected[request.request_id] = parsed.rejected
            self.stats.add_labelled("rejected_params", parsed.reason)
            logger.warning("kvcdn: request %s: kvcdn params ignored: %s", request.request_id, parsed.rejected)
        ask = parsed.ask
        if ask is None:
            self.stats.add("lookups")
            return
        # A publish computes the whole document itself: blocks vLLM's prefix cache holds
        # were computed in other requests' steps and may differ in the last bits.
        request.skip_reading_prefix_cache = True
        prompt = list(request.prompt_token_ids or [])
        if ask.verify:
            chunk_keys = self._manifest_chunks(ask.verify, prompt)
        else:
            seed = chain_seed(self.fingerprint.digest, request.cache_salt)
            chunk_keys = [(s.key, s.parent, s.num_tokens) for s in iter_chunks(prompt, seed, self.config.chunk_size)]
        self._publishing[request.request_id] = _Publishing(
            ask=ask, prompt=prompt, chunk_keys=chunk_keys, salted=bool(request.cache_salt),
        )

    def _manifest_chunks(self, doc_id: str, prompt: list[int]) -> list[tuple[str, str, int]]:
        """Chunks of a published document, to verify against a recompute of ``prompt``."""
        try:
            data = self.store.get(manifest_object_key(doc_id))
            manifest = Manifest.from_json(data) if data is not None else None
        except (ArtifactError, StoreError) as e:
            logger.warning("kvcdn: cannot read the manifest of %s: %s", doc_id[:16], e)
            manifest = None
        if manifest is None or manifest.num_tokens != len(prompt) or manifest.fingerprint != self.fingerprint.digest:
            logger.warning("kvcdn: cannot verify %s: not published for this model, or other tokens", doc_id[:16])
            return []
        return [(c.key, c.parent, c.num_tokens) for c in manifest.chunks]

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        req_id = request.request_id
        prompt = request.prompt_token_ids or []
        if req_id in self._publishing:  # computes its own KV, alone (see publish_gate)
            if self.gate.may_admit_publish(req_id):
                return 0, False
            # vLLM 0.32 turns any answer into 0 for a request that skips reading the prefix
            # cache; lower the flag for this answer only: it is raised again at the end of
            # this scheduling pass (build_connector_meta), before the next cache lookup.
            request.skip_reading_prefix_cache = False
            self._held_publishes.append(request)
            return None, False
        if not self.gate.may_admit(req_id):
            return None, False  # a publish runs alone right now: ask again next step
        if len(prompt) < 2:  # vLLM needs the last prompt token computed
            return 0, False
        previous = self._hits.get(req_id)
        if previous is not None and previous.failed:
            return 0, False  # its load failed: recompute, never retry the same chunks
        self.index.refresh()
        match = self.index.match(prompt, request.cache_salt)
        hit = min(match.num_tokens, len(prompt) - 1)
        if hit <= num_computed_tokens:
            self._matches.pop(req_id, None)
            return 0, False
        self._matches[req_id] = (match, hit)
        # Asynchronous, so vLLM registers the loaded blocks in its prefix cache only after
        # the worker reports the load finished, and only the blocks before the first one
        # that failed: a failed load, even of a request aborted before its recompute,
        # never leaves blocks another request can hit (a synchronous load's blocks are
        # registered when allocated, before any byte is written).
        return hit - num_computed_tokens, True

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        req_id = request.request_id
        self.gate.on_admitted(req_id, publish=req_id in self._publishing)
        planned = self._matches.pop(req_id, None)
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
        self._hits[req_id] = _Hit(match.doc_id, hit, num_external_tokens)
        self.stats.add("matched_requests")
        self.stats.add("matched_tokens", num_external_tokens)
        if match.doc_id:
            self.stats.add_labelled("document_reads", match.doc_id)
        logger.info(
            "kvcdn: request %s hits document %s: %d tokens loaded from the store (%d were local)",
            req_id, (match.doc_id or "?")[:16], num_external_tokens, write_start,
        )

    # -- per step ---------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVCDNMetadata:
        for request in self._held_publishes:
            request.skip_reading_prefix_cache = True
        self._held_publishes = []
        meta = KVCDNMetadata(loads=self._loads)
        self._loads = []
        if self._publishing:
            meta.saves = self._plan_publishes(scheduler_output)
        return meta

    def _plan_publishes(self, out: "SchedulerOutput") -> list[SaveSpec]:
        """Follow publish requests' blocks; emit a save in the step that ends their prefill."""
        progress: list[tuple[str, int]] = []
        for new_req in out.scheduled_new_reqs:
            state = self._publishing.get(new_req.req_id)
            if state is not None:
                state.block_ids = list(new_req.block_ids[0])
                progress.append((new_req.req_id, new_req.num_computed_tokens))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._publishing.get(req_id)
            if state is None or state.planned:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            progress.append((req_id, cached.num_computed_tokens[i]))
        saves = []
        for req_id, computed in progress:
            state = self._publishing[req_id]
            scheduled = out.num_scheduled_tokens.get(req_id, 0)
            if state.planned or not scheduled:
                continue
            state.steps.append([computed, scheduled, len(out.num_scheduled_tokens)])
            if computed + scheduled < len(state.prompt):
                continue
            state.planned = True
            self.gate.on_prefill_done(req_id)
            if not state.chunk_keys:
                continue
            saves.append(
                SaveSpec(
                    req_id=req_id,
                    token_ids=state.prompt,
                    block_ids=list(state.block_ids),
                    chunk_keys=state.chunk_keys,
                    title=state.ask.title,
                    metadata=dict(state.ask.metadata),
                    salted=state.salted,
                    verify=state.verify,
                    prefill=state.prefill,
                )
            )
        return saves

    def update_connector_output(self, failed_req_ids: set[str]) -> None:
        for req_id in failed_req_ids:
            hit = self._hits.get(req_id)
            if hit is not None:
                hit.failed = True

    # -- finish -------------------------------------------------------------------

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self.gate.on_finished(req_id)
        self._matches.pop(req_id, None)
        rejected = self._rejected.pop(req_id, None)
        state = self._publishing.pop(req_id, None)
        hit = self._hits.pop(req_id, None)
        if state is not None:
            report = self._publish_report(state)
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
        if rejected:
            report["rejected"] = rejected
        return False, {PUBLISH_PARAM: report}

    def _publish_report(self, state: _Publishing) -> dict:
        doc_id = state.doc_id
        key = verify_report_key(doc_id) if state.verify else manifest_object_key(doc_id)
        return {
            "verified" if state.verify else "published": bool(doc_id) and self.store.contains(key),
            "document": doc_id,
            "num_tokens": len(state.prompt),
            "num_chunks": len(state.chunk_keys),
            "fingerprint": self.fingerprint.digest,
            "prefill": state.prefill,
        }
