"""The vLLM features providers turn on, on the real CPU engine with the tiny models: LoRA
adapters, prompt embeddings, n-gram speculative decoding, a hybrid sliding-window model,
and a draft-model speculator refused at start.

Each answer is compared with the same engine computing the same request itself (same
thread setup, the connector present): a cold prefill under a salt of its own where kvcdn
must not load (bit-equal: one pass either way), and vLLM's own prefix cache holding the
document (a salt of its own: our keys then differ) where kvcdn loads it (level 2 of README
"Exactness": bit-equal). Documents are 512 tokens, whole 128-token blocks, so vLLM's cache
and ours cover the same span. Every load is read from vLLM's own counters."""

from __future__ import annotations

from functools import partial

import pytest

from tests.rigs.documents import COMPUTED, EXTERNAL, document, query
from vllm_kvcdn.testing.exactness import identical

DOC_TOKENS = 512
QUESTION = " Question: which river runs past the stone city in winter? Answer:"


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    question = tokenizer(QUESTION).input_ids
    docs = {"d1": document(tokenizer, 0, DOC_TOKENS), "d2": document(tokenizer, 400, DOC_TOKENS)}
    return {**docs, **{f"{name}_q": ids + question for name, ids in docs.items()}}


_query = partial(query, max_tokens=12)


def _level2(doc, prompt, **kw):
    """vLLM's own prefix cache holding ``doc`` (computed alone), then ``prompt``."""
    return [_query("apc_warm", doc, salt="apc", **{**kw, "max_tokens": 1}), _query("apc", prompt, salt="apc", **kw)]


@pytest.fixture(scope="module")
def lora_run(run_engine, tiny_model, adapters, prompts, tmp_path_factory) -> dict:
    p = prompts
    store = tmp_path_factory.mktemp("lora-store")
    embeds = {"seed": 7, "scale": 0.5}
    return run_engine({
        "model": str(tiny_model), "store_url": f"file://{store}", "prefix_caching": True,
        "engine_args": {"enable_lora": True, "max_lora_rank": 8, "enable_prompt_embeds": True},
        "loras": {name: str(path) for name, path in adapters.items()},
        "ops": [
            # A base document, and a request for adapter a over it.
            _query("cold_a", p["d1_q"], lora="a", salt="cold-a"),
            {"name": "pub_base", "op": "publish", "ids": p["d1"]},
            {"name": "reset1", "op": "reset"},
            _query("a_over_base", p["d1_q"], lora="a"),
            # A document published through adapter a, and a base request over it.
            _query("cold_base", p["d2_q"], salt="cold-base"),
            {"name": "pub_a", "op": "publish", "ids": p["d2"], "lora": "a"},
            {"name": "reset2", "op": "reset"},
            _query("base_over_a", p["d2_q"]),
            # The same adapter hits it; so does the same adapter under another name.
            _query("a_hit", p["d2_q"], lora="a"),
            *_level2(p["d2"], p["d2_q"], lora="a"),
            {"name": "reset3", "op": "reset"},
            _query("copy_hit", p["d2_q"], lora="a-copy"),
            _query("b_over_a", p["d2_q"], lora="b"),
            {"name": "verify_a", "op": "verify", "ids": p["d2"], "doc": "@pub_a", "lora": "a"},
            # Prompt embeddings whose placeholder ids are the base document's tokens.
            _query("embeds_cold", p["d1_q"], embeds=embeds, salt="cold-embeds"),
            {"name": "reset4", "op": "reset"},
            _query("embeds", p["d1_q"], embeds=embeds),
        ],
    })


def _answer(run, op) -> dict:
    return run[op]["answer"]


def _loaded(run, op) -> float:
    return run[op]["counters"].get(EXTERNAL, 0.0)


def test_an_adapter_request_never_loads_a_base_document(lora_run):
    got, cold = _answer(lora_run, "a_over_base"), _answer(lora_run, "cold_a")
    assert got["kvcdn"]["hit"] is False and _loaded(lora_run, "a_over_base") == 0
    assert identical(got, cold)  # computed as if nothing were published


