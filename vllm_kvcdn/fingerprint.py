"""Model fingerprint: everything that decides the exact bits of a KV cache.

It covers the architecture fields that shape KV, a digest of the weight files, the KV
dtype and the compute profile: engine, device kind, eager vs compiled, and the kernel
facts that move the last bits (``kernels``; see ``cpu_kernels`` and ``cuda_kernels``).
Exactness is promised within one profile. The digest of the canonical JSON of those
fields seeds every chunk key, so an artifact made under another fingerprint can never
match.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vllm_kvcdn.defaults import digest_cache_path
from vllm_kvcdn.log import get_logger

logger = get_logger(__name__)

# Config fields that change K/V values or shapes (weights are covered by the digest).
KV_SHAPING_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "rms_norm_eps",
    "attention_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class Fingerprint:
    """``digest`` seeds the chunk keys; ``fields`` says what it was made of."""

    digest: str
    fields: dict

    @classmethod
    def build(
        cls,
        architecture: dict,
        weights_digest: str,
        kv_dtype: str,
        engine: str,
        device: str,
        compile_mode: str,
        kernels: dict | None = None,
    ) -> "Fingerprint":
        fields = {
            "architecture": architecture,
            "weights": weights_digest,
            "kv_dtype": kv_dtype,
            "engine": engine,
            "device": device,
            "compile": compile_mode,
            "kernels": kernels or {},
        }
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
        return cls(digest=hashlib.sha256(canonical.encode()).hexdigest()[:32], fields=fields)


def model_fingerprint(*, hf_config: dict, model: str, revision: str | None = None, kv_dtype: str, engine: str,
                      device: str, compile_mode: str, kernels: dict) -> Fingerprint:
    """The one way an engine fingerprints its model (vLLM: ``compat``; transformers:
    ``hf``): architecture from the HF config, weights by digest (hub snapshots too)."""
    return Fingerprint.build(
        architecture=architecture_fields(hf_config),
        weights_digest=model_weights_digest(model, revision),
        kv_dtype=kv_dtype,
        engine=engine,
        device=device,
        compile_mode=compile_mode,
        kernels=kernels,
    )


# Fields of the compute profile: they change the last bits, not the model.
PROFILE_FIELDS = ("engine", "device", "compile", "kernels")


def cpu_kernels(*, threads: int | str, attn_isa: str | None = None, **extra) -> dict:
    """What moves a CPU engine's last bits besides the model (measured with vLLM 0.32's
    CPU attention, see README "Exactness"): the instruction set its kernels were built
    for (attention ISA; torch's GEMM capability; ``extra``: the engine's kernel build),
    how many OpenMP threads split the attention work, and the L2 size the attention
    kernel sizes its tiles by."""
    import torch

    return {
        "attn_isa": attn_isa,
        "gemm_isa": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "l2_kib": _l2_cache_kib(),
        **extra,
    }


def cuda_kernels(device_index: int = 0, **extra) -> dict:
    """The GPU facts that pick kernels: compute capability, model (SM count)."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return {"capability": f"{props.major}.{props.minor}", "gpu": props.name,
            "sms": props.multi_processor_count, **extra}


def _l2_cache_kib() -> int | None:
    """Per-core L2 size in KiB, from Linux sysfs (None elsewhere)."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip().upper()  # e.g. "512K", "2M"
        except OSError:
            continue
        scale = {"K": 1, "M": 1024}.get(size[-1:])
        return int(size[:-1]) * scale if scale and size[:-1].isdigit() else None
    return None


def architecture_fields(config: dict) -> dict:
    """The KV-shaping subset of a model config (e.g. ``hf_config.to_dict()``)."""
    text = config.get("text_config") or config
    return {k: text[k] for k in KV_SHAPING_FIELDS if text.get(k) is not None}


def fingerprint_diff(ours: dict, theirs: dict) -> list[str]:
    """Human-readable list of what differs between two fingerprints' fields."""
    out = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if name in ("architecture", "kernels") and isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{name}.{k}: {a.get(k)!r} vs {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            out.append(f"{name}: {a!r} vs {b!r}")
    return out


def _file_sha256(path: Path, cache: dict) -> str:
    st = path.stat()
    cache_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if cache_key in cache:
        return cache[cache_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    cache[cache_key] = h.hexdigest()
    return cache[cache_key]


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(
        p for p in model_dir.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def weights_digest(model_dir: str | os.PathLike) -> str:
    """sha256 over the weight files' own sha256s, cached by path, size and mtime.

    The cache means a restart does not rehash gigabytes; a changed file (new size or
    mtime) is hashed again, so new weights under the same name get a new digest.
    """
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {model_dir}")
    cache_path = digest_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    before = len(cache)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(model_dir).as_posix().encode() + b"\0")
        h.update(_file_sha256(f, cache).encode() + b"\n")
    if len(cache) != before:
        _write_json_atomic(cache_path, cache)
    return "sha256:" + h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:  # a cache, not a requirement
        logger.warning("kvcdn: could not write the weight digest cache %s: %s", path, e)


def resolve_model_dir(model: str, revision: str | None = None) -> Path | None:
    """A local directory holding ``model``'s files: the path itself or a hub snapshot."""
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not downloaded, no hub client: the caller decides
        return None


def model_weights_digest(model: str, revision: str | None = None) -> str:
    model_dir = resolve_model_dir(model, revision)
    if model_dir is None:
        logger.warning(
            "kvcdn: weights of %s not found locally; fingerprinting by name and revision only",
            model,
        )
        return f"name:{model}@{revision or 'main'}"
    return weights_digest(model_dir)
