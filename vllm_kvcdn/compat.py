"""Everything we read from vLLM's config objects, in one place (vLLM 0.32 and 0.33: the CPU
build and the current CUDA release; tests/unit/test_vllm_contract.py checks both)."""

from __future__ import annotations

import dataclasses
import logging
import os

from vllm_kvcdn.artifact.fingerprint import Fingerprint, cpu_kernels, cuda_kernels, model_fingerprint
from vllm_kvcdn.artifact.parts import KVPart, rank_part
from vllm_kvcdn.connector.geometry import KVGeometry

SUPPORTED_VLLM = (0, 32), (0, 34)  # [from, to): the releases the connector is checked against


def unchecked_release() -> str | None:
    """What the connector warns at start when vLLM is outside ``SUPPORTED_VLLM``, or None."""
    import vllm

    low, high = SUPPORTED_VLLM
    try:
        if low <= tuple(int(part) for part in vllm.__version__.split(".")[:2]) < high:
            return None
    except ValueError:
        pass
    return (f"vLLM {vllm.__version__} is outside the releases this connector is checked against "
            f"(>={low[0]}.{low[1]}, <{high[0]}.{high[1]}); the start-up layout probe still guards every load")


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


def cpu_worker_threads(vllm_config, *, in_worker: bool) -> int | str:
    """OpenMP threads of the CPU worker (rank 0); vLLM's CPU attention splits its work by them.

    With vLLM's multiprocessing executor (the default) the worker's own affinity is already
    bound to one core when it asks, so it reads what vLLM exported to it
    (``OMP_NUM_THREADS``); every other process (API server, engine core) asks vLLM's own
    OpenMP manager, as the executor did when it spawned the worker. With everything in one
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) nothing binds the threads: both halves
    ask torch. The two must agree: if they did not, no key would match (a miss, never a
    wrong load; ``tests/engine/test_async_io.py`` runs such an engine with a core reserved).
    """
    import torch
    import vllm.envs as envs

    if envs.VLLM_CPU_OMP_THREADS_BIND == "nobind":
        return "unbound"  # the OS decides: exactness across restarts is not promised
    if vllm_config.parallel_config.distributed_executor_backend != "mp":
        return torch.get_num_threads()
    if in_worker:
        return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    manager_log = logging.getLogger("vllm.utils.ompmultiprocessing")
    level = manager_log.level
    manager_log.setLevel(logging.ERROR)  # it logs its whole binding plan; the executor already did
    try:
        return len(OMPProcessManager(vllm_config).cpu_lists[0])
    finally:
        manager_log.setLevel(level)


def cpu_kernel_build() -> str:
    """Which of vLLM's x86 kernel builds this CPU loads (``CpuPlatform.import_kernels``:
    ``_C`` with AVX-512 BF16, ``_C_AVX512``, ``_C_AVX2``); they round differently."""
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return "default"
    if torch.cpu._is_avx512_supported():
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    return "avx2"


def kernel_profile(vllm_config, *, in_worker: bool) -> dict:
    """The fingerprint's ``kernels``: what picks the kernels that decide the last bits."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        model_config = vllm_config.model_config
        isa = _get_attn_isa(model_config.dtype, vllm_config.cache_config.block_size,
                            model_config.get_head_size(), vllm_config.cache_config.cache_dtype)
        return cpu_kernels(attn_isa=isa, threads=cpu_worker_threads(vllm_config, in_worker=in_worker),
                           vllm_kernels=cpu_kernel_build())
    if current_platform.is_cuda():
        import vllm.envs as envs

        return cuda_kernels(batch_invariant=envs.VLLM_BATCH_INVARIANT)
    return {}


def io_cpus(vllm_config) -> frozenset[int] | None:
    """CPUs for the worker's I/O threads: those vLLM's CPU worker leaves out of its
    OpenMP compute threads (``VLLM_CPU_NUM_OF_RESERVED_CPU``), as vLLM's own NIXL
    connector puts its transfers on a reserved core; every CPU when none is left. None
    where vLLM binds nothing (GPU workers, one process, ``nobind``): threads stay put."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    compute = _omp_bound_cpus(os.environ)
    if compute is None:
        return None
    everything = frozenset(range(os.cpu_count() or 1))
    return everything - compute or everything


def _omp_bound_cpus(env) -> frozenset[int] | None:
    """The cores vLLM's executor bound this worker's OpenMP threads to, from the variables
    it exported (``vllm/utils/ompmultiprocessing.py``: Intel, GNU or generic OpenMP)."""
    if "proclist=[" in env.get("KMP_AFFINITY", ""):
        listed = env["KMP_AFFINITY"].split("proclist=[", 1)[1].split("]", 1)[0].replace(",", " ")
    elif env.get("GOMP_CPU_AFFINITY"):
        listed = env["GOMP_CPU_AFFINITY"]
    elif env.get("OMP_PLACES", "").startswith("{"):
        listed = env["OMP_PLACES"].strip("{}").replace(",", " ")
    else:
        return None
    try:
        return frozenset(int(c) for c in listed.split())
    except ValueError:  # a form vLLM does not write (ranges, strides): do not guess
        return None


