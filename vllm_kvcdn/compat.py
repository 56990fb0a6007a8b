"""Everything we read from vLLM's config objects, in one place (pinned: vLLM 0.32)."""

from __future__ import annotations

import logging
import os

from vllm_kvcdn.connector.worker import KVGeometry
from vllm_kvcdn.fingerprint import Fingerprint, cpu_kernels, cuda_kernels, model_fingerprint

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


def cpu_worker_threads(vllm_config, *, in_worker: bool) -> int | str:
    """OpenMP threads of the CPU worker (rank 0); vLLM's CPU attention splits its work by them.

    With vLLM's multiprocessing executor (the default) the worker's own affinity is already
    bound to one core when it asks, so it reads what vLLM exported to it
    (``OMP_NUM_THREADS``); every other process (API server, engine core) asks vLLM's own
    OpenMP manager, as the executor did when it spawned the worker. With everything in one
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) nothing binds the threads: both halves
    ask torch. The two must agree: if they did not, no key would match (a miss, never a
    wrong load; ``tests/test_async_io.py`` runs such an engine with a core reserved).
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
