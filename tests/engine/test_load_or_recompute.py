"""Load or recompute, decided by measurement, on a real engine (tiny model, in-process
core; vLLM's prefix cache and the RAM tier off, so every hit reads the store).

The store's chunk reads are slowed and healed while the engine runs (a delay file,
``KVCDN_TEST_FAULTS=chunk_get_delay_file``); the worker learns the reads' time from its
loads and probes, and the engine's prefill rate from its own forward passes:
- measured fast: a hit loads; the store slowed to 1 s a read: the next hit still loads
  (it knows no better) and measures it;
- known slow: hits are computed instead (counted as ``recompute_faster``), bit-equal to a
  cold prefill, each one probing the store once in the background;
- healed: once the probes say so, hits load again.
"""

from __future__ import annotations

import pytest

from tests.rigs.documents import EXTERNAL, document, query
from vllm_kvcdn.defaults import TEST_FAULTS_ENV
from vllm_kvcdn.testing.exactness import identical

DOC_TOKENS = 300
SKIPPED = "vllm:kvcdn_load_failures{reason=recompute_faster}"


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_engine, tiny_model, tokenizer) -> dict:
    work = tmp_path_factory.mktemp("load-or-recompute")
    delay = work / "delay"
    delay.write_text("0")
    doc = document(tokenizer, 2000, DOC_TOKENS)
    prompt = doc + tokenizer(" Q: who opened the gate? A:").input_ids

    def ask(name: str, **kw) -> dict:
        return query(name, prompt, 8, **kw)

    def slow(seconds: str) -> dict:
        return {"name": f"delay_{seconds}", "op": "write_file", "path": str(delay), "text": seconds}

    settle = {"name": "settle", "op": "settle"}
    return run_engine({
        "model": str(tiny_model), "store_url": f"file://{work / 'store'}", "prefix_caching": False,
        "inproc": True, "extra_config": {"ram_tier_gib": 0, "load_policy": "measured"},
        "env": {TEST_FAULTS_ENV: f"chunk_get_delay_file={delay}"},
        "ops": [{"name": "pub", "op": "publish", "ids": doc},
                ask("cold", salt="no-document"),
                ask("fast"), slow("1.0"), ask("slowed"),
                ask("skipped"), settle, slow("0"),
                ask("probing1"), settle, ask("probing2"), settle,
                ask("back")],
    })


def _hit(result: dict) -> bool:
    return result["answer"]["kvcdn"]["hit"]


def test_a_store_measured_slow_gets_recompute_and_a_healed_one_loads_again(run):
    assert _hit(run["fast"]) and _hit(run["slowed"])
    assert run["slowed"]["seconds"] > 1.0  # it did wait for the slow reads
    for name in ("skipped", "probing1", "probing2"):
        counters = run[name]["counters"]
        assert not _hit(run[name]) and counters.get(EXTERNAL, 0) == 0, (name, counters)
        assert counters[SKIPPED] == 1, (name, counters)
        assert identical(run[name]["answer"], run["cold"]["answer"]), name
    # Did not wait for the store (a read takes 1 s); the cold prefill's own time differs by CPU.
    assert run["skipped"]["seconds"] < run["cold"]["seconds"] + 0.5
    assert _hit(run["back"]) and run["back"]["counters"][EXTERNAL] == DOC_TOKENS
