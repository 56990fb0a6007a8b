#!/usr/bin/env bash
# Run the whole test suite (unit tests, then real vLLM engines with the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
exec .venv/bin/python -m pytest -q -ra -p no:cacheprovider "$@"
