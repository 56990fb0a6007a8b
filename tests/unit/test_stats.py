"""The connector's metrics through vLLM's own Prometheus plumbing (``KVConnectorPromMetrics``
with prometheus_client's classes, on a registry of the test's own)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_kvcdn.connector.stats import KVCDNPromMetrics, KVCDNStats


def _metrics(registry: CollectorRegistry) -> KVCDNPromMetrics:
    def bound(cls):
        return lambda *args, **kw: cls(*args, registry=registry, **kw)

    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    return KVCDNPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["model_name", "engine"],
                            {0: ["m", "0"]})


def test_the_planners_estimates_are_gauges_the_largest_rank_wins():
    rank0, rank1 = KVCDNStats(), KVCDNStats()
    rank0.set_gauge("store_read_seconds", 0.2)
    rank1.set_gauge("store_read_seconds", 0.5)
    rank0.set_gauge("prefill_seconds_per_token", 0.001)
    rank0.add("reads")
    step = KVCDNStats().aggregate(rank0).aggregate(rank1)
    assert step.data == {"store_read_seconds": 0.5, "prefill_seconds_per_token": 0.001, "reads": 1}
    registry = CollectorRegistry()
    metrics = _metrics(registry)
    metrics.observe(step.data)
    labels = {"model_name": "m", "engine": "0"}
    assert registry.get_sample_value("vllm:kvcdn_store_read_seconds", labels) == 0.5
    assert registry.get_sample_value("vllm:kvcdn_prefill_seconds_per_token", labels) == 0.001
    assert registry.get_sample_value("vllm:kvcdn_reads_total", labels) == 1
    metrics.observe({"store_read_seconds": 0.1})  # a gauge is set, not added
    assert registry.get_sample_value("vllm:kvcdn_store_read_seconds", labels) == 0.1