def extra_key_kinds(request) -> set[str]:
    """What vLLM's own prefix cache would add to this request's block hashes besides its
    tokens, over its whole prompt (``kv_cache_utils.generate_block_hash_extra_keys``, the
    same in 0.32 and 0.33: ``lora``, ``mm``, ``cache_salt``, ``prompt_embeds``), by kind. A
    key of a shape it does not know is named by its type: counted as unknown, never ignored."""
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    keys, _ = generate_block_hash_extra_keys(request, 0, request.num_prompt_tokens, 0)
    return {key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else type(key).__name__
            for key in keys or ()}


def model_settings(vllm_config) -> dict:
    """How the weights are run: the dtype (``--dtype``) and on-the-fly or checkpoint
    quantization (``--quantization``; a checkpoint's own ``quantization_config`` is also in
    the model config)."""
    model_config = vllm_config.model_config
    return {"dtype": str(model_config.dtype).removeprefix("torch."), "quantization": model_config.quantization}


def prefill_steps(scheduler_config) -> dict | str:
    """Where vLLM splits a long prompt computed alone into steps (chunked prefill): a
    document computed in other steps differs in the last bits past the first split."""
    if not scheduler_config.enable_chunked_prefill:
        return "whole"
    return {"max_num_batched_tokens": scheduler_config.max_num_batched_tokens,
            "long_prefill_token_threshold": scheduler_config.long_prefill_token_threshold,
            "adaptive": bool(getattr(scheduler_config, "long_prefill_token_threshold_adaptive", False))}


def runtime_settings(vllm_config) -> dict:
    """Engine settings outside the model config that move the last bits of a KV cache
    (``connector/kv_settings.py`` lists each, and those left out)."""
    import torch
    import vllm

    model_config = vllm_config.model_config
    out = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "model_impl": str(getattr(model_config, "model_impl", "auto")),
        "prefill_steps": prefill_steps(vllm_config.scheduler_config),
        "max_model_len": model_config.max_model_len,
    }
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    if tp_size > 1:  # changes every layer's KV after the first (benchmarks/tp_bytes.py); absent at 1
        out["tensor_parallel_size"] = tp_size
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if backend is not None:
        out["attention_backend"] = getattr(backend, "name", str(backend))
    lora = vllm_config.lora_config
    if lora is not None:  # every layer then runs through LoRA's wrappers, base requests too
        out["lora"] = {"max_lora_rank": lora.max_lora_rank, "lora_dtype": str(lora.lora_dtype),
                       "fully_sharded_loras": lora.fully_sharded_loras,
                       "target_modules": sorted(lora.target_modules or [])}
    if compile_mode(vllm_config) != "eager":  # which fusions the compiled graph runs
        compilation = vllm_config.compilation_config
        out["compile_passes"] = {"custom_ops": list(compilation.custom_ops),
                                 "pass_config": dataclasses.asdict(compilation.pass_config)}
    return out


def vllm_fingerprint(vllm_config, *, in_worker: bool = False) -> Fingerprint:
    from vllm.platforms import current_platform

    model_config = vllm_config.model_config
    return model_fingerprint(
        hf_config=model_config.hf_config.to_dict(),
        model=model_config.model,
        revision=model_config.revision,
        kv_dtype=kv_dtype_name(vllm_config),
        engine="vllm",
        device=current_platform.device_type,
        compile_mode=compile_mode(vllm_config),
        kernels=kernel_profile(vllm_config, in_worker=in_worker),
        model_settings=model_settings(vllm_config),
        runtime=runtime_settings(vllm_config),
    )


def total_kv_heads(vllm_config) -> int:
    return vllm_config.model_config.get_total_num_kv_heads()


def workers_per_node(vllm_config) -> int:
    """The engine's workers on this node (tensor- and pipeline-parallel ranks)."""
    parallel = vllm_config.parallel_config
    return max(1, parallel.world_size // max(1, getattr(parallel, "nnodes_within_dp", 1)))


def kv_part(vllm_config) -> KVPart | None:
    """The KV heads this worker's tensor-parallel rank holds (None: one rank holds all)."""
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    if tp_size == 1:
        return None
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return rank_part(total_kv_heads(vllm_config), tp_size, get_tensor_model_parallel_rank())


def kv_geometry(vllm_config) -> KVGeometry:
    model_config = vllm_config.model_config
    return KVGeometry(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=model_config.get_num_kv_heads(vllm_config.parallel_config),
        head_dim=model_config.get_head_size(),
        model_dtype=model_config.dtype,
        cache_dtype=vllm_config.cache_config.cache_dtype,
    )
