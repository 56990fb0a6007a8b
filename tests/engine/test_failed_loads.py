"""A failed load never leaves blocks a later request can hit (real engines, tiny model).

The reproduction from the field: a published document's first chunk is damaged (a
flipped byte, a truncated file, or the object deleted after the index saw it); a request
for document + question is aborted at several points of its life; then another
question about the same document is asked. Every later answer must be bit-equal to
plain vLLM answering it either cold (nothing of the document kept) or with the
document resident in its own prefix cache (the aborted request's recompute finished
first), and no response may claim a hit.

Engines run in-process (``inproc``) so "abort after k steps" is exact: the engine core
takes one step per ``LLMEngine.step()``. Steps are 0.2 s apart so the background load
(a few KB here) has ended before the next step, as on a busy engine; what is asserted
about stale blocks does not depend on it, only which of the two references applies.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from tests.rigs.documents import EXTERNAL, document, query
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.store.keys import chunk_object_key
from vllm_kvcdn.testing.exactness import identical

DAMAGE = {"flip": "checksum", "truncate": "truncated", "delete": "missing"}  # kind -> failure reason
ABORT_AFTER_STEPS = (0, 1, 2, 3)
DOC_TOKENS = 512  # whole blocks: a resident document is then exactly what a later request reuses
NEW_TOKENS = 12
ENGINE_ARGS = {"max_num_batched_tokens": 2048}  # every prompt here is one prefill step


def _damage(store: Path, key: str, kind: str) -> None:
    path = store / chunk_object_key(key)
    data = bytearray(path.read_bytes())
    if kind == "flip":
        data[-1] ^= 0x01  # the last byte of the KV data: the header still parses
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # deleted by another server after this one's index listed the document
        path.unlink()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    out = {}
    for i, kind in enumerate(DAMAGE):
        doc = document(tokenizer, 3000 + i * 200, DOC_TOKENS)
        out[f"doc_{kind}"] = doc
        out[f"{kind}_aborted"] = doc + tokenizer(" Question: who kept the ledger? Answer:").input_ids
        out[f"{kind}_later"] = doc + tokenizer(" Q: where does the road end? A:").input_ids
    out["doc_prefix"] = document(tokenizer, 3800, DOC_TOKENS)  # its second chunk is damaged
    out["prefix_query"] = out["doc_prefix"] + tokenizer(" Q: which chunk broke? A:").input_ids
    out["doc_intact"] = document(tokenizer, 3600, DOC_TOKENS)
    out["intact_query"] = out["doc_intact"] + tokenizer(" Q: who pays? A:").input_ids
    return out


_query = partial(query, max_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_engine, tiny_model, prompts) -> dict:
    store = tmp_path_factory.mktemp("damaged-store")
    model = str(tiny_model)
    published = run_engine({"model": model, "store_url": f"file://{store}", "engine_args": ENGINE_ARGS,
                            "ops": [{"name": k, "op": "publish", "ids": prompts[f"doc_{k}"]}
                                    for k in [*DAMAGE, "prefix", "intact"]]})
    for kind in DAMAGE:
        report = published[kind]["answer"]["kvcdn"]
        assert report["published"], report
        first = document_chunks(prompts[f"doc_{kind}"], report["fingerprint"], None, 256)[0]
        _damage(store, first.key, kind)
    second = document_chunks(prompts["doc_prefix"], published["prefix"]["answer"]["kvcdn"]["fingerprint"], None, 256)[1]
    _damage(store, second.key, "flip")
    ops = []
    for kind in DAMAGE:
        ops += [{"name": f"reset_{kind}", "op": "reset"},
                _query(f"{kind}_complete", prompts[f"{kind}_aborted"]),
                {"name": f"reset2_{kind}", "op": "reset"}]
        for k in ABORT_AFTER_STEPS:
            ops += [{"name": f"reset_{kind}_{k}", "op": "reset"},
                    {"name": f"{kind}_abort_{k}", "op": "abort", "ids": prompts[f"{kind}_aborted"],
                     "max_tokens": NEW_TOKENS, "after_steps": k, "pause_s": 0.2},
                    _query(f"{kind}_later_{k}", prompts[f"{kind}_later"])]
    ops += [{"name": "reset_prefix", "op": "reset"}, _query("prefix", prompts["prefix_query"])]  # its prefix billed
    ops += [{"name": "reset_intact", "op": "reset"}, _query("intact", prompts["intact_query"])]  # billed
    ledger_path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"
    kvcdn = run_engine({"model": model, "store_url": f"file://{store}", "inproc": True, "engine_args": ENGINE_ARGS,
                        "extra_config": {"ledger_path": str(ledger_path)}, "ops": ops})
    kvcdn["ledger"] = ledger_path
    ref_ops = []
    for kind in DAMAGE:
        ref_ops += [{"name": f"reset_{kind}", "op": "reset"},
                    _query(f"{kind}_cold", prompts[f"{kind}_later"]),
                    {"name": f"reset2_{kind}", "op": "reset"},
                    _query(f"{kind}_first", prompts[f"{kind}_aborted"]),
                    _query(f"{kind}_warm", prompts[f"{kind}_later"])]
    first_chunk = prompts["doc_prefix"][:256]  # vLLM's prefix cache then holds its two blocks
    ref_ops += [{"name": "reset_prefix", "op": "reset"}, _query("prefix_chunk", first_chunk + [13]),
                _query("prefix_resident", prompts["prefix_query"])]
    plain = run_engine({"model": model, "store_url": None, "inproc": True,
                        "engine_args": ENGINE_ARGS, "ops": ref_ops})
    return {"kvcdn": kvcdn, "plain": plain}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_failed_load_is_recomputed_and_never_claimed(runs, kind):
    done = runs["kvcdn"][f"{kind}_complete"]
    report = done["answer"]["kvcdn"]
    assert report["hit"] is False and report["loaded_tokens"] == 0, report
    assert done["counters"].get(f"vllm:kvcdn_load_failures{{reason={DAMAGE[kind]}}}", 0) >= 1, done["counters"]
    # Recomputed from position 0: bit-equal to plain vLLM computing the prompt cold.
    cold_same_prompt = runs["plain"][f"{kind}_first"]["answer"]
    assert identical(done["answer"], cold_same_prompt)


def test_a_load_failing_after_its_first_chunk_serves_and_bills_that_chunk(runs, prompts):
    """The second chunk is damaged: vLLM keeps the first chunk's blocks and recomputes from
    there. The answer is bit-equal to plain vLLM with those 256 tokens in its own prefix
    cache; the response and the ledger name the 256 tokens served."""
    from vllm_kvcdn.market import ledger

    done = runs["kvcdn"]["prefix"]["answer"]
    assert done["kvcdn"]["hit"] is False and done["kvcdn"]["loaded_tokens"] == 256, done["kvcdn"]
    reference = runs["plain"]["prefix_resident"]["answer"]
    assert reference["num_cached_tokens"] == 256
    assert identical(done, reference)
    (row,) = [r for r in ledger.reads(runs["kvcdn"]["ledger"]) if r.document == done["kvcdn"]["document"]]
    assert (row.loaded_tokens, row.computed_tokens) == (256, len(prompts["prefix_query"]) - 256)


def test_failed_loads_are_not_billed(runs):
    """Of every load in the run, only what was served is in the ledger: the intact document,
    and the first chunk of the one damaged after it; nothing of those damaged at the start."""
    from vllm_kvcdn.market import ledger

    intact = runs["kvcdn"]["intact"]["answer"]["kvcdn"]
    prefix = runs["kvcdn"]["prefix"]["answer"]["kvcdn"]
    assert intact["hit"] is True and intact["loaded_tokens"] == DOC_TOKENS, intact
    reads = ledger.reads(runs["kvcdn"]["ledger"])
    assert [(r.document, r.loaded_tokens) for r in reads] == [(prefix["document"], 256),
                                                              (intact["document"], DOC_TOKENS)], reads


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_abort_after_failed_load_leaves_no_stale_blocks(runs, kind):
    cold = runs["plain"][f"{kind}_cold"]["answer"]
    warm = runs["plain"][f"{kind}_warm"]["answer"]
    assert warm["num_cached_tokens"] >= DOC_TOKENS  # the reference really reused the document
    kept = {}
    for k in ABORT_AFTER_STEPS:
        aborted = runs["kvcdn"][f"{kind}_abort_{k}"]
        assert not any((r or {}).get("hit") for r in aborted["reports"]), aborted
        later = runs["kvcdn"][f"{kind}_later_{k}"]
        kept[k] = later["answer"]["num_cached_tokens"]  # vLLM's own count of reused tokens
        assert kept[k] in (0, DOC_TOKENS), (k, kept[k])
        reference = cold if kept[k] == 0 else warm
        assert identical(later["answer"], reference), (k, kept[k], later["answer"], reference)
        assert later["counters"].get(EXTERNAL, 0) == 0, later["counters"]
    # Aborted before its recompute: nothing of the document kept; after it: the document
    # is resident in vLLM's prefix cache, as the recompute (not the failed load) wrote it.
    assert kept[0] == 0 and kept[max(ABORT_AFTER_STEPS)] == DOC_TOKENS, kept
