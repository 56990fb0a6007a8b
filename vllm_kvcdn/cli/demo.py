"""``kvcdn demo``: publish a sample document, answer a question over it as a cold prefill and
as a kvcdn hit, then check the three levels of the exactness contract against plain vLLM.

Two engines, each in a fresh process (their logs go to files): vLLM with KVCDNConnector,
then plain vLLM as the reference. The exit status is non-zero only for a real failure:
no hit, stored bytes that differ from a recompute, a hit that differs from vLLM itself
computing the same spans, or greedy tokens that agree with a cold prefill less well than
vLLM's own prefix cache does (README "Exactness").
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from vllm_kvcdn.defaults import cache_root, default_store_url
from vllm_kvcdn.testing.exactness import agreement, identical, max_logprob_diff

SAMPLE_TITLE = "kvcdn sample document"
SAMPLE_DOCUMENT = """\
A prefill CDN. Agents read the same popular documents again and again: a product manual, a
regulatory filing, a market report, the documentation of a library. Every read runs prefill,
the most expensive step a language model takes, over identical text, only to build a key and
value cache that is identical to the one the previous reader built a moment ago.

The idea is simple. Compute the document's KV cache once, store it as an artifact that names
the exact model, weights, dtype and kernels that produced it, and let every later request that
starts with that document load the cache instead of computing it again. Because attention is
causal, the cache of a prefix does not depend on what follows it, so loading it is exact: the
answer is the same, token for token, and only the question itself is computed.

