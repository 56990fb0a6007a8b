"""Collapsed loads on a real engine (tiny model, in-process core, vLLM's prefix cache on).

Two requests on one published document arrive together; chunk reads take 0.5 s each
(``KVCDN_TEST_FAULTS=chunk_get_delay_s``), so the second one is scheduled while the
first one's load is in flight. The second waits for it, finds the document's whole
blocks in vLLM's prefix cache once that load ends, and loads only the partial last block
(counted by vLLM's own counters: 300 + 44 tokens external, 256 local). Both answers are
bit-equal to plain vLLM computing the document in a step of its own and then the
question (level 2). ``max_num_seqs=1`` makes the engine compute one request at a time,
as the reference does: a request's last bits depend on what shares its batch.

Without vLLM's prefix cache nothing is shared and each request loads its own: see
``test_async_io.py`` (two hits in one batch, 2 x 300 tokens external).
"""

from __future__ import annotations

import pytest

from tests.rigs.documents import EXTERNAL, document, query
from vllm_kvcdn.defaults import TEST_FAULTS_ENV
from vllm_kvcdn.testing.exactness import identical

DOC_TOKENS = 300  # one whole chunk (two blocks) and a 44-token tail
WHOLE = 256
LOCAL = "vllm:prompt_tokens_by_source{source=local_cache_hit}"


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    doc = document(tokenizer, 1500, DOC_TOKENS)
    return {"doc": doc,
            "first": doc + tokenizer(" Q: who opened the gate? A:").input_ids,
            "second": doc + tokenizer(" Question: what did the letter say?").input_ids}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_engine, tiny_model, prompts) -> dict:
    store = tmp_path_factory.mktemp("collapse-store")
    questions = [query("first", prompts["first"], 8), query("second", prompts["second"], 8)]
    served = run_engine({
        "model": str(tiny_model), "store_url": f"file://{store}", "prefix_caching": True, "inproc": True,
        "engine_args": {"max_num_seqs": 1},
        "env": {TEST_FAULTS_ENV: "chunk_get_delay_s=0.5"},
        "ops": [{"name": "pub", "op": "publish", "ids": prompts["doc"]},
                {"name": "reset", "op": "reset"},  # the publish's own blocks out of vLLM's prefix cache
                {"name": "both", "op": "batch", "requests": questions}],
    })
    plain = run_engine({
        "model": str(tiny_model), "store_url": None, "prefix_caching": False,
        "engine_args": {"max_num_batched_tokens": DOC_TOKENS}, "ops": questions,
    })
    return {"served": served, "plain": plain}


def test_the_second_request_takes_the_first_ones_blocks_and_loads_only_the_tail(runs):
    both = runs["served"]["both"]
    first, second = (answer["kvcdn"] for answer in both["answers"])
    assert first["hit"] is True and first["loaded_tokens"] == DOC_TOKENS, first
    assert second["hit"] is True and second["matched_tokens"] == DOC_TOKENS, second
    assert second["loaded_tokens"] == DOC_TOKENS - WHOLE, second
    counters = both["counters"]
    assert counters[EXTERNAL] == DOC_TOKENS + DOC_TOKENS - WHOLE, counters
    assert counters[LOCAL] == WHOLE, counters
    assert counters["vllm:kvcdn_collapsed_loads"] == 1, counters


def test_both_answers_are_level_2(runs):
    for k, name in enumerate(("first", "second")):
        got, ref = runs["served"]["both"]["answers"][k], runs["plain"][name]["answer"]
        assert identical(got, ref), (name, got, ref)
