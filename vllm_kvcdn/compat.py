"""Everything we read from vLLM's config objects, in one place (pinned: vLLM 0.32)."""

from __future__ import annotations

from vllm_kvcdn.connector.worker import KVGeometry
from vllm_kvcdn.fingerprint import Fingerprint, architecture_fields, model_weights_digest

SUPPORTED_VLLM = ">=0.32,<0.33"


def compile_mode(vllm_config) -> str:
    from vllm.config.compilation import CompilationMode

    if vllm_config.model_config.enforce_eager:
        return "eager"
    mode = vllm_config.compilation_config.mode
    return "eager" if mode == CompilationMode.NONE else f"compiled:{CompilationMode(mode).name.lower()}"


def kv_dtype_name(vllm_config) -> str:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype == "auto":
        return str(vllm_config.model_config.dtype).removeprefix("torch.")
    return cache_dtype


def vllm_fingerprint(vllm_config) -> Fingerprint:
    from vllm.platforms import current_platform

    model_config = vllm_config.model_config
    return Fingerprint.build(
        architecture=architecture_fields(model_config.hf_config.to_dict()),
        weights_digest=model_weights_digest(model_config.model, model_config.revision),
        kv_dtype=kv_dtype_name(vllm_config),
        engine="vllm",
        device=current_platform.device_type,
        compile_mode=compile_mode(vllm_config),
    )


def kv_geometry(vllm_config) -> KVGeometry:
    model_config = vllm_config.model_config
    return KVGeometry(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=model_config.get_num_kv_heads(vllm_config.parallel_config),
        head_dim=model_config.get_head_size(),
        model_dtype=model_config.dtype,
        cache_dtype=vllm_config.cache_config.cache_dtype,
    )
