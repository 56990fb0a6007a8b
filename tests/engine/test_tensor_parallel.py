"""Tensor parallelism on real engines: vLLM 0.32's CPU backend with ``tensor_parallel_size=2``
(the ``mp`` executor, one core per rank: ``VLLM_CPU_OMP_THREADS_BIND="0|1"``), the tiny
model's two KV heads one per rank.

One engine publishes (each rank stores its head's part of every chunk, the scheduler
writes one manifest naming both parts) and verifies; a second engine, started fresh on
the same store, serves hits, a document whose part on one rank only is damaged, and a
load aborted while both ranks read; plain vLLM with the same TP is the reference.
"""

from __future__ import annotations

import pytest

from tests.rigs.documents import COMPUTED, EXTERNAL, document, query
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.store.keys import chunk_object_key
from vllm_kvcdn.testing.exactness import identical

TP = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp", "max_num_batched_tokens": 2048}
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
DOC_TOKENS = 512  # whole blocks: vLLM's resident prefix cache then reuses all of it (level 2)
NEW_TOKENS = 8
PARTS = ["h0-1of2", "h1-2of2"]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    q = {name: tokenizer(text).input_ids for name, text in
         (("q1", " Question: who kept the ledger? Answer:"), ("q2", " Q: where does the road end? A:"),
          ("q3", " Q: who pays? A:"))}
    intact, damaged = document(tokenizer, 3100, DOC_TOKENS), document(tokenizer, 3400, DOC_TOKENS)
    tail = document(tokenizer, 3700, DOC_TOKENS + 77)  # a partial last chunk, in parts too
    return {"intact": intact, "damaged": damaged, "tail": tail, "intact_q1": intact + q["q1"],
            "intact_q3": intact + q["q3"], "damaged_q1": damaged + q["q1"], "damaged_q2": damaged + q["q2"],
            "tail_q2": tail + q["q2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_engine, tiny_model, prompts) -> dict:
    store = tmp_path_factory.mktemp("tp-store")
    common = {"model": str(tiny_model), "engine_args": TP, "inproc": True}
    publisher = run_engine({**common, "store_url": f"file://{store}", "env": TP_ENV, "ops": [
        {"name": "intact", "op": "publish", "ids": prompts["intact"]},
        {"name": "intact_saved", "op": "kv_blocks", "of": "save", "tokens": DOC_TOKENS},
        {"name": "damaged", "op": "publish", "ids": prompts["damaged"]},
        {"name": "tail", "op": "publish", "ids": prompts["tail"]},
        {"name": "verify", "op": "verify", "ids": prompts["intact"], "doc": "@intact"},
    ]})
    fingerprint = publisher["intact"]["answer"]["kvcdn"]["fingerprint"]
    first = document_chunks(prompts["damaged"], fingerprint, None, 256)[0]
    part = store / chunk_object_key(first.key, PARTS[1])  # rank 1's part of the first chunk only
    data = bytearray(part.read_bytes())
    data[-1] ^= 0x01
    part.write_bytes(bytes(data))

    reader = run_engine({**common, "store_url": f"file://{store}", "ops": [
        query("intact_q1", prompts["intact_q1"], NEW_TOKENS),
        {"name": "intact_loaded", "op": "kv_blocks", "of": "load", "tokens": DOC_TOKENS},
        query("tail_q2", prompts["tail_q2"], NEW_TOKENS),
        query("damaged_q1", prompts["damaged_q1"], NEW_TOKENS),
        query("damaged_q2", prompts["damaged_q2"], NEW_TOKENS),
        {"name": "reset", "op": "reset"},
        {"name": "abort", "op": "abort", "ids": prompts["intact_q3"], "max_tokens": NEW_TOKENS, "after_steps": 1},
        query("intact_q3", prompts["intact_q3"], NEW_TOKENS),
        {"name": "reset2", "op": "reset"},
        query("intact_hot", prompts["intact_q1"], NEW_TOKENS),
    ], "env": {**TP_ENV, "KVCDN_TEST_FAULTS": "chunk_get_delay_s=0.3"}})  # both ranks still read at the abort
    plain = run_engine({**common, "store_url": None, "env": TP_ENV, "ops": [
        query("intact", prompts["intact"], 1), query("intact_q1", prompts["intact_q1"], NEW_TOKENS),
        query("intact_q3", prompts["intact_q3"], NEW_TOKENS),
        query("tail_q2", prompts["tail_q2"], NEW_TOKENS),
        {"name": "reset", "op": "reset"},
        query("damaged_q1", prompts["damaged_q1"], NEW_TOKENS), query("damaged_q2", prompts["damaged_q2"], NEW_TOKENS),
    ]})
    return {"publisher": publisher, "reader": reader, "plain": plain, "store": store}


def test_each_rank_stores_its_part_and_one_manifest_names_both(runs):
    from vllm_kvcdn.artifact import catalog
    from vllm_kvcdn.store import open_store

    report = runs["publisher"]["intact"]["answer"]["kvcdn"]
    assert report["published"] is True and report["parts"] == PARTS and report["new_chunks"] == 2 * 2, report
    manifest = catalog.get_manifest(open_store(f"file://{runs['store']}"), report["document"])
    assert manifest.parts == PARTS and manifest.profile["runtime"]["tensor_parallel_size"] == 2
    verify = runs["publisher"]["verify"]["answer"]["kvcdn"]
    assert verify["verified"] is True and verify["identical"] is True, verify


def test_a_hit_loads_every_rank_part_and_equals_plain_vllm_with_the_document_resident(runs, prompts):
    hit = runs["reader"]["intact_q1"]
    assert hit["answer"]["kvcdn"]["hit"] is True and hit["answer"]["kvcdn"]["loaded_tokens"] == DOC_TOKENS
    # vLLM's own counters: the document came through the connector, only the question was computed.
    assert hit["counters"][EXTERNAL] == DOC_TOKENS
    assert hit["counters"][COMPUTED] == len(prompts["intact_q1"]) - DOC_TOKENS
    # Counted once per request, not once per rank; bytes are both ranks' (one head each).
    assert hit["counters"]["vllm:kvcdn_loaded_tokens"] == DOC_TOKENS and hit["counters"]["vllm:kvcdn_reads"] == 1
    resident = runs["plain"]["intact_q1"]["answer"]
    assert resident["num_cached_tokens"] == DOC_TOKENS
    assert identical(hit["answer"], resident)  # level 2
    # Level 1, per rank: the blocks each rank loaded are the bytes it computed when publishing.
    saved, loaded = runs["publisher"]["intact_saved"], runs["reader"]["intact_loaded"]
    assert len(saved) == len(loaded) == 2 and saved == loaded
    assert saved[0]["whole"] != saved[1]["whole"]  # each rank its own head


def test_a_document_with_a_partial_last_chunk_hits_whole(runs, prompts):
    hit = runs["reader"]["tail_q2"]
    assert hit["answer"]["kvcdn"]["loaded_tokens"] == len(prompts["tail"]), hit["answer"]["kvcdn"]
    assert hit["counters"][COMPUTED] == len(prompts["tail_q2"]) - len(prompts["tail"])


def test_one_rank_damaged_part_makes_every_rank_recompute(runs):
    """Rank 1's part of the first chunk fails its checksum; rank 0's is intact. vLLM takes the
    union of the ranks' failed blocks: both recompute, the answer is plain vLLM's cold one,
    the reason is counted, and nothing of the failed load is left for a later request."""
    failed = runs["reader"]["damaged_q1"]
    assert failed["answer"]["kvcdn"]["hit"] is False and failed["answer"]["kvcdn"]["loaded_tokens"] == 0
    assert failed["counters"].get("vllm:kvcdn_load_failures{reason=checksum}", 0) >= 1, failed["counters"]
    assert identical(failed["answer"], runs["plain"]["damaged_q1"]["answer"])
    later = runs["reader"]["damaged_q2"]
    assert later["counters"].get(EXTERNAL, 0) == 0 and later["answer"]["kvcdn"]["hit"] is False
    reference = runs["plain"]["damaged_q2"]["answer"]  # the document resident, as the recompute wrote it
    assert later["answer"]["num_cached_tokens"] == reference["num_cached_tokens"] == DOC_TOKENS
    assert identical(later["answer"], reference)


def test_a_load_aborted_on_both_ranks_leaves_nothing_wrong(runs):
    aborted = runs["reader"]["abort"]
    assert not aborted["finished_before_abort"]
    later = runs["reader"]["intact_q3"]["answer"]
    # Whether the aborted load's blocks were kept or the document is loaded again, the
    # answer is plain vLLM's with the document resident.
    assert identical(later, runs["plain"]["intact_q3"]["answer"])


def test_each_rank_keeps_its_part_in_its_own_ram_tier(runs):
    first, hot = runs["reader"]["intact_q1"], runs["reader"]["intact_hot"]
    assert hot["counters"].get("vllm:kvcdn_ram_tier_hits") == 2 * 2  # two chunks, two ranks' parts
    assert "vllm:kvcdn_store_read_bytes" not in hot["counters"]
    assert hot["counters"]["vllm:kvcdn_loaded_bytes"] == first["counters"]["vllm:kvcdn_loaded_bytes"]
    assert identical(hot["answer"], first["answer"])


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, run_engine, tokenizer) -> dict:
    """A model with one KV head under TP=2: both ranks hold (replicate) it, so each chunk
    has one part, the whole chunk, written by both ranks to the same object."""
    from vllm_kvcdn.testing.tiny_model import make_model

    model = str(make_model(tmp_path_factory.mktemp("models") / "mqa", "tiny-mqa", seed=1))
    doc = document(tokenizer, 3100, DOC_TOKENS)
    prompt = doc + tokenizer(" Q: who pays? A:").input_ids
    common = {"model": model, "engine_args": TP, "env": TP_ENV}
    store = tmp_path_factory.mktemp("mqa-store")
    kvcdn = run_engine({**common, "store_url": f"file://{store}", "ops": [
        {"name": "publish", "op": "publish", "ids": doc}, {"name": "reset", "op": "reset"},
        query("hit", prompt, NEW_TOKENS), {"name": "verify", "op": "verify", "ids": doc, "doc": "@publish"},
    ]})
    plain = run_engine({**common, "store_url": None,
                        "ops": [query("doc", doc, 1), query("resident", prompt, NEW_TOKENS)]})
    return {"kvcdn": kvcdn, "plain": plain, "store": store}


def test_ranks_that_replicate_a_kv_head_share_its_part(replicated):
    from vllm_kvcdn.artifact import catalog
    from vllm_kvcdn.store import open_store

    report = replicated["kvcdn"]["publish"]["answer"]["kvcdn"]
    assert report["published"] is True and report["parts"] == [], report  # one part: the whole chunk
    assert report["new_chunks"] == 2  # two chunks; the second rank found each one stored, intact
    manifest = catalog.get_manifest(open_store(f"file://{replicated['store']}"), report["document"])
    assert manifest.parts == [] and manifest.profile["runtime"]["tensor_parallel_size"] == 2
    hit = replicated["kvcdn"]["hit"]
    assert hit["answer"]["kvcdn"]["loaded_tokens"] == DOC_TOKENS and hit["counters"][EXTERNAL] == DOC_TOKENS
    assert identical(hit["answer"], replicated["plain"]["resident"]["answer"])  # level 2
    assert replicated["kvcdn"]["verify"]["answer"]["kvcdn"]["identical"] is True
