#!/usr/bin/env bash
# Run the whole test suite (unit tests, then real vLLM engines with the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(.venv/bin/python -m vllm_kvcdn.defaults cpu-env)"  # small CPU engines, one thread setup for all
exec .venv/bin/python -m pytest -q -ra --durations=25 -p no:cacheprovider "$@"  # the slowest: where CI time goes
