"""What a request's KV depends on besides its token ids: its profile.

vLLM keys its own prefix cache on more than token ids (``kv_cache_utils.
generate_block_hash_extra_keys``, the same in vLLM 0.32 and 0.33): the LoRA adapter (name
and path), each multimodal input that overlaps a block (identifier and offset), the
block's prompt embeddings (a sha256 of them) and the cache salt. Each changes KV bytes, so
a chunk key must carry the same facts, or a request loads KV computed for other inputs and
reports a hit. The profile asks vLLM's own function which of those a request has
(``compat.extra_key_kinds``), so a kind a later vLLM adds is refused, not ignored. Here:

- the cache salt is in the chain seed (``chain.chain_seed``);
- a LoRA adapter is in the chain seed too, as a digest of its files (``AdapterDigests``),
  not its name or path: those are one server's aliases, while every server of a fleet
  agrees on the files. A request for adapter A hits only documents published through A,
  and a base request only base documents;
- multimodal inputs, prompt embeddings and any other kind: no publish path of ours makes
  such a document (documents are text, chat messages or token ids), and their placeholder
  token ids say nothing of the content. A request carrying them is served as an ordinary
  one: no load, no publish, counted with its reason (``vllm:kvcdn_unsupported_requests``),
  the first of each reason logged. So is a pooling request and an adapter whose files
  cannot be read.

An adapter's files are hashed on the scheduler's thread once (and again when one changes:
size or mtime), by its first request: about a second per GB.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from vllm_kvcdn.artifact.fingerprint import WEIGHT_SUFFIXES, file_sha256, resolve_model_dir
from vllm_kvcdn.compat import extra_key_kinds
from vllm_kvcdn.log import get_logger

logger = get_logger(__name__)

ADAPTER_FILES = ("adapter_config.json",)  # besides weight files: rank, alpha, target modules
KEYED = {"cache_salt", "lora"}  # vLLM's extra-key kinds our chunk keys carry (chain seed)
UNKEYED_REASONS = {  # the others: reason label, what the log says
    "mm": ("multimodal", "a multimodal request: its placeholder tokens do not name the images or audio"),
    "prompt_embeds": ("prompt_embeds", "a request with prompt embeddings: its token ids do not name its inputs"),
}


@dataclass(frozen=True)
class RequestProfile:
    """The facts a request's chunk keys carry besides its tokens, or why it has none."""

    cache_salt: str | None = None
    adapter: str | None = None  # digest of the LoRA adapter's files; None: the base model
    adapter_name: str | None = None  # the server's name for it (logs, manifests)
    unsupported: str | None = None  # reason label: served as an ordinary request
    detail: str = ""  # what the log says about ``unsupported``


class AdapterDigests:
    """sha256 over a LoRA adapter's files (config and weights) by path, hashed again only
    when a file's size or mtime changes."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple, str]] = {}

    def digest(self, path: str) -> str | None:
        """The adapter's digest, or None when its files are not on this machine."""
        directory = resolve_model_dir(os.path.expanduser(path)) if path else None
        if directory is None:
            return None
        files = sorted(p for p in directory.rglob("*")
                       if p.is_file() and (p.name in ADAPTER_FILES or p.name.endswith(WEIGHT_SUFFIXES)))
        if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
            return None
        stamp = tuple((p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        known = self._known.get(str(directory))
        if known is not None and known[0] == stamp:
            return known[1]
        h = hashlib.sha256()
        for (name, _, _), f in zip(stamp, files):
            h.update(name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
        digest = "sha256:" + h.hexdigest()
        self._known[str(directory)] = (stamp, digest)
        return digest


def request_profile(request: Any, adapters: AdapterDigests) -> RequestProfile:
    """The profile of a vLLM ``Request`` (the scheduler's own object)."""
    salt = request.cache_salt or None
    if getattr(request, "pooling_params", None) is not None:
        return RequestProfile(salt, unsupported="pooling", detail="a pooling request (kvcdn serves generation)")
    unkeyed = sorted(extra_key_kinds(request) - KEYED)
    if unkeyed:
        kind = unkeyed[0]
        reason, detail = UNKEYED_REASONS.get(kind, (kind, f"vLLM keys this request's blocks on {kind!r}, which "
                                                          "kvcdn's chunk keys do not carry"))
        return RequestProfile(salt, unsupported=reason, detail=detail)
    lora = getattr(request, "lora_request", None)
    if not lora:
        return RequestProfile(salt)
    name = lora.lora_name
    if getattr(lora, "tensorizer_config_dict", None):
        return RequestProfile(salt, adapter_name=name, unsupported="adapter_unresolved",
                              detail=f"LoRA adapter {name!r} is loaded through tensorizer: its files cannot be hashed")
    try:
        digest = adapters.digest(lora.lora_path)
    except OSError as e:  # files gone or unreadable while hashing
        digest, why = None, str(e)
    else:
        why = f"no adapter files under {lora.lora_path!r} on this machine"
    if digest is None:
        return RequestProfile(salt, adapter_name=name, unsupported="adapter_unresolved",
                              detail=f"LoRA adapter {name!r}: {why}")
    return RequestProfile(salt, adapter=digest, adapter_name=name)


class RequestProfiles:
    """Each request's profile, worked out once; an unsupported one is counted (``stats``)
    and its reason logged the first time it is seen."""

    def __init__(self, stats) -> None:
        self.adapters = AdapterDigests()
        self._stats = stats
        self._profiles: dict[str, RequestProfile] = {}
        self._logged: set[str] = set()  # reasons logged once each

    def of(self, request: Any) -> RequestProfile:
        profile = self._profiles.get(request.request_id)
        if profile is None:
            self._profiles[request.request_id] = profile = request_profile(request, self.adapters)
            if profile.unsupported:
                self._stats.add_labelled("unsupported_requests", profile.unsupported)
                if profile.unsupported not in self._logged:
                    self._logged.add(profile.unsupported)
                    logger.warning("kvcdn: request %s is served without kvcdn (no load, no publish): %s; "
                                   "further requests like it are only counted in vllm:kvcdn_unsupported_requests"
                                   "{reason=%r}", request.request_id, profile.detail, profile.unsupported)
        return profile

    def forget(self, req_id: str) -> None:
        self._profiles.pop(req_id, None)
