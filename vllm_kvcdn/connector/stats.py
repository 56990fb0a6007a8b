"""Connector counters: aggregated by vLLM from both halves, logged and exported."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

COUNTERS = {
    "lookups": "Requests the connector looked up in the published index",
    "matched_requests": "Requests whose prompt matched published chunks (see loaded_tokens for what loaded)",
    "matched_tokens": "Prompt tokens planned for loading from published chunks",
    "reads": "Requests whose load served tokens (all of the hit, or the prefix before a failed chunk): cache reads, "
    "metered one row each in the ledger",
    "loaded_tokens": "Tokens loaded by reads that succeeded on every rank (a failed load counts none)",
    "collapsed_loads": "Requests that waited for another request's load of the same chunks and took its blocks "
    "from vLLM's prefix cache instead of reading them again",
    "loaded_bytes": "KV bytes written into the KV cache by loads (all ranks)",
    "store_read_bytes": "Artifact bytes read from the store and verified (all ranks)",
    "ram_tier_hits": "Chunks (a rank's part of one, under tensor parallelism) whose whole blocks came from the "
    "worker's host-RAM tier",
    "ram_tier_tail_hits": "Partial last blocks of documents (a rank's part) written from the worker's host-RAM "
    "tier (no chunk read for them)",
    "disk_tier_hits": "Chunk reads served by the node's disk tier (no request to the shared store)",
    "disk_tier_misses": "Chunk reads the disk tier sent on to the shared store",
    "image_tier_hits": "Chunks read from the node's block-image files into the RAM tier or the request's blocks "
    "(no packing op)",
    "image_tier_tail_hits": "Partial last blocks of documents read back from the node's disk into the RAM tier "
    "(no chunk read for them)",
    "image_tier_misses": "Block images not loaded (damaged and dropped, gone, or no free RAM-tier slot): chunk read",
    "published_documents": "Documents published through the engine",
    "published_chunks": "Chunks written to the store (new objects only)",
    "published_bytes": "Bytes written to the store",
    "replaced_chunks": "Stored chunks a publish replaced because they were damaged or held other bytes than it "
    "computed (a forgery, or an older checksum): never kept silently",
    "layout_probe_failures": "Workers whose KV layout disagreed with the engine's own cache-write op at start "
    "(they neither load nor publish)",
}


# Labelled counters: data[name] = {reason: count}; name -> (exported as ``vllm:kvcdn_<metric>``,
# ``reduce``'s prefix, help). Labels stay bounded (reasons); per-document and per-tenant reads
# are in the ledger.
LABELLED = {
    "failures": ("load_failures", "failed", "Loads that fell short, by reason: one per load (its first chunk not "
                 "used and every one after it were recomputed)"),
    "rejected_params": ("rejected_params", "rejected", "Requests whose kvcdn params were ignored, by reason "
                        "(malformed, unauthorized)"),
    "unsupported_requests": ("unsupported_requests", "unsupported", "Requests served without kvcdn (no load, no "
                             "publish) because their KV depends on inputs a chunk key does not carry, by reason "
                             "(multimodal, prompt_embeds, adapter_unresolved, pooling)"),
    "untrusted_documents": ("untrusted_documents", "untrusted", "Manifests never matched because the trust policy "
                            "refuses them, by reason (unsigned, unknown_publisher, bad_signature, weak_checksum, "
                            "misplaced, damaged, no_tenant_key): one per version read"),
    "grant_refusals": ("grant_refusals", "grant_refused", "Requests for a document that needs a read grant, "
                       "computed without a load (not billed), by reason (missing, malformed, bad_signature, "
                       "wrong_publisher, wrong_document, wrong_tenant, expired, exhausted)"),
}
# Observations (one per request): data[name] = [values].
OBSERVED = {
    "load_duration_seconds": "Time one request's load took in the background on one rank (read, verify, copy)",
    "publish_duration_seconds": "Time one published document's encode and write took in the background",
}
# Gauges: data[name] = the latest value (the largest over ranks): what the load-or-recompute
# planner believes (connector/load_costs.py), so an operator sees why hits are recomputed.
GAUGES = {
    "prefill_seconds_per_token": "The engine's prefill time per token, as the worker measures it from its forward "
    "passes (the load-or-recompute planner's estimate)",
    "store_read_seconds": "Median time of the worker's last chunk reads from the store (the planner's estimate)",
    "image_read_seconds": "Median time of the worker's last block-image reads from the node's disk (the planner's "
    "estimate)",
}
LOAD_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class KVCDNStats(KVConnectorStats):
    """``data = {"<counter>": number, "failures": {reason: n}, "rejected_params": {reason: n}}``."""

    def add(self, name: str, value: float = 1) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def add_labelled(self, name: str, label: str, count: int = 1) -> None:
        counts = self.data.setdefault(name, {})
        counts[label] = counts.get(label, 0) + count

    def fail(self, reason: str, count: int = 1) -> None:
        self.add_labelled("failures", reason, count)

    def observe(self, name: str, value: float) -> None:
        self.data.setdefault(name, []).append(value)

    def set_gauge(self, name: str, value: float) -> None:
        self.data[name] = value

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVCDNStats":
        for name, value in other.data.items():
            if name in LABELLED:
                for label, n in value.items():
                    self.add_labelled(name, label, n)
            elif name in OBSERVED:
                self.data.setdefault(name, []).extend(value)
            elif name in GAUGES:
                self.data[name] = max(self.data.get(name, value), value)
            else:
                self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: v for k, v in self.data.items() if k not in LABELLED and k not in OBSERVED}
        for name, (_, prefix, _) in LABELLED.items():
            for reason, n in self.data.get(name, {}).items():
                out[f"{prefix}_{reason}"] = n
        loads = self.data.get("load_duration_seconds", [])
        if loads:
            out["load_seconds_total"] = round(sum(loads), 4)
        return out

    def is_empty(self) -> bool:
        return not self.data

    def take(self) -> "KVCDNStats | None":
        """Hand over what was counted since the last call (for vLLM's stats channel)."""
        if self.is_empty():
            return None
        out = KVCDNStats(data=self.data)
        self.data = {}
        return out


class KVCDNPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for name, doc in COUNTERS.items():
            metric = self._counter_cls(name=f"vllm:kvcdn_{name}", documentation=doc, labelnames=labelnames)
            self._counters[name] = create_metric_per_engine(metric, per_engine_labelvalues)
        self._histograms = {}
        for name, doc in OBSERVED.items():
            metric = self._histogram_cls(name=f"vllm:kvcdn_{name}", documentation=doc, buckets=LOAD_BUCKETS,
                                         labelnames=labelnames)
            self._histograms[name] = create_metric_per_engine(metric, per_engine_labelvalues)
        self._gauges = {}
        for name, doc in GAUGES.items():
            metric = self._gauge_cls(name=f"vllm:kvcdn_{name}", documentation=doc, multiprocess_mode="mostrecent",
                                     labelnames=labelnames)
            self._gauges[name] = create_metric_per_engine(metric, per_engine_labelvalues)
        self._labelled = {
            name: self._counter_cls(name=f"vllm:kvcdn_{metric}", documentation=doc, labelnames=[*labelnames, "reason"])
            for name, (metric, _, doc) in LABELLED.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, value in transfer_stats_data.items():
            if name in self._histograms:
                for v in value:
                    self._histograms[name][engine_idx].observe(v)
            elif name in self._labelled:
                engine_labels = self.per_engine_labelvalues[engine_idx]
                for label, n in value.items():
                    self._labelled[name].labels(*engine_labels, label).inc(n)
            elif name in self._gauges:
                self._gauges[name][engine_idx].set(value)
            elif name in self._counters and value:
                self._counters[name][engine_idx].inc(value)

