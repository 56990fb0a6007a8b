"""Model fingerprint: everything that decides the exact bits of a KV cache.

It covers the model config (every field but those listed as unable to change a KV byte),
a digest of the weight files, the KV dtype, how the weights are run (dtype,
quantization) and the compute profile: engine and its version, device kind, eager vs
compiled, the kernel facts that move the last bits (``kernels``; see ``cpu_kernels`` and
``cuda_kernels``) and the engine settings that do (``runtime``). Exactness is promised
within one profile. The digest of the canonical JSON of those fields seeds every chunk
key, so an artifact made under another fingerprint can never match. Which vLLM setting
lands where is the table in ``connector/kv_settings.py``.
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

# Model config fields that cannot change a KV byte: token ids, bookkeeping, HF runtime
# switches, training-only values. Every other field is in the fingerprint (an unknown
# field counts: a field we have not read is never assumed harmless). The weights
# (digest), the dtype (``model``) and the KV dtype are recorded on their own.
IGNORED_CONFIG_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
    "initializer_range", "attention_dropout", "tie_word_embeddings",
})
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
        model: dict | None = None,
        runtime: dict | None = None,
    ) -> "Fingerprint":
        fields = {
            "architecture": architecture,
            "weights": weights_digest,
            "kv_dtype": kv_dtype,
            "model": model or {},  # how the weights are run: dtype, quantization
            "engine": engine,
            "device": device,
            "compile": compile_mode,
            "kernels": kernels or {},
            "runtime": runtime or {},  # engine version and settings that move the last bits
        }
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
        return cls(digest=hashlib.sha256(canonical.encode()).hexdigest()[:32], fields=fields)


def model_fingerprint(*, hf_config: dict, model: str, revision: str | None = None, kv_dtype: str, engine: str,
                      device: str, compile_mode: str, kernels: dict, model_settings: dict,
                      runtime: dict) -> Fingerprint:
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
        model=model_settings,
        runtime=runtime,
    )


# Fields of the compute profile: they change the last bits, not the model.
PROFILE_FIELDS = ("engine", "device", "compile", "kernels", "runtime")


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
    """A model config (``hf_config.to_dict()``, after vLLM's ``--hf-overrides``) less the
    fields that cannot change a KV byte (``IGNORED_CONFIG_FIELDS``), in nested model configs
    too (``text_config``...: a dict with a ``model_type``); any other value is kept whole."""
    return {k: architecture_fields(v) if isinstance(v, dict) and "model_type" in v else v
            for k, v in config.items() if k not in IGNORED_CONFIG_FIELDS and v is not None}


def fingerprint_diff(ours: dict, theirs: dict) -> list[str]:
    """Human-readable list of what differs between two fingerprints' fields."""
    out = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{name}.{k}: {a.get(k)!r} vs {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            out.append(f"{name}: {a!r} vs {b!r}")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _file_sha256(path: Path, cache: dict) -> str:
    st = path.stat()
    cache_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if cache_key not in cache:
        cache[cache_key] = file_sha256(path)
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
