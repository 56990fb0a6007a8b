"""Store I/O off the engine step (real engine, tiny model, in-process core).

Chunk reads sleep 1 s each (``KVCDN_TEST_FAULTS=chunk_get_delay_s=1``, a remote store's
round trip made long), so a load is still reading while the engine goes on:
- a publish's result (what only the worker knows: chunks written, bytes, write time) comes
  back in the response, and the store holds nothing but chunks and manifests;
- a publish and hits run in one batch; the published document hits at once afterwards;
- a document deleted while a request is loading it: the request falls back to a full
  prefill (bit-equal to computing it with nothing stored), the miss is counted;
- a store slower than ``load_timeout_s``: the load gives up, the tokens are computed.
"""

from __future__ import annotations

from functools import partial

import pytest

from tests.rigs.documents import EXTERNAL, document, query
from vllm_kvcdn.artifact.manifest import Manifest
from vllm_kvcdn.defaults import TEST_FAULTS_ENV
from vllm_kvcdn.testing.exactness import identical

DOC_TOKENS = 300  # one whole chunk and a tail


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    out = {}
    for i, name in enumerate("abc"):
        doc = document(tokenizer, 600 + i * 200, DOC_TOKENS)
        out[name] = doc
        out[f"{name}_q"] = doc + tokenizer(" Q: who opened the gate? A:").input_ids
        out[f"{name}_q2"] = doc + tokenizer(" Question: what did the letter say?").input_ids
    return out


_query = partial(query, max_tokens=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_engine, tiny_model, prompts) -> dict:
    store = tmp_path_factory.mktemp("async-store")
    result = run_engine({
        "model": str(tiny_model), "store_url": f"file://{store}", "prefix_caching": False, "inproc": True,
        "env": {TEST_FAULTS_ENV: "chunk_get_delay_s=1"},
        "ops": [
            {"name": "pub_a", "op": "publish", "ids": prompts["a"]},
            {"name": "pub_b", "op": "publish", "ids": prompts["b"]},
            {"name": "mixed", "op": "batch", "requests": [
                {"name": "pub_c", "op": "publish", "ids": prompts["c"]},
                _query("a_q", prompts["a_q"]), _query("a_q2", prompts["a_q2"])]},
            _query("c_q", prompts["c_q"]),
            {"name": "b_deleted", "op": "delete_during", "ids": prompts["b_q"], "doc": "@pub_b",
             "after_steps": 1, "max_tokens": 8},
            _query("b_cold", prompts["b_q"]),
        ],
    })
    result["store"] = store
    return result


def test_a_publish_result_comes_from_the_worker_not_the_store(run):
    report = run["pub_a"]["answer"]["kvcdn"]
    assert report["published"] is True and "pending" not in report, report
    assert report["num_chunks"] == 2 and report["new_chunks"] == 2, report
    assert report["new_bytes"] > 0 and report["write_seconds"] >= 0, report
    top = {p.name for p in run["store"].iterdir()}
    assert top == {"chunks", "manifests"}, top  # no verdict or status objects


def test_publish_and_hits_interleaved(run):
    pub_c, a_q, a_q2 = run["mixed"]["answers"]
    assert pub_c["kvcdn"]["published"] is True, pub_c["kvcdn"]
    for answer in (a_q, a_q2):
        assert answer["kvcdn"]["hit"] is True and answer["kvcdn"]["loaded_tokens"] == DOC_TOKENS, answer["kvcdn"]
    assert run["mixed"]["counters"][EXTERNAL] == 2 * DOC_TOKENS
    # The new document hits at once: the scheduler added it when the worker's result came.
    c_q = run["c_q"]["answer"]["kvcdn"]
    assert c_q["hit"] is True and c_q["loaded_tokens"] == DOC_TOKENS, c_q


def test_delete_during_a_load_falls_back_to_a_full_prefill(run):
    deleted, cold = run["b_deleted"], run["b_cold"]
    assert deleted["answer"]["kvcdn"]["hit"] is False, deleted["answer"]["kvcdn"]
    assert deleted["counters"].get("vllm:kvcdn_load_failures{reason=missing}", 0) >= 1, deleted["counters"]
    assert deleted["counters"].get(EXTERNAL, 0) == 0
    assert cold["answer"]["kvcdn"].get("hit") is False
    assert identical(deleted["answer"], cold["answer"]), (deleted["answer"], cold["answer"])


def test_a_store_slower_than_the_load_timeout_costs_a_bounded_wait(tmp_path, run_engine, tiny_model, prompts):
    """Reads take 5 s, the load gives up after 0.5 s: a counted "timeout" miss, the
    answer of a full prefill, and the request waited far less than one read.

    The engine runs in one process with a core reserved: its scheduler and worker halves
    must still agree on the fingerprint (they once did not: nothing ever matched)."""
    store = tmp_path / "slow-store"
    result = run_engine({
        "model": str(tiny_model), "store_url": f"file://{store}", "prefix_caching": False, "inproc": True,
        "extra_config": {"load_timeout_s": 0.5},
        "env": {TEST_FAULTS_ENV: "chunk_get_delay_s=5", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
        "ops": [
            {"name": "pub_a", "op": "publish", "ids": prompts["a"]},
            _query("slow", prompts["a_q"]),
            {**_query("cold", prompts["a_q"]), "salt": "no-document"},
        ],
    })
    report = result["pub_a"]["answer"]["kvcdn"]
    assert report["published"] is True
    # Written by the worker half, matched by the scheduler half after any index rebuild.
    (manifest,) = (Manifest.from_json(f.read_bytes()) for f in (store / "manifests").iterdir())
    assert manifest.fingerprint == report["fingerprint"], (manifest.profile["kernels"], report)
    slow, cold = result["slow"], result["cold"]
    assert slow["answer"]["kvcdn"]["hit"] is False, slow["answer"]["kvcdn"]
    assert slow["counters"].get("vllm:kvcdn_load_failures{reason=timeout}", 0) == 1, slow["counters"]
    assert slow["counters"].get(EXTERNAL, 0) == 0
    assert slow["seconds"] < 4, slow["seconds"]
    assert identical(slow["answer"], cold["answer"])
