"""Run one real vLLM engine through a list of operations; write the results as JSON.

Each engine runs in its own process (``python tests/engine_job.py SPEC OUT``), so every
test engine is a fresh one and engines never share state. Every operation records the
change in vLLM's own counters, so tests check what vLLM did, not what we claim.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def run(spec: dict) -> dict:
    from vllm_kvcdn.offline import engine_counters, generate, make_llm

    llm = make_llm(
        spec["model"],
        store_url=spec.get("store_url"),
        extra_config=spec.get("extra_config"),
        enable_prefix_caching=spec.get("prefix_caching", True),
        chunk_size=spec.get("chunk_size", 256),
    )
    results = {}
    for op in spec["ops"]:
        before = engine_counters(llm)
        answer = generate(
            llm,
            op["ids"],
            max_tokens=op.get("max_tokens", 12),
            publish=op["op"] == "publish",
            cache_salt=op.get("salt"),
        )
        after = engine_counters(llm)
        delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
        results[op["name"]] = {"answer": asdict(answer), "counters": delta}
    return results


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    results = run(spec)
    with open(out_path, "w") as f:
        json.dump(results, f)
