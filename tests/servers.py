"""Real OpenAI-compatible servers on loopback for the HTTP tests."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvcdn.defaults import CPU_ENGINE_ENV
from vllm_kvcdn.serve import kv_transfer_config
from vllm_kvcdn.server_process import Server

SERVER_ENV = CPU_ENGINE_ENV
COMMON_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--gpu-memory-utilization", "0.3",
               "--no-enable-prefix-caching", "--max-logprobs", "5"]


def vllm_server(model: Path, log: Path) -> Server:
    """Plain vLLM, no connector: the reference."""
    return Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--enable-prompt-tokens-details", *COMMON_ARGS], log, env=SERVER_ENV)


def kvcdn_server(model: Path, store: Path | str, key: str, log: Path, **extra_config) -> Server:
    """`kvcdn serve` on ``store`` (a directory, or a store URL); ``extra_config``: more
    connector settings (kv_connector_extra_config)."""
    kvcdn = Path(sys.executable).with_name("kvcdn")
    url = f"file://{store}" if isinstance(store, Path) else store
    config = []
    if extra_config:
        transfer = kv_transfer_config(url, None, None)
        transfer["kv_connector_extra_config"].update(extra_config)
        config = ["--kv-transfer-config", json.dumps(transfer)]
    return Server([str(kvcdn), "serve", str(model), "--kvcdn-store", url, *config, *COMMON_ARGS], log,
                  env={**SERVER_ENV, "KVCDN_PUBLISHER_KEY": key})


def start_all(*servers: Server) -> None:
    """Start servers side by side (an engine takes ~30 s to come up)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(), servers))


def ask(url: str, model: str, messages: list[dict]) -> dict:
    """A greedy chat completion through the official client, with what it says of the cache."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=5)
    choice = resp.choices[0]
    return {
        "text": choice.message.content,
        "tokens": [t.token for t in choice.logprobs.content],
        "logprobs": [t.logprob for t in choice.logprobs.content],
        "top": [{top.token: top.logprob for top in t.top_logprobs} for t in choice.logprobs.content],
        "cached": resp.usage.prompt_tokens_details.cached_tokens or 0,
        "prompt_tokens": resp.usage.prompt_tokens,
        "kvcdn": (resp.model_extra.get("kv_transfer_params") or {}).get("kvcdn", {}),
    }
