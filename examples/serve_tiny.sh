#!/usr/bin/env bash
# Serve the generated tiny model with kvcdn on this CPU box (small KV cache, eager mode).
set -euo pipefail
MODEL=${MODEL:-$HOME/.cache/kvcdn/models/tiny}
[ -f "$MODEL/config.json" ] || kvcdn make-tiny-model "$MODEL"
eval "$(python -m vllm_kvcdn.defaults cpu-env)"  # a small KV cache; your own values win
exec kvcdn serve "$MODEL" --port "${PORT:-8000}" --max-model-len 4096 --enforce-eager \
    --gpu-memory-utilization 0.3 --publisher-key "${KVCDN_PUBLISHER_KEY:-secret}" "$@"