def test_a_base_request_never_loads_an_adapter_document(lora_run):
    published, base = _answer(lora_run, "pub_a")["kvcdn"], _answer(lora_run, "pub_base")["kvcdn"]
    assert published["published"] is True and published["document"] != base["document"]
    got = _answer(lora_run, "base_over_a")
    assert got["kvcdn"]["hit"] is False and _loaded(lora_run, "base_over_a") == 0
    assert identical(got, _answer(lora_run, "cold_base"))


def test_an_adapter_document_hits_its_adapter_exactly(lora_run, prompts):
    got = _answer(lora_run, "a_hit")
    assert got["kvcdn"]["hit"] is True and got["kvcdn"]["document"] == _answer(lora_run, "pub_a")["kvcdn"]["document"]
    assert _loaded(lora_run, "a_hit") == DOC_TOKENS  # only the question is computed:
    assert lora_run["a_hit"]["counters"][COMPUTED] == len(prompts["d2_q"]) - DOC_TOKENS
    assert lora_run["apc"]["counters"]["vllm:prefix_cache_hits"] == DOC_TOKENS  # vLLM's own cache held it
    assert identical(got, _answer(lora_run, "apc"))  # level 2
    assert _answer(lora_run, "verify_a")["kvcdn"]["identical"] is True  # level 1, recomputed with the adapter


def test_an_adapter_is_matched_by_its_files(lora_run):
    copy = _answer(lora_run, "copy_hit")
    assert copy["kvcdn"]["hit"] is True and _loaded(lora_run, "copy_hit") == DOC_TOKENS
    assert identical(copy, _answer(lora_run, "a_hit"))
    other = _answer(lora_run, "b_over_a")
    assert other["kvcdn"]["hit"] is False and _loaded(lora_run, "b_over_a") == 0


def test_prompt_embeddings_are_served_without_kvcdn(lora_run):
    got, cold = _answer(lora_run, "embeds"), _answer(lora_run, "embeds_cold")
    assert got["kvcdn"]["hit"] is False and _loaded(lora_run, "embeds") == 0
    assert identical(got, cold)
    assert lora_run["embeds"]["counters"]["vllm:kvcdn_unsupported_requests{reason=prompt_embeds}"] == 1


@pytest.fixture(scope="module")
def single_feature_runs(run_engine, tiny_model, hybrid_model, prompts, tmp_path_factory) -> dict:
    p = prompts
    runs = {}
    for name, model, args in (
        ("ngram", tiny_model, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2}}),
        ("hybrid", hybrid_model, {}),
    ):
        store = tmp_path_factory.mktemp(f"{name}-store")
        runs[name] = run_engine({
            "model": str(model), "store_url": f"file://{store}", "prefix_caching": True, "engine_args": args,
            "ops": [
                {"name": "pub", "op": "publish", "ids": p["d1"]},
                {"name": "reset", "op": "reset"},
                _query("hit", p["d1_q"], max_tokens=24),
                *_level2(p["d1"], p["d1_q"], max_tokens=24),
                {"name": "verify", "op": "verify", "ids": p["d1"], "doc": "@pub"},
            ],
        })
    return runs


@pytest.mark.parametrize("name", ["ngram", "hybrid"])
def test_a_hit_is_exact_under_speculation_and_sliding_windows(single_feature_runs, name):
    """n-gram speculative decoding (no draft KV) and a model whose layers alternate a
    128-token sliding window and full attention (vLLM runs it as one full-attention group
    beside this connector): a hit equals vLLM's own cache bit for bit."""
    run = single_feature_runs[name]
    got = _answer(run, "hit")
    assert got["kvcdn"]["hit"] is True and _loaded(run, "hit") == DOC_TOKENS
    assert identical(got, _answer(run, "apc"))
    assert _answer(run, "verify")["kvcdn"]["identical"] is True


def test_a_draft_model_speculator_is_refused_at_start(run_engine, tiny_model, tmp_path):
    with pytest.raises(RuntimeError) as failed:
        run_engine({"model": str(tiny_model), "store_url": f"file://{tmp_path / 'store'}",
                    "engine_args": {"speculative_config": {"method": "draft_model", "model": str(tiny_model),
                                                           "num_speculative_tokens": 2}},
                    "ops": []})
    assert "kvcdn: speculative decoding method 'draft_model' keeps a KV cache for its draft layers" in str(failed.value)
