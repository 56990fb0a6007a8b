"""``kvcdn demo``: publish a sample document, then answer a question over it twice:
once as a cold prefill, once loading the document's KV from the store."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from vllm_kvcdn.store import default_store_url

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


def demo_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "kvcdn" / "models" / "tiny"


def ensure_tiny_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from vllm_kvcdn.tiny_model import make_model

        print(f"[kvcdn] generating the tiny Qwen3 model (seeded random weights) in {path}")
        make_model(path, "tiny")
    return path


def run_demo(model: str | None = None, store_url: str | None = None, max_tokens: int = 16) -> bool:
    from transformers import AutoTokenizer

    from vllm_kvcdn.offline import engine_counters, generate, make_llm

    model = model or str(ensure_tiny_model(demo_model_dir()))
    store_url = store_url or default_store_url()
    tok = AutoTokenizer.from_pretrained(model)
    doc = tok(SAMPLE_DOCUMENT).input_ids
    question = tok(QUESTION).input_ids
    print(f"[kvcdn] model {model}\n[kvcdn] store {store_url}\n[kvcdn] starting vLLM with KVCDNConnector ...")
    # vLLM's own prefix cache off: every hit below must come from the kvcdn store.
    llm = make_llm(model, store_url=store_url, enable_prefix_caching=False)

    started = time.perf_counter()
    pub = generate(llm, doc, publish=True, title=SAMPLE_TITLE)
    report = pub.kvcdn
    print(f"\n[kvcdn] published {SAMPLE_TITLE!r}: {report.get('num_tokens')} tokens, "
          f"{report.get('num_chunks')} chunks, document {str(report.get('document'))[:16]} "
          f"({time.perf_counter() - started:.2f}s)")

    runs = {}
    # A salt nothing was published under makes the connector miss: a cold prefill on
    # the very same engine, the reference the hit must equal.
    for label, salt in (("cold prefill", f"demo-cold-{uuid.uuid4().hex}"), ("kvcdn hit", None)):
        before = engine_counters(llm)
        t0 = time.perf_counter()
        answer = generate(llm, doc + question, max_tokens=max_tokens, cache_salt=salt)
        elapsed = time.perf_counter() - t0
        after = engine_counters(llm)
        computed = after.get("vllm:request_prefill_kv_computed_tokens", 0) - before.get(
            "vllm:request_prefill_kv_computed_tokens", 0)
        loaded = answer.kvcdn.get("loaded_tokens", 0)
        runs[label] = answer
        print(f"[kvcdn] {label:>12}: {int(computed):>4} prompt tokens computed, {loaded:>4} loaded "
              f"from the store, {elapsed:.3f}s -> {answer.text!r}")

    same = runs["cold prefill"].token_ids == runs["kvcdn hit"].token_ids
    exact = same and runs["cold prefill"].logprobs == runs["kvcdn hit"].logprobs
    hit = runs["kvcdn hit"].kvcdn.get("hit", False)
    print(f"\n[kvcdn] cache hit: {'yes' if hit else 'NO'}; identical greedy tokens: {'yes' if same else 'NO'}; "
          f"identical logprobs: {'yes' if exact else 'NO'}")
    print(f"[kvcdn] try: kvcdn ls --store {store_url}")
    if not (hit and exact):
        raise SystemExit("kvcdn demo: the hit was missing or not exact (see the log above)")
    return True
