"""The list of vLLM settings that can change a KV byte (connector/kv_settings.py), checked
against vLLM's own configs: every setting the list puts in the fingerprint changes it (and
``fingerprint_diff`` names the field the list says), every one it says has no effect leaves
it alone, and every refusal it lists is what the connector says at start. Configs are
vLLM 0.32's own (``EngineArgs.create_engine_config``, no engine started)."""

from __future__ import annotations

import pytest

from tests.rigs import REPO
from vllm_kvcdn.artifact.fingerprint import fingerprint_diff
from vllm_kvcdn.connector.kv_settings import (
    FINGERPRINT,
    KV_SETTINGS,
    NO_EFFECT,
    REFUSED,
    SERVED_PLAIN,
    engine_refusal,
    kv_groups_refusal,
)

KV = {"kv_connector": "KVCDNConnector", "kv_role": "kv_both"}

# A row of KV_SETTINGS -> engine arguments that change that setting.
FINGERPRINT_VARIANTS = {
    "--dtype": {"dtype": "float16"},
    "--quantization": {"quantization": "fp8"},
    "--kv-cache-dtype": {"kv_cache_dtype": "fp8"},
    "config.json, --hf-overrides": {"hf_overrides": {"rms_norm_eps": 1e-5}},
    "--enforce-eager, -O, --compilation-config": {"enforce_eager": False},
    "--attention-backend": {"attention_backend": "CPU_ATTN"},
    "--model-impl": {"model_impl": "transformers"},
    "--max-num-batched-tokens, --enable-chunked-prefill, --long-prefill-token-threshold":
        {"max_num_batched_tokens": 1024},
    "--max-model-len": {"max_model_len": 2048},
    "--tensor-parallel-size": {"tensor_parallel_size": 2},
    "--enable-lora, --max-lora-rank, --lora-dtype, --fully-sharded-loras": {"enable_lora": True, "max_lora_rank": 8},
}
# Fingerprint rows checked elsewhere, and where.
CHECKED_ELSEWHERE = {
    "--model (weights)": "test_fingerprint.py: one changed weight",
    "--revision": "a local model's own files are hashed (test_fingerprint.py); a hub name keeps its revision",
    "device, CPU ISA, OpenMP threads, L2 size; GPU model, VLLM_BATCH_INVARIANT": "test_fingerprint.py",
    "vLLM and torch versions": "test_versions_are_in_the_fingerprint below",
}
NO_EFFECT_VARIANTS = {
    "--tokenizer": {"tokenizer": "{variant}"},  # another directory's tokenizer files
    "speculative decoding with n-gram or suffix proposers":
        {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
    "--seed, sampling parameters, --max-num-seqs": {"seed": 5, "max_num_seqs": 8},
}
REFUSED_AT_START = {
    "--speculative-config with a draft model (eagle, eagle3, mtp, draft_model, ...)":
        ({"speculative_config": {"method": "draft_model", "model": "{model}", "num_speculative_tokens": 2}},
         "'draft_model' keeps a KV cache for its draft layers"),
    "--pipeline-parallel-size, context parallelism > 1":
        ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size 1"),
    "--kv-cache-dtype fp8*": ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype auto"),
    "--runner pooling": ({"runner": "pooling"}, "generative models"),
}
# Requests served without kvcdn, and where they are checked.
SERVED_PLAIN_CHECKED = {
    "multimodal inputs (images, audio, video)": "test_request_profile.py",
    "prompt embeddings (--enable-prompt-embeds)": "test_request_profile.py, test_vllm_features.py",
    "LoRA adapter whose files are not on this machine, or loaded by tensorizer": "test_request_profile.py",
    "pooling requests": "test_request_profile.py",
}
# Refusals not made from engine arguments here, and where they are checked.
REFUSED_ELSEWHERE = {
    "hybrid KV cache groups (Mamba/linear attention, MLA, all-sliding-window, cross-attention)":
        "test_kv_cache_groups_are_checked below",
    "--enable-sleep-mode": "vLLM 0.32 refuses sleep mode on CPU itself; tests/rigs/vllm_contract.py (0.33's hook)",
}


@pytest.fixture(scope="module")
def config_of(tiny_model, tiny_variant, tmp_path_factory):
    import os

    os.environ.setdefault("KVCDN_DIGEST_CACHE", str(tmp_path_factory.mktemp("digests") / "digests.json"))
    from vllm.engine.arg_utils import EngineArgs

    def make(**kw):
        args = {"model": str(tiny_model), "enforce_eager": True, "max_model_len": 4096, "kv_transfer_config": KV}
        args.update({k: _fill(v, model=str(tiny_model), variant=str(tiny_variant)) for k, v in kw.items()})
        return EngineArgs(**args).create_engine_config()

    return make


def _fill(value, **paths):
    if isinstance(value, dict):
        return {k: _fill(v, **paths) for k, v in value.items()}
    return value.format(**paths) if isinstance(value, str) else value


def _fingerprint(config):
    from vllm_kvcdn.compat import vllm_fingerprint

    return vllm_fingerprint(config)


def test_every_row_is_checked():
    rows = {row.setting: row.where for row in KV_SETTINGS}
    assert {s for s, w in rows.items() if w == FINGERPRINT} == set(FINGERPRINT_VARIANTS) | set(CHECKED_ELSEWHERE)
    assert {s for s, w in rows.items() if w == NO_EFFECT} == set(NO_EFFECT_VARIANTS)
    assert {s for s, w in rows.items() if w == REFUSED} == set(REFUSED_AT_START) | set(REFUSED_ELSEWHERE)
    assert {s for s, w in rows.items() if w == SERVED_PLAIN} == set(SERVED_PLAIN_CHECKED)


def test_the_readme_holds_the_table():

    from vllm_kvcdn.connector.kv_settings import markdown_table

    assert markdown_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("setting", sorted(FINGERPRINT_VARIANTS))
def test_a_setting_in_the_fingerprint_changes_it(config_of, setting, monkeypatch):
    (row,) = [r for r in KV_SETTINGS if r.setting == setting]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's CPU backend binds one core per rank
    base, changed = _fingerprint(config_of()), _fingerprint(config_of(**FINGERPRINT_VARIANTS[setting]))
    assert changed.digest != base.digest
    named = [line.split(":")[0] for line in fingerprint_diff(base.fields, changed.fields)]
    fields = [f.strip() for f in row.field.split(",")]
    assert any(n == f or n.startswith(f + ".") for n in named for f in fields), (named, row.field)


@pytest.mark.parametrize("setting", sorted(NO_EFFECT_VARIANTS))
def test_a_setting_without_effect_leaves_the_fingerprint(config_of, setting):
    assert _fingerprint(config_of(**NO_EFFECT_VARIANTS[setting])).digest == _fingerprint(config_of()).digest


def test_versions_are_in_the_fingerprint(config_of, monkeypatch):
    import vllm

    base, installed = _fingerprint(config_of()), vllm.__version__
    monkeypatch.setattr(vllm, "__version__", installed + ".post1")
    assert fingerprint_diff(base.fields, _fingerprint(config_of()).fields) == \
        [f"runtime.vllm: {installed!r} vs {installed + '.post1'!r}"]


@pytest.mark.parametrize("setting", sorted(REFUSED_AT_START))
def test_a_refused_setting_is_refused_at_start_with_the_way_out(config_of, setting, monkeypatch):
    args, message = REFUSED_AT_START[setting]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's CPU backend binds one core per rank
    assert message in engine_refusal(config_of(**args))
    assert engine_refusal(config_of()) is None


def _groups(*specs):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec([f"model.layers.{i}.attn"], s) for i, s in enumerate(specs)])


