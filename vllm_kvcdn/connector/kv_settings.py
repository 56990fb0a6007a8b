"""Every vLLM setting that can change a KV byte, and what the connector does with it.

A loaded KV must be exactly what this engine computes for those tokens (README
"Exactness"), so each setting that moves a KV byte is in one of these places:

- the **fingerprint** (``fingerprint.py``, filled in by ``compat.vllm_fingerprint``): seeds
  every chunk key, so artifacts made under another value never match;
- the **request profile** (``request_profile.py``): per-request facts in the chain seed;
- **refused** at start, with a message naming the setting and the way out
  (``engine_refusal``), or **served without kvcdn** per request: as an ordinary request,
  no load and no publish, counted (``vllm:kvcdn_unsupported_requests{reason}``).

``KV_SETTINGS`` is that list, with the settings that change no KV byte (the README's table
is made from it, and the tests check its rows against vLLM's configs). Read from vLLM
0.32's code: where vLLM's own prefix cache keys a block
(``kv_cache_utils.generate_block_hash_extra_keys``), which config fields the model and
attention code read, and which settings change the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

FINGERPRINT, PROFILE, NO_EFFECT = "fingerprint", "request profile", "no effect"
REFUSED, SERVED_PLAIN = "refused at start", "served without kvcdn"  # per engine / per request

# Speculative methods whose proposer keeps no KV cache of its own (n-gram lookups over the
# request's tokens): the target model's KV is all there is. Draft models (EAGLE, MTP,
# draft_model, ...) have their own KV layers, which an artifact does not hold.
SPECULATIVE_WITHOUT_DRAFT_KV = ("ngram", "ngram_gpu", "suffix")


@dataclass(frozen=True)
class KVSetting:
    setting: str  # the vLLM flag or input
    where: str  # FINGERPRINT, PROFILE, REFUSED, SERVED_PLAIN or NO_EFFECT
    field: str  # the fingerprint field, profile fact or refusal reason
    why: str


KV_SETTINGS = (
    KVSetting("--model (weights)", FINGERPRINT, "weights", "sha256 of the weight files (cached by size and mtime)"),
    KVSetting("--revision", FINGERPRINT, "weights",
              "the snapshot's own files are hashed; name@revision when not local"),
    KVSetting("config.json, --hf-overrides", FINGERPRINT, "architecture",
              "the whole model config vLLM runs (after overrides), less token ids and HF-only switches"),
    KVSetting("--dtype", FINGERPRINT, "model.dtype", "the dtype the weights run in"),
    KVSetting("--quantization", FINGERPRINT, "model.quantization",
              "on-the-fly quantization; a checkpoint's quantization_config is in the model config"),
    KVSetting("--kv-cache-dtype", FINGERPRINT, "kv_dtype", "the stored dtype; fp8 caches are refused at start"),
    KVSetting("--enforce-eager, -O, --compilation-config", FINGERPRINT, "compile, runtime.compile_passes",
              "eager vs compiled, and the custom ops and fusion passes a compiled graph runs"),
    KVSetting("--attention-backend", FINGERPRINT, "runtime.attention_backend", "the attention kernels"),
    KVSetting("--model-impl", FINGERPRINT, "runtime.model_impl", "vLLM's model code or transformers'"),
    KVSetting("--max-num-batched-tokens, --enable-chunked-prefill, --long-prefill-token-threshold", FINGERPRINT,
              "runtime.prefill_steps", "where a long document computed alone is split into steps"),
    KVSetting("--max-model-len", FINGERPRINT, "runtime.max_model_len",
              "read by model code: Phi-3 long-RoPE factors, Llama 4 attention temperature, RoPE tables"),
    KVSetting("--enable-lora, --max-lora-rank, --lora-dtype, --fully-sharded-loras", FINGERPRINT, "runtime.lora",
              "every layer then runs through LoRA's wrappers, base requests too"),
    KVSetting("vLLM and torch versions", FINGERPRINT, "runtime.vllm, runtime.torch", "kernels change between releases"),
    KVSetting("device, CPU ISA, OpenMP threads, L2 size; GPU model, VLLM_BATCH_INVARIANT", FINGERPRINT,
              "device, kernels", "which kernels run and how they split the work"),
    KVSetting("cache_salt", PROFILE, "salt", "in the chain seed, as vLLM's own block hashes carry it"),
    KVSetting("LoRA adapter (a request for a --lora-modules name)", PROFILE, "adapter",
              "in the chain seed as a digest of the adapter's files: per-adapter documents"),
    KVSetting("multimodal inputs (images, audio, video)", SERVED_PLAIN, "multimodal",
              "placeholder token ids do not name the content"),
    KVSetting("prompt embeddings (--enable-prompt-embeds)", SERVED_PLAIN, "prompt_embeds",
              "token ids do not name the inputs"),
    KVSetting("LoRA adapter whose files are not on this machine, or loaded by tensorizer", SERVED_PLAIN,
              "adapter_unresolved", "no digest, no key"),
    KVSetting("pooling requests", SERVED_PLAIN, "pooling", "kvcdn serves generation"),
    KVSetting("--runner pooling", REFUSED, "runner", "kvcdn serves generative models"),
    KVSetting("--speculative-config with a draft model (eagle, eagle3, mtp, draft_model, ...)", REFUSED,
              "speculative_config", "draft layers keep KV an artifact does not hold; n-gram and suffix methods run"),
    KVSetting("--tensor-parallel-size", FINGERPRINT, "runtime.tensor_parallel_size",
              "TP=2 changes the KV bytes of every layer after the first (benchmarks/tp_bytes.py); each rank "
              "stores and loads its own KV heads (absent at 1: one-rank artifacts keep their keys)"),
    KVSetting("--pipeline-parallel-size, context parallelism > 1", REFUSED, "parallel_config",
              "not run here: vLLM 0.32's CPU backend fails under PP=2 in its own model runner"),
    KVSetting("--kv-cache-dtype fp8*", REFUSED, "kv_cache_dtype", "its scales are not in the artifact"),
    KVSetting("hybrid KV cache groups (Mamba/linear attention, MLA, all-sliding-window, cross-attention)", REFUSED,
              "kv_cache_groups", "one full-attention group only; sliding+full models run as one group "
              "(vLLM turns its hybrid manager off for this connector)"),
    KVSetting("--enable-sleep-mode", REFUSED, "sleep_mode", "the worker holds the cache tensors it registered"),
    KVSetting("--tokenizer", NO_EFFECT, "", "keys are token ids: the same ids are the same KV"),
    KVSetting("speculative decoding with n-gram or suffix proposers", NO_EFFECT, "",
              "no draft KV; prefill computes the same target KV"),
    KVSetting("--seed, sampling parameters, --max-num-seqs", NO_EFFECT, "", "decode-time only"),
)


def engine_refusal(vllm_config, kv_cache_config=None) -> str | None:
    """Why the connector cannot run in this engine at all (a message that names the
    setting and what to do), or None."""
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        return ("pipeline parallelism is not supported yet; run with --pipeline-parallel-size 1 (tensor "
                "parallelism is: raise --tensor-parallel-size instead)")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or \
            getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return "context parallelism is not supported; run without --decode-context-parallel-size"
    if str(vllm_config.cache_config.cache_dtype).startswith("fp8"):
        return "FP8 KV caches are not supported (their scales are not in the artifact); run with --kv-cache-dtype auto"
    if getattr(model_config, "runner_type", "generate") != "generate":
        return f"--runner {model_config.runner_type}: kvcdn serves generative models"
    if getattr(model_config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (their cross-attention KV is not in the artifact)"
    if getattr(model_config, "use_mla", False):
        return "MLA models (DeepSeek-style latent KV) are not supported: the artifact stores per-head K and V"
    if getattr(model_config, "enable_sleep_mode", False):
        return "sleep mode is not supported (the connector holds the KV cache tensors); run without --enable-sleep-mode"
    spec = vllm_config.speculative_config
    if spec is not None and spec.method not in SPECULATIVE_WITHOUT_DRAFT_KV:
        return (f"speculative decoding method {spec.method!r} keeps a KV cache for its draft layers, which an "
                f"artifact does not hold; use method {_either(SPECULATIVE_WITHOUT_DRAFT_KV)}, or serve without "
                "--speculative-config")
    return kv_groups_refusal(kv_cache_config) if kv_cache_config is not None else None


def _either(names) -> str:
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def kv_groups_refusal(kv_cache_config) -> str | None:
    """The KV cache must be one group of full-attention layers of one shape."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
        return (f"this model's KV cache has {len(groups)} groups ({kinds}); kvcdn loads one full-attention group "
                "(hybrid Mamba/linear-attention models are not supported)")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or getattr(spec, "non_causal", False):
        return (f"this model's KV cache is {type(spec).__name__}; kvcdn loads full-attention caches only "
                "(a model whose every layer uses a sliding window: serve it with --disable-sliding-window)")
    return None


def markdown_table() -> str:
    """``KV_SETTINGS`` as the README's table (``python -m vllm_kvcdn.connector.kv_settings``)."""
    lines = ["| vLLM setting or input | where | field / reason | why |", "|---|---|---|---|"]
    lines += [f"| {row.setting} | {row.where} | {f'`{row.field}`' if row.field else ''} | {row.why} |"
              for row in KV_SETTINGS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
