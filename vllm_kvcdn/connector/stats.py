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
    "loaded_tokens": "Tokens whose KV was copied from the store into the KV cache",
    "loaded_bytes": "Artifact bytes read and verified for loads",
    "load_seconds": "Seconds the worker spent loading chunks",
    "published_documents": "Documents published through the engine",
    "published_chunks": "Chunks written to the store (new objects only)",
    "published_bytes": "Bytes written to the store",
}


class KVCDNStats(KVConnectorStats):
    """``data = {"<counter>": number, "failures": {"<reason>": count}}``."""

    def add(self, name: str, value: float = 1) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def fail(self, reason: str, count: int = 1) -> None:
        failures = self.data.setdefault("failures", {})
        failures[reason] = failures.get(reason, 0) + count

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVCDNStats":
        for name, value in other.data.items():
            if name == "failures":
                for reason, n in value.items():
                    self.fail(reason, n)
            else:
                self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: v for k, v in self.data.items() if k != "failures"}
        for reason, n in self.data.get("failures", {}).items():
            out[f"failed_{reason}"] = n
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
        self._failure_metric = self._counter_cls(
            name="vllm:kvcdn_load_failures",
            documentation="Chunks not used, by reason (a miss: those tokens were recomputed)",
            labelnames=[*labelnames, "reason"],
        )
        self._failures: dict[tuple[int, str], Any] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, value in transfer_stats_data.items():
            if name == "failures":
                for reason, n in value.items():
                    child = self._failures.get((engine_idx, reason))
                    if child is None:
                        labels = [*self.per_engine_labelvalues[engine_idx], reason]
                        child = self._failures[(engine_idx, reason)] = self._failure_metric.labels(*labels)
                    child.inc(n)
            elif name in self._counters and value:
                self._counters[name][engine_idx].inc(value)

