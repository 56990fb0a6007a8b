"""``kvcdn serve MODEL [vLLM args]``: vLLM's OpenAI server with KVCDNConnector and /kvcdn/v1.

Every vLLM flag passes through untouched; we only add what is missing: the connector's
``--kv-transfer-config`` (from our flags or a preset), ``--enable-prompt-tokens-details``
(so clients see ``usage.prompt_tokens_details.cached_tokens``) and the plugin allowlist
that makes vLLM mount the side API.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from vllm_kvcdn.api.plugin import PLUGIN_NAME
from vllm_kvcdn.config import PUBLISHER_KEY_ENV
from vllm_kvcdn.defaults import default_store_url

GENERAL_PLUGIN_NAME = "kvcdn"  # the vllm.general_plugins entry point (registers the connector)


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def kv_transfer_config(store_url: str | None, chunk_size: int | None, preset: str | None) -> dict:
    config = json.loads(Path(preset).read_text()) if preset else {
        "kv_connector": "KVCDNConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {},
    }
    extra = config.setdefault("kv_connector_extra_config", {})
    if store_url or "store_url" not in extra:
        extra["store_url"] = store_url or default_store_url()
    if chunk_size:
        extra["chunk_size"] = chunk_size
    return config


def plugin_allowlist(current: str | None) -> str:
    names = [n for n in (current or "").split(",") if n]
    for name in (GENERAL_PLUGIN_NAME, PLUGIN_NAME):
        if name not in names:
            names.append(name)
    return ",".join(names)


def build_command(model: str, vllm_args: list[str], *, store_url=None, chunk_size=None, preset=None,
                  publisher_key=None, environ=None) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, env, generated key or None) for vLLM's API server."""
    env = dict(os.environ if environ is None else environ)
    args = list(vllm_args)
    if not _has_flag(args, "--kv-transfer-config"):
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config(store_url, chunk_size, preset))]
    if not _has_flag(args, "--enable-prompt-tokens-details"):
        args.append("--enable-prompt-tokens-details")
    env["VLLM_PLUGINS"] = plugin_allowlist(env.get("VLLM_PLUGINS"))
    generated = None
    if publisher_key:
        env[PUBLISHER_KEY_ENV] = publisher_key
    elif not env.get(PUBLISHER_KEY_ENV):
        generated = env[PUBLISHER_KEY_ENV] = secrets.token_urlsafe(24)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    return argv, env, generated


def serve(model: str, vllm_args: list[str], **kw) -> None:
    argv, env, generated = build_command(model, vllm_args, **kw)
    if generated:
        print(f"[kvcdn] publisher key (set {PUBLISHER_KEY_ENV} or --publisher-key to choose one): {generated}",
              file=sys.stderr, flush=True)
    print(f"[kvcdn] exec {' '.join(argv[:6])} ...", file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)  # vLLM owns the process from here: signals go straight to it
