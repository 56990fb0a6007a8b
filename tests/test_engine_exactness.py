"""End to end on the real vLLM CPU engine with the tiny model.

One engine publishes documents; fresh engines (new processes) then answer prompts that
start with them. Every answer is compared with a cold prefill of the same prompt on an
engine without the connector, with the same CPU thread setup and compile mode (eager),
and every "prefill skipped" claim is checked against vLLM's own counters.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vllm_kvcdn.chain import document_chunks
from vllm_kvcdn.index import chunk_object_key

pytestmark = pytest.mark.engine

COMPUTED = "vllm:request_prefill_kv_computed_tokens"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits"
BY_SOURCE_EXTERNAL = "vllm:prompt_tokens_by_source{source=external_kv_transfer}"


@pytest.fixture(scope="module")
def prompts(tokenizer, texts) -> dict[str, list[int]]:
    enc = lambda s: tokenizer(s).input_ids  # noqa: E731
    doc_d = enc(" ".join(texts["doc_d"]))[:700]  # 256 + 256 + a 188-token tail
    doc_e = enc(" ".join(texts["doc_e"]))[:600]  # 256 + 256 + an 88-token tail
    question = enc(" Question: which river runs past the stone city in winter? Answer:")
    other = enc(" ".join(texts["other"]))[:40]
    assert len(doc_d) == 700 and len(doc_e) == 600 and len(question) >= 8
    return {
        "doc_d": doc_d,
        "doc_e": doc_e,
        "question": question,
        "d_q": doc_d + question,
        "e_q": doc_e + question,
        "d2_other": doc_d[:512] + other,  # shares exactly D's first two chunks
    }


def _query(name, ids, salt=None):
    return {"name": name, "op": "query", "ids": ids, "salt": salt, "max_tokens": 12}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, run_engine, tiny_model, tiny_variant, prompts) -> dict:
    base = tmp_path_factory.mktemp("stores")
    store = base / "main"
    p = prompts
    model = str(tiny_model)
    results = {}
    results["publisher"] = run_engine(
        {
            "model": model,
            "store_url": f"file://{store}",
            "ops": [
                {"name": "pub_d", "op": "publish", "ids": p["doc_d"]},
                {"name": "pub_e", "op": "publish", "ids": p["doc_e"]},
                {"name": "pub_d_salted", "op": "publish", "ids": p["doc_d"], "salt": "tenant-a"},
                # Same engine, prefix cache on: vLLM keeps D's 5 whole blocks (640
                # tokens) itself; the connector must load only positions 640..699.
                _query("d_q_warm", p["d_q"]),
            ],
        }
    )
    # Damaged copies of the store: a flipped byte in D's middle chunk, E's tail truncated.
    bad = base / "damaged"
    shutil.copytree(store, bad)
    fp = _fingerprint_of(store)
    d_chunks = document_chunks(p["doc_d"], fp, None, 256)
    e_chunks = document_chunks(p["doc_e"], fp, None, 256)
    _flip_byte(bad / chunk_object_key(d_chunks[1].key))
    _truncate(bad / chunk_object_key(e_chunks[2].key))

    cold = {"prefix_caching": False}
    results["reference"] = run_engine(
        {"model": model, "store_url": None, **cold,
         "ops": [_query("d_q", p["d_q"]), _query("d2_other", p["d2_other"]), _query("e_q", p["e_q"])]}
    )
    results["consumer"] = run_engine(
        {
            "model": model, "store_url": f"file://{store}", **cold,
            "ops": [
                _query("d_q", p["d_q"]),
                _query("d2_other", p["d2_other"]),
                _query("e_q", p["e_q"]),
                _query("d_q_other_salt", p["d_q"], salt="tenant-b"),
                _query("d_q_salt_a", p["d_q"], salt="tenant-a"),
                _query("d_q_again", p["d_q"]),  # hot document: whole blocks from the RAM tier
            ],
        }
    )
    results["tail_unloaded"] = run_engine(
        {"model": model, "store_url": f"file://{store}", **cold,
         "extra_config": {"debug_skip_partial_tail": True}, "ops": [_query("d_q", p["d_q"])]}
    )
    results["variant"] = run_engine(
        {"model": str(tiny_variant), "store_url": f"file://{store}", **cold, "ops": [_query("d_q", p["d_q"])]}
    )
    results["damaged"] = run_engine(
        {"model": model, "store_url": f"file://{bad}", **cold,
         "ops": [_query("d_q", p["d_q"]), _query("e_q", p["e_q"])]}
    )
    results["fingerprint"] = fp
    return results


def _fingerprint_of(store: Path) -> str:
    from vllm_kvcdn.artifact import Manifest

    manifest = next((store / "manifests").glob("*.json"))
    return Manifest.from_json(manifest.read_bytes()).fingerprint


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])


def _answer(results, engine, op):
    return results[engine][op]["answer"]


def _counters(results, engine, op):
    return results[engine][op]["counters"]


def test_publish_reports_document(scenario, prompts):
    for op, tokens in (("pub_d", 700), ("pub_e", 600), ("pub_d_salted", 700)):
        report = _answer(scenario, "publisher", op)["kvcdn"]
        assert report["published"] is True
        assert report["num_tokens"] == tokens and report["num_chunks"] == 3
    counters = _counters(scenario, "publisher", "pub_d")
    assert counters.get("vllm:kvcdn_published_chunks") == 3


def test_fresh_engine_hit_is_token_exact_and_skips_prefill(scenario, prompts):
    ref = _answer(scenario, "reference", "d_q")
    got = _answer(scenario, "consumer", "d_q")
    assert got["token_ids"] == ref["token_ids"]
    assert got["logprobs"] == ref["logprobs"]  # bit-equal, not approximately
    counters = _counters(scenario, "consumer", "d_q")
    question = len(prompts["question"])
    # vLLM computed only the question; the whole 700-token document came from the store.
    assert counters[COMPUTED] == question
    assert counters[EXTERNAL_HITS] == 700
    assert counters[BY_SOURCE_EXTERNAL] == 700
    assert counters["vllm:kvcdn_loaded_tokens"] == 700
    assert got["kvcdn"]["loaded_tokens"] == 700 and got["num_cached_tokens"] == 700
    # The reference really computed everything (no cache of any kind).
    assert _counters(scenario, "reference", "d_q")[COMPUTED] == 700 + question


def test_prefix_cache_keeps_whole_blocks_connector_loads_the_rest(scenario, prompts):
    got = _answer(scenario, "publisher", "d_q_warm")
    ref = _answer(scenario, "reference", "d_q")
    assert got["token_ids"] == ref["token_ids"] and got["logprobs"] == ref["logprobs"]
    counters = _counters(scenario, "publisher", "d_q_warm")
    assert counters[EXTERNAL_HITS] == 700 - 640  # the partial block beyond vLLM's 5 whole blocks
    assert counters[COMPUTED] == len(prompts["question"])


def test_hot_document_from_the_ram_tier_is_still_exact(scenario, prompts):
    ref = _answer(scenario, "reference", "d_q")
    got = _answer(scenario, "consumer", "d_q_again")
    assert got["token_ids"] == ref["token_ids"] and got["logprobs"] == ref["logprobs"]
    counters = _counters(scenario, "consumer", "d_q_again")
    assert counters["vllm:kvcdn_ram_tier_hits"] == 3  # two full chunks and the tail's whole block
    assert counters[EXTERNAL_HITS] == 700 and counters[COMPUTED] == len(prompts["question"])
    # The first read of D filled the tier; the prompt sharing D's first two chunks used it.
    assert _counters(scenario, "consumer", "d_q").get("vllm:kvcdn_ram_tier_hits", 0) == 0
    assert _counters(scenario, "consumer", "d2_other")["vllm:kvcdn_ram_tier_hits"] == 2


def test_negative_control_unloaded_tail_is_visible(scenario):
    """With the tail chunk claimed but not written, the answer must differ: the tests can see it."""
    ref = _answer(scenario, "reference", "d_q")
    bad = _answer(scenario, "tail_unloaded", "d_q")
    assert _counters(scenario, "tail_unloaded", "d_q")[EXTERNAL_HITS] == 700
    assert bad["logprobs"] != ref["logprobs"]


def test_shared_first_two_chunks_hit_exactly_those(scenario, prompts):
    got = _answer(scenario, "consumer", "d2_other")
    ref = _answer(scenario, "reference", "d2_other")
    counters = _counters(scenario, "consumer", "d2_other")
    assert counters[EXTERNAL_HITS] == 512
    assert counters[COMPUTED] == len(prompts["d2_other"]) - 512
    assert got["token_ids"] == ref["token_ids"] and got["logprobs"] == ref["logprobs"]


def test_other_salt_never_hits_same_salt_does(scenario):
    other = _counters(scenario, "consumer", "d_q_other_salt")
    assert other.get(EXTERNAL_HITS, 0) == 0
    assert _answer(scenario, "consumer", "d_q_other_salt")["kvcdn"]["hit"] is False
    same = _counters(scenario, "consumer", "d_q_salt_a")
    assert same[EXTERNAL_HITS] == 700
    ref = _answer(scenario, "reference", "d_q")
    assert _answer(scenario, "consumer", "d_q_salt_a")["token_ids"] == ref["token_ids"]


def test_model_differing_in_one_weight_never_hits(scenario):
    counters = _counters(scenario, "variant", "d_q")
    assert counters.get(EXTERNAL_HITS, 0) == 0
    assert counters.get("vllm:kvcdn_matched_requests", 0) == 0
    assert _answer(scenario, "variant", "d_q")["kvcdn"]["hit"] is False


@pytest.mark.parametrize("op,reason", [("d_q", "checksum"), ("e_q", "truncated")])
def test_damaged_chunk_is_a_counted_miss_with_a_correct_answer(scenario, op, reason):
    got = _answer(scenario, "damaged", op)
    ref = _answer(scenario, "reference", op)
    assert got["token_ids"] == ref["token_ids"] and got["logprobs"] == ref["logprobs"]
    counters = _counters(scenario, "damaged", op)
    assert counters[f"vllm:kvcdn_load_failures{{reason={reason}}}"] == 1
    assert got["kvcdn"]["hit"] is False and got["kvcdn"]["loaded_tokens"] == 0