def test_kv_cache_groups_are_checked():
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec, SlidingWindowSpec

    shape = {"block_size": 16, "num_kv_heads": 2, "head_size": 64, "dtype": torch.bfloat16}
    full, window = FullAttentionSpec(**shape), SlidingWindowSpec(**shape, sliding_window=128)
    assert kv_groups_refusal(_groups(full)) is None
    # What vLLM makes of a sliding + full model when its hybrid manager is off (ours):
    assert kv_groups_refusal(_groups(FullAttentionSpec(**shape, sliding_window=128))) is None
    assert "2 groups" in kv_groups_refusal(_groups(full, window))
    assert "--disable-sliding-window" in kv_groups_refusal(_groups(window))
    assert "MLAAttentionSpec" in kv_groups_refusal(_groups(MLAAttentionSpec(**{**shape, "num_kv_heads": 1})))
    mamba = MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.float32,))
    assert "MambaSpec" in kv_groups_refusal(_groups(mamba))


def test_layers_are_ordered_by_index_and_a_second_layer_0_is_refused():
    from vllm_kvcdn.connector.geometry import layers_in_order

    names = {f"model.layers.{i}.self_attn.attn": None for i in (2, 0, 1)}
    assert layers_in_order(names) == [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    with pytest.raises(ValueError, match="both layer 0"):
        layers_in_order({**names, "drafter.model.layers.0.self_attn.attn": None})
    with pytest.raises(ValueError, match="not 0..1"):
        layers_in_order({"model.layers.0.attn": None, "model.layers.2.attn": None})
