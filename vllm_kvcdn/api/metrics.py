"""Read our counters back from this process's Prometheus registry (the API server's).

vLLM ships the connector's stats from the engine to the API server and records them
there (``KVCDNPromMetrics``); the side API reports those same numbers.
"""

from __future__ import annotations

from prometheus_client import REGISTRY

PREFIX = "vllm:kvcdn_"


def _samples(suffixes=("_total",)):
    for family in REGISTRY.collect():
        if family.name.startswith(PREFIX):
            for sample in family.samples:
                if sample.name.endswith(suffixes):
                    yield family.name.removeprefix(PREFIX), sample


def kvcdn_counters() -> dict:
    """``{counter: total, "failures": {reason: n}, "<labelled counter>": {reason: n},
    "<histogram>_sum"/"_count": ...}`` over engines."""
    out: dict = {"failures": {}}
    for name, sample in _samples(("_total", "_sum", "_count")):
        if sample.name.endswith(("_sum", "_count")):
            key = name + sample.name[sample.name.rindex("_"):]
            out[key] = out.get(key, 0) + sample.value
        elif "reason" in sample.labels:  # {reason: n}: load_failures as "failures"
            counts = out.setdefault("failures" if name == "load_failures" else name, {})
            reason = sample.labels["reason"]
            counts[reason] = counts.get(reason, 0) + sample.value
        else:
            out[name] = out.get(name, 0) + sample.value
    return out
