"""Offline (``vllm.LLM``) helpers: build an engine with the connector, publish, query.

Used by the demo, the tests and the benchmarks. Scripts that call these must guard
their entry point with ``if __name__ == "__main__":`` (vLLM starts processes).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from vllm_kvcdn.connector.wire import (
    WAIT_PROMPT,
    as_transfer_params,
    grant_params,
    merge_waited,
    pending_wait,
    publish_params,
    report_of,
    verify_params,
    wait_params,
)
from vllm_kvcdn.defaults import DEFAULT_CHUNK_SIZE, set_cpu_env

# Offline engines publish through their own requests: each process is its own publisher.
PUBLISH_KEY = secrets.token_urlsafe(16)


def kv_transfer_config(store_url: str, chunk_size: int = DEFAULT_CHUNK_SIZE, **extra: Any) -> dict:
    return {
        "kv_connector": "KVCDNConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store_url": store_url, "chunk_size": chunk_size, "publish_key": PUBLISH_KEY,
                                      **extra},
    }


def make_llm(
    model: str,
    *,
    store_url: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_config: dict | None = None,
    enforce_eager: bool = True,
    max_model_len: int = 4096,
    enable_prefix_caching: bool = True,
    **kwargs: Any,
):
    """A ``vllm.LLM``; with ``store_url`` it runs the kvcdn connector, else none."""
    set_cpu_env()
    from vllm import LLM

    if store_url is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(store_url, chunk_size, **(extra_config or {}))
    return LLM(
        model=model,
        enforce_eager=enforce_eager,
        max_model_len=max_model_len,
        enable_prefix_caching=enable_prefix_caching,
        gpu_memory_utilization=kwargs.pop("gpu_memory_utilization", 0.3),
        disable_log_stats=kwargs.pop("disable_log_stats", False),
        **kwargs,
    )


@dataclass
class Answer:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # logprob of each generated token
    kvcdn: dict  # what the connector reported (kv_transfer_params["kvcdn"])
    num_cached_tokens: int  # vLLM's own count of prompt tokens not computed


def request(prompt_ids: list[int], *, max_tokens: int = 16, publish: bool = False, verify: str | None = None,
            wait_for: str | None = None, cache_salt: str | None = None, title: str = "",
            metadata: dict | None = None, key: str | None = PUBLISH_KEY, embeds=None, private: bool = False,
            require_grant: bool = False, grant: str | None = None):
    """(prompt, sampling params) of one greedy request: a query, a publish, a verify of
    the document ``verify`` (recompute ``prompt_ids`` and compare with the store), or a
    wait for the result of the last publish or verify of ``wait_for``; all but a query
    carry the publisher ``key`` (None: none); a ``private`` publish is sealed, a
    ``require_grant`` one sold by grants; a query may carry a read ``grant``. ``embeds``:
    prompt embeddings (one row per token of ``prompt_ids``) that replace every token's input, the ids kept as vLLM's
    mixed-mode placeholders (``EmbedsPrompt.prompt_is_token_ids`` all false)."""
    from vllm import SamplingParams
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    extra = {}
    if publish or verify or wait_for:
        if wait_for:
            kvcdn = wait_params(wait_for, key)
        elif verify:
            kvcdn = verify_params(verify, key)
        else:
            kvcdn = publish_params(key, title, metadata, private, require_grant)
        extra["kv_transfer_params"] = as_transfer_params(kvcdn)
        max_tokens = 1
    elif grant is not None:
        extra["kv_transfer_params"] = as_transfer_params(grant_params(grant))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, extra_args=extra or None)
    if embeds is not None:
        prompt = EmbedsPrompt(prompt_embeds=embeds, prompt_token_ids=list(prompt_ids),
                              prompt_is_token_ids=[False] * len(prompt_ids))
    else:
        prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
    if cache_salt:
        prompt["cache_salt"] = cache_salt
    return prompt, params


def generate_many(llm, requests: list[tuple], loras: list | None = None) -> list[Answer]:
    """Submit ``request(...)`` results together (they may share engine steps), each with
    its ``loras`` entry (a ``LoRARequest`` or None), if given. A publish or verify answers
    once its result is back (the worker writes in the background)."""
    outputs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False, lora_request=loras)
    answers = [_answer(out) for out in outputs]
    waits = {i: pending_wait(a.kvcdn, _publish_key(requests[i][1])) for i, a in enumerate(answers)}
    waits = {i: wait for i, wait in waits.items() if wait is not None}
    if waits:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results = llm.generate([TokensPrompt(prompt_token_ids=WAIT_PROMPT)] * len(waits),
                               [SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": as_transfer_params(w)})
                                for w in waits.values()], use_tqdm=False)
        for i, out in zip(waits, results):
            answers[i].kvcdn = merge_waited(answers[i].kvcdn, _answer(out).kvcdn)
    return answers


def _publish_key(params) -> str | None:
    return report_of((params.extra_args or {}).get("kv_transfer_params")).get("key")


def generate(llm, prompt_ids: list[int], lora=None, **kw) -> Answer:
    """One request alone, with the LoRA adapter ``lora`` if given (see ``request`` for
    the other keywords)."""
    return generate_many(llm, [request(prompt_ids, **kw)], [lora] if lora is not None else None)[0]


def _answer(out) -> Answer:
    comp = out.outputs[0]
    logprobs = [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs or [])]
    return Answer(
        token_ids=list(comp.token_ids),
        text=comp.text,
        logprobs=logprobs,
        kvcdn=report_of(out.kv_transfer_params),
        num_cached_tokens=out.num_cached_tokens or 0,
    )


def engine_counters(llm) -> dict[str, float]:
    """vLLM's own prefill counters (summed over labels) from the engine's metrics."""
    wanted = (
        "vllm:prompt_tokens_by_source",
        "vllm:request_prefill_kv_computed_tokens",
        "vllm:external_prefix_cache_hits",
        "vllm:external_prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:kvcdn_",
    )
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith(wanted):
            continue
        labels = getattr(metric, "labels", {}) or {}
        key = metric.name
        if "source" in labels:
            key += f"{{source={labels['source']}}}"
        if "reason" in labels:
            key += f"{{reason={labels['reason']}}}"
        value = getattr(metric, "value", None)
        if value is None:  # histogram: keep its sum
            value = getattr(metric, "sum", 0.0)
        out[key] = out.get(key, 0.0) + value
    return out


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
