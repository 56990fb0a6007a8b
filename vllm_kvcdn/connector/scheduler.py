"""Scheduler half: vLLM's scheduler-side connector calls, routed to two flows.

- ``load_planner``: ordinary requests: match against published chunks, plan the load,
  follow the hit, meter the read.
- ``publish_desk``: publish, verify, wait_for and sync_index requests, their saves and
  results.
Both share the publish gate (a publish's prefill runs alone: ``publish_gate``), the index
of published chunks and the request profiles. Runs in the scheduler process; no tensor
work and no store I/O on the request path.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.load_planner import LoadPlanner
from vllm_kvcdn.connector.publish_desk import PublishDesk
from vllm_kvcdn.connector.publish_gate import PublishGate
from vllm_kvcdn.connector.request_profile import RequestProfiles
from vllm_kvcdn.connector.stats import KVCDNStats
from vllm_kvcdn.connector.wire import PUBLISH_PARAM, KVCDNMetadata, WorkerReport, parse_params
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.market import grants
from vllm_kvcdn.market.grants import GrantError, ReadGrant
from vllm_kvcdn.market.ledger import LedgerWriter
from vllm_kvcdn.store import Store

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


class KVCDNScheduler:
    def __init__(self, config: KVCDNConfig, fingerprint: Fingerprint, store: Store, parts: list[str] = ("",),
                 ranks: int = 1, shared_block_size: int = 0):
        """``parts``: the part names of every chunk, one per distinct set of KV heads a
        tensor-parallel rank holds (``artifact.parts``); ``ranks``: the workers reporting;
        ``shared_block_size``: vLLM's block size when its prefix cache is on (else 0)."""
        self.config = config
        self.fingerprint = fingerprint
        trust = config.trust_policy()
        if trust.requires_signatures and not trust.publishers:
            logger.warning("kvcdn: %s serves signed documents only and this server trusts no publisher: nothing "
                           "will be served from it; set kv_connector_extra_config.trusted_publishers (or "
                           "signing_key, or allow_unsigned for a store only you write)", store.url)
        self.index = ChunkIndex(store, fingerprint.digest, config.chunk_size, config.index_refresh_s, trust=trust,
                                keys=config.keyring())
        self.index.start_refresher()
        self.stats = KVCDNStats()
        self.gate = PublishGate(config.publish_isolation_s)
        self.profiles = RequestProfiles(self.stats)
        self.ledger = _open_ledger(config.ledger_path)
        self.planner = LoadPlanner(config.chunk_size, self.index, self.stats, self.ledger, ranks,
                                   shared_block_size=shared_block_size, collapse_wait_s=config.load_timeout_s,
                                   require_grants=config.require_grants)
        self.desk = PublishDesk(config, fingerprint, self.index, self.gate, store, self.stats, list(parts), ranks)
        self._rejected: dict[str, str] = {}  # request id -> why its kvcdn params were ignored
        self._grants: dict[str, ReadGrant | GrantError] = {}  # request id -> the read grant it carries

    def shutdown(self) -> None:
        self.index.stop()
        if self.ledger is not None:
            self.ledger.close()

    def on_new_request(self, request: "Request") -> None:
        """A request arrives: read what its ``kv_transfer_params`` ask (never raises)."""
        req_id = request.request_id
        parsed = parse_params(request.kv_transfer_params, self.config.publish_key)
        if parsed.rejected:
            self._rejected[req_id] = parsed.rejected
            self.stats.add_labelled("rejected_params", parsed.reason)
            logger.warning("kvcdn: request %s: kvcdn params ignored: %s", req_id, parsed.rejected)
        ask = parsed.ask
        if ask is None:
            if parsed.grant is not None:
                try:
                    self._grants[req_id] = grants.parse(parsed.grant)  # its signature, once per request
                except grants.GrantError as e:
                    self._grants[req_id] = e
            self.stats.add("lookups")
            self.profiles.of(request)
            return
        profile = None if ask.wait_for or ask.sync_index else self.profiles.of(request)
        rejected = self.desk.on_ask(request, ask, profile)
        if rejected:
            self._rejected[req_id] = rejected

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the store will provide, and whether they
        load asynchronously; ``(None, False)``: ask again next step. Side-effect free
        apart from the plan kept for ``update_state_after_alloc``."""
        answer = self.desk.admission(request)
        if answer is not None:
            return answer
        if not self.gate.may_admit(request.request_id):
            return None, False  # a publish runs alone right now: ask again next step
        return self.planner.match(request, num_computed_tokens, self.profiles.of(request),
                                  self._grants.get(request.request_id))

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        """The request got its blocks: the planned load goes into them."""
        self.gate.on_admitted(request.request_id, publish=self.desk.is_publishing(request.request_id))
        self.planner.on_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVCDNMetadata:
        """The end of a scheduling pass: what the worker starts in this step."""
        self.desk.release_held()
        for reason, n in self.index.take_untrusted().items():
            self.stats.add_labelled("untrusted_documents", reason, n)
        tokens = scheduler_output.total_num_scheduled_tokens
        return KVCDNMetadata(loads=self.planner.take_loads(), saves=self.desk.plan_saves(scheduler_output),
                             idle=not tokens, scheduled_tokens=tokens)

    def update_connector_output(self, report: WorkerReport | None, finished_loads: set[str] = frozenset()) -> None:
        """The workers' report of a step (aggregated by vLLM), and the loads every rank ended."""
        if report is not None:
            self.planner.on_report(report)
            self.desk.on_report(report)
        self.planner.on_loads_finished(finished_loads)

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        """The request is done: its report goes back in the response's ``kv_transfer_params``;
        no block is held for us (False)."""
        req_id = request.request_id
        self.gate.on_finished(req_id)
        self.profiles.forget(req_id)
        self._grants.pop(req_id, None)
        report = self.desk.finish(req_id)
        planned = self.planner.finish(req_id)
        report = report if report is not None else planned
        rejected = self._rejected.pop(req_id, None)
        if rejected:
            report["rejected"] = rejected
        return False, {PUBLISH_PARAM: report}


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
