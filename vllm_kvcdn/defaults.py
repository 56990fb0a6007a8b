"""kvcdn's defaults and environment variables, each defined once.

    python -m vllm_kvcdn.defaults cpu-env   # shell exports for a small CPU engine

Imports nothing heavy: the CLI, the store and the connector all read from here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

STORE_ENV = "KVCDN_STORE"  # the store URL when none is given
PUBLISHER_KEY_ENV = "KVCDN_PUBLISHER_KEY"  # `kvcdn serve` sets it for the side API and the engine
DIGEST_CACHE_ENV = "KVCDN_DIGEST_CACHE"  # where weight digests are cached (fingerprint.py)
SIGNING_KEY_ENV = "KVCDN_SIGNING_KEY"  # the publisher's Ed25519 key file when none is configured
TENANT_KEY_ENV = "KVCDN_TENANT_KEY"  # a tenant key file (private documents) when none is configured
LEDGER_ENV = "KVCDN_LEDGER"  # the metering ledger's file when none is configured ("" or "off": none)
DEFAULT_CHUNK_SIZE = 256  # tokens per chunk: a multiple of the engine's KV block size
TEST_FAULTS_ENV = "KVCDN_TEST_FAULTS"  # tests only: faults to inject (config.injected_faults)
ENVIRONMENT = {  # every variable kvcdn reads, for the README's table (config.settings_markdown)
    STORE_ENV: "the store URL where `store_url` is not set (`kvcdn` commands, the connector, the side API)",
    PUBLISHER_KEY_ENV: "the publisher key where `publish_key` is not set (`kvcdn serve` sets it for the side API "
                       "and the engine)",
    SIGNING_KEY_ENV: "the signing key file where `signing_key` is not set (`kvcdn keygen` makes one)",
    TENANT_KEY_ENV: "a tenant key file where `tenant_keys` is not set (`kvcdn keygen --tenant` makes one)",
    LEDGER_ENV: "the ledger file where `ledger_path` is not set (`\"\"` or `off`: no ledger)",
    DIGEST_CACHE_ENV: "where weight digests are cached (default `~/.cache/kvcdn/weight-digests.json`)",
    TEST_FAULTS_ENV: "tests and benchmarks only: faults to inject (`skip_partial_tail`, `chunk_get_delay_s=S`, "
                     "`chunk_get_delay_file=PATH`)",
}

# A small vLLM CPU engine (tests, examples, the demo, benchmarks), with the same thread
# setup whether a connector is configured or not: a kv_transfer_config otherwise makes
# vLLM reserve a core, which changes numerics (DESIGN 4b "Thread trap").
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/kvcdn``, else ``~/.cache/kvcdn``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "kvcdn"


def default_store_url() -> str:
    """``$KVCDN_STORE``, else the cache root as a file store."""
    return os.environ.get(STORE_ENV) or f"file://{cache_root()}"


def disk_tier_dir() -> Path:
    """Where a node keeps its disk tier of a shared store's chunks."""
    return cache_root() / "disk-tier"


def default_ledger_path() -> str:
    """``$KVCDN_LEDGER`` ("off": no ledger), else ``ledger.sqlite3`` in the cache root: a
    server's own file, not the shared store (each node meters the reads it served)."""
    value = os.environ.get(LEDGER_ENV)
    if value is not None:
        return "" if value.strip().lower() in ("", "off") else value
    return str(cache_root() / "ledger.sqlite3")


def digest_cache_path() -> Path:
    return Path(os.environ.get(DIGEST_CACHE_ENV) or cache_root() / "weight-digests.json")


def cpu_engine_env(kvcache_gib: str | None = None, reserved_cpus: int | None = None) -> dict[str, str]:
    """``CPU_ENGINE_ENV`` with a benchmark's own KV cache size or core reservation."""
    env = dict(CPU_ENGINE_ENV)
    if kvcache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gib)
    if reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
    return env


def set_cpu_env() -> None:
    """Apply ``CPU_ENGINE_ENV`` where the environment does not say otherwise."""
    for name, value in CPU_ENGINE_ENV.items():
        os.environ.setdefault(name, value)


def _main(argv: list[str]) -> None:
    if argv != ["cpu-env"]:
        raise SystemExit(f"usage: python -m vllm_kvcdn.defaults cpu-env\n{__doc__}")
    for name, value in CPU_ENGINE_ENV.items():  # the caller's own value wins
        print(f'export {name}="${{{name}:-{value}}}"')


if __name__ == "__main__":
    _main(sys.argv[1:])
