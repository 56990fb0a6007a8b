"""Fingerprints: one changed weight, dtype or compute profile gives another digest."""

import os

import pytest

from vllm_kvcdn.artifact.fingerprint import (
    Fingerprint,
    architecture_fields,
    cpu_kernels,
    fingerprint_diff,
    weights_digest,
)


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCDN_DIGEST_CACHE", str(tmp_path / "digests.json"))


def test_one_changed_weight_changes_the_fingerprint(tiny_model, tiny_variant):
    a, b = weights_digest(tiny_model), weights_digest(tiny_variant)
    assert a != b
    fa = Fingerprint.build({"x": 1}, a, "bfloat16", "vllm", "cpu", "eager")
    fb = Fingerprint.build({"x": 1}, b, "bfloat16", "vllm", "cpu", "eager")
    assert fa.digest != fb.digest
    assert fingerprint_diff(fa.fields, fb.fields) == [f"weights: {a!r} vs {b!r}"]


def test_digest_is_cached_by_size_and_mtime(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-1")
    first = weights_digest(model)
    assert (tmp_path / "digests.json").exists()
    assert weights_digest(model) == first
    (model / "model.safetensors").write_bytes(b"weights-2")
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert weights_digest(model) != first


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_digest(tmp_path)


@pytest.mark.parametrize("field,value", [("kv_dtype", "float16"), ("device", "cuda"),
                                         ("compile", "compiled:vllm_compile"), ("engine", "transformers"),
                                         ("kernels", {"attn_isa": "vec", "threads": 4})])
def test_every_profile_field_counts(field, value):
    base = dict(architecture={"num_hidden_layers": 4}, weights_digest="w", kv_dtype="bfloat16",
                engine="vllm", device="cpu", compile_mode="eager", kernels={"attn_isa": "vec", "threads": 2})
    key = {"compile": "compile_mode"}.get(field, field)
    assert Fingerprint.build(**base).digest != Fingerprint.build(**{**base, key: value}).digest


def test_architecture_fields_keep_what_shapes_kv():
    fields = architecture_fields({"num_hidden_layers": 4, "head_dim": 64, "transformers_version": "x",
                                  "text_config": None})
    assert fields == {"num_hidden_layers": 4, "head_dim": 64}


def test_cpu_kernels_name_what_moves_the_bits():
    kernels = cpu_kernels(threads=2, attn_isa="vec")
    assert kernels["attn_isa"] == "vec" and kernels["threads"] == 2
    assert kernels["gemm_isa"]  # torch's CPU capability, e.g. "AVX2" or "AVX512"
    base = dict(architecture={}, weights_digest="w", kv_dtype="bfloat16", engine="vllm", device="cpu",
                compile_mode="eager")
    two, four = (Fingerprint.build(**base, kernels=cpu_kernels(threads=n, attn_isa="vec")) for n in (2, 4))
    assert fingerprint_diff(two.fields, four.fields) == ["kernels.threads: 2 vs 4"]


def test_architecture_fields_keep_every_field_that_may_shape_kv():
    """Every config field counts unless it is known not to change a KV byte, in nested
    model configs too; other nested values (a quantization config) are kept whole."""
    config = {"num_hidden_layers": 4, "some_new_field": 1.5, "eos_token_id": 2, "transformers_version": "x",
              "quantization_config": {"quant_method": "fp8", "dtype": "float8"},
              "text_config": {"model_type": "qwen3", "head_dim": 64, "dtype": "bfloat16", "bos_token_id": 1}}
    assert architecture_fields(config) == {
        "num_hidden_layers": 4, "some_new_field": 1.5,
        "quantization_config": {"quant_method": "fp8", "dtype": "float8"},
        "text_config": {"model_type": "qwen3", "head_dim": 64}}