The artifact is cut into chunks of a fixed number of tokens. Each chunk is named by a hash
chain over token ids, seeded with the model fingerprint and the tenant's cache salt, so a
request finds the longest published prefix of its prompt, and a different model or tenant can
never match by accident. The last chunk of a document is stored even when it is short, so a
hit covers the whole document. Every chunk carries a checksum that is verified before a single
value reaches the engine; a damaged or missing chunk is a miss, and the engine simply computes
those tokens as it always would.
"""
QUESTION = "\nQuestion: why is loading a published prefix exact? Answer:"
COMPUTED = "vllm:request_prefill_kv_computed_tokens"


def demo_model_dir() -> Path:
    return cache_root() / "models" / "tiny"


def ensure_tiny_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from vllm_kvcdn.testing.tiny_model import make_model

        print(f"[kvcdn] generating the tiny Qwen3 model (seeded random weights) in {path}")
        make_model(path, "tiny")
    return path


def run_demo(model: str | None = None, store_url: str | None = None, max_tokens: int = 16) -> bool:
    from transformers import AutoTokenizer

    from vllm_kvcdn.testing.engine_job import run_in_subprocess

    model = model or str(ensure_tiny_model(demo_model_dir()))
    store_url = store_url or default_store_url()
    tok = AutoTokenizer.from_pretrained(model)
    doc = tok(SAMPLE_DOCUMENT).input_ids
    prompt = doc + tok(QUESTION).input_ids
    work = Path(tempfile.mkdtemp(prefix="kvcdn-demo-"))
    started = time.time()
    print(f"[kvcdn] model {model}\n[kvcdn] store {store_url}")

    def query(name, ids=prompt, salt=None, n=max_tokens):
        return {"name": name, "op": "query", "ids": ids, "salt": salt, "max_tokens": n}

    print(f"[kvcdn] engine 1: vLLM with KVCDNConnector, its own prefix cache off (log: {work}/kvcdn.log) ...")
    kv = run_in_subprocess({
        "model": model, "store_url": store_url, "prefix_caching": False,
        "ops": [{"name": "publish", "op": "publish", "ids": doc, "title": SAMPLE_TITLE},
                {"name": "verify", "op": "verify", "ids": doc, "doc": "@publish"},  # recompute, compare
                # A salt nothing was published under: the connector misses, a cold prefill.
                query("cold", salt=f"demo-cold-{uuid.uuid4().hex}"),
                query("hit")],
    }, work, "kvcdn")
    report = kv["publish"]["answer"]["kvcdn"]
    doc_id = report.get("document") or ""
    alone = "computed alone, in one step" if report.get("prefill", {}).get("alone") else "it shared its steps"
    print(f"\n[kvcdn] published {SAMPLE_TITLE!r}: {report.get('num_tokens')} tokens, {report.get('num_chunks')} "
          f"chunks, document {doc_id[:16]} ({alone})")
    for label, name in (("cold", "cold prefill"), ("hit", "kvcdn hit")):
        run, answer = kv[label], kv[label]["answer"]
        print(f"[kvcdn] {name:>12}: {int(run['counters'].get(COMPUTED, 0)):>4} prompt tokens computed, "
              f"{answer['kvcdn'].get('loaded_tokens', 0):>4} loaded from the store, {run['seconds']:.3f}s "
              f"-> {answer['text']!r}")

    print(f"\n[kvcdn] engine 2: plain vLLM, no connector, as the reference (log: {work}/vllm.log) ...")
    # The document computed in a step of its own (a step holds at most its length), then
    # the question: the hit's spans. Then vLLM's prefix cache holding the document.
    ref = run_in_subprocess({
        "model": model, "store_url": None, "prefix_caching": True,
        "engine_args": {"max_num_batched_tokens": len(doc)},
        "ops": [query("doc_step", salt=f"demo-step-{uuid.uuid4().hex}"),
                query("warm", ids=doc, salt="demo-own-cache", n=1),
                query("own_cache", salt="demo-own-cache")],
    }, work, "vllm")
    return _report(kv, ref, store_url, doc_id, len(doc), work, started)


def _report(kv: dict, ref: dict, store_url: str, doc_id: str, doc_tokens: int, work: Path, started: float) -> bool:
    hit, cold, own = kv["hit"]["answer"], kv["cold"]["answer"], ref["own_cache"]["answer"]
    verdict = kv["verify"]["answer"]["kvcdn"]  # the worker's byte-for-byte comparison, in the response
    chunks = verdict.get("chunks", [])
    level1 = verdict.get("verified") is True and verdict.get("identical") is True
    level2 = identical(hit, ref["doc_step"]["answer"])
    agree_hit, agree_own = agreement(hit, cold), agreement(own, cold)
    common, n = min(agree_hit, agree_own), len(cold["token_ids"])
    print(f"\n[kvcdn] level 1, bytes:  the stored KV equals what this engine computes for the document: "
          f"{'yes' if level1 else 'NO'} (recomputed: {sum(c['status'] == 'identical' for c in chunks)} of "
          f"{len(chunks)} chunks identical)")
    print(f"[kvcdn] level 2, engine: the hit equals vLLM itself with the document computed first, in a step "
          f"of its own: {'yes, identical tokens and logprobs' if level2 else 'NO'}")
    print(f"[kvcdn] level 3, cold:   against the cold prefill, the hit agrees on {agree_hit}/{n} greedy tokens "
          f"(max |logprob diff| {max_logprob_diff(hit, cold, common):.3g}); vLLM's own prefix cache: "
          f"{agree_own}/{n} ({max_logprob_diff(own, cold, common):.3g})")
    print("[kvcdn]                  (differences from a cold prefill in the last bits come from vLLM's CPU kernels,"
          "\n[kvcdn]                  which tile work by the computed span; see README \"Exactness\")")
    print(f"[kvcdn] try: kvcdn ls --store {store_url}   ({time.time() - started:.0f}s; engine logs in {work})")
    failures = [what for what, ok in (
        ("no cache hit", hit["kvcdn"].get("hit") and hit["kvcdn"].get("loaded_tokens") == doc_tokens),
        ("the stored bytes differ from a recompute", level1),
        ("the hit differs from vLLM computing the same spans", level2),
        ("the hit agrees with a cold prefill less well than vLLM's own cache", agree_hit >= agree_own),
    ) if not ok]
    if failures:
        raise SystemExit("kvcdn demo: " + "; ".join(failures) + f" (engine logs: {work})")
    print("[kvcdn] the exactness contract holds")
    return True
