"""Real OpenAI-compatible servers on loopback for the HTTP tests."""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_kvcdn.defaults import CPU_ENGINE_ENV
from vllm_kvcdn.server_process import Server

SERVER_ENV = CPU_ENGINE_ENV
COMMON_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--gpu-memory-utilization", "0.3",
               "--no-enable-prefix-caching", "--max-logprobs", "5"]


def vllm_server(model: Path, log: Path) -> Server:
    """Plain vLLM, no connector: the reference."""
    return Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--enable-prompt-tokens-details", *COMMON_ARGS], log, env=SERVER_ENV)


def kvcdn_server(model: Path, store: Path, key: str, log: Path) -> Server:
    kvcdn = Path(sys.executable).with_name("kvcdn")
    return Server([str(kvcdn), "serve", str(model), "--kvcdn-store", f"file://{store}", *COMMON_ARGS], log,
                  env={**SERVER_ENV, "KVCDN_PUBLISHER_KEY": key})
