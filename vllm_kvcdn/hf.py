"""The transformers path (the paper's SAVEKV / GENERATEFROMKV) on Apple MPS, CUDA or CPU.

Publishes and consumes the same artifacts as the vLLM connector. The fingerprint's
compute profile says ``engine=transformers`` and the device kind, so an artifact from
vLLM (or another device) is refused unless ``allow_cross_profile=True``: kernels differ
in the last bits across profiles, so exactness is only promised within one.

    kv = HFKVCDN("path/to/model", store_url="file:///tmp/kvcdn")
    doc = kv.publish(text=open("manual.txt").read())
    out = kv.generate(kv.encode(open("manual.txt").read() + "\\nQ: ...?\\nA:"), doc_id=doc.doc_id)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.codec import for_store as codec_for_store
from vllm_kvcdn.artifact.documents import read_whole_chunk, write_document
from vllm_kvcdn.artifact.fingerprint import (
    PROFILE_FIELDS,
    cpu_kernels,
    cuda_kernels,
    fingerprint_diff,
    model_fingerprint,
)
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.artifact.manifest import Manifest
from vllm_kvcdn.artifact.provenance import policy_for
from vllm_kvcdn.artifact.sealing import tenant_keys as load_tenant_keys
from vllm_kvcdn.defaults import DEFAULT_CHUNK_SIZE
from vllm_kvcdn.store import open_store


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given, else MPS, then CUDA, then CPU."""
    if preferred:
        return torch.device(preferred)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _kernels(device: torch.device) -> dict:
    """What decides the last bits on this device (see ``fingerprint.cpu_kernels``)."""
    if device.type == "cpu":
        return cpu_kernels(threads=torch.get_num_threads())
    if device.type == "cuda":
        return cuda_kernels(device.index or 0)
    return {}


def _runtime() -> dict:
    """The library versions that compute the KV (``fingerprint`` "runtime")."""
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


class FingerprintMismatch(ValueError):
    pass


class UntrustedDocument(ValueError):
    """A manifest this party's trust policy refuses (``artifact.provenance``)."""


@dataclass
class Generation:
    token_ids: list[int]  # the new tokens only
    text: str
    cached_tokens: int  # prompt tokens whose KV came from the artifact
    doc_id: str | None


class HFKVCDN:
    def __init__(self, model: str, *, store_url: str | None = None, dtype: str = "bfloat16",
                 device: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, allow_cross_profile: bool = False,
                 attn_implementation: str = "eager", codec: str = "auto", signing_key: str = "",
                 trusted_publishers: tuple[str, ...] = (), allow_unsigned: bool | None = None,
                 tenant_keys: tuple[str, ...] = ()):
        """``signing_key``, ``trusted_publishers``, ``allow_unsigned``, ``tenant_keys``: as the
        connector's settings of those names (``artifact.provenance``, ``artifact.sealing``):
        what this party signs and seals with, and whose documents it loads."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        self.dtype = getattr(torch, dtype)
        # "eager" attention computes each query row the same way whether the keys come
        # from a cache or from the same forward pass: logits from a loaded artifact then
        # equal a full prefill's bit for bit (measured on CPU). SDPA picks another kernel
        # when a cache and a mask are present, and moves the last bits.
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=self.dtype, attn_implementation=attn_implementation
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.store = open_store(store_url)
        self.codec = codec_for_store(self.store.url, codec)  # how published chunks are stored (codec.py)
        self.chunk_size = chunk_size
        self.allow_cross_profile = allow_cross_profile
        self.signer, self.trust = policy_for(self.store.url, signing_key=signing_key,
                                             trusted_publishers=trusted_publishers, allow_unsigned=allow_unsigned)
        self.keys = load_tenant_keys(list(tenant_keys))
        self.fingerprint = model_fingerprint(
            hf_config=self.model.config.to_dict(),
            model=model,
            kv_dtype=dtype,
            engine="transformers",
            device=self.device.type,
            compile_mode=f"eager:attn={attn_implementation}",
            kernels=_kernels(self.device),
            model_settings={"dtype": dtype, "quantization": None},
            runtime=_runtime(),
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # -- SAVEKV ----------------------------------------------------------------------

    @torch.inference_mode()
    def publish(self, token_ids: list[int] | None = None, *, text: str | None = None,
                cache_salt: str | None = None, title: str = "", private: bool = False) -> Manifest:
        """One forward pass over the document; its KV goes to the store as an artifact
        (``private``: sealed with the first tenant key)."""
        tokens = list(token_ids) if token_ids is not None else self.encode(text or "")
        if not tokens:
            raise ValueError("nothing to publish: the document has no tokens")
        ids = torch.tensor([tokens], device=self.device)
        cache = self.model(ids, use_cache=True, logits_to_keep=1).past_key_values  # no [tokens, vocab] logits
        layers = [(layer.keys[0].transpose(0, 1).cpu(), layer.values[0].transpose(0, 1).cpu())
                  for layer in cache.layers]
        import transformers

        producer = {"engine": "transformers", "transformers": transformers.__version__,
                    "torch": torch.__version__, "device": self.device.type}
        spans = document_chunks(tokens, self.fingerprint.digest, cache_salt, self.chunk_size)
        vouched = {key: list(parts.values()) for key, parts in self._index().vouched([s.key for s in spans]).items()}
        manifest = write_document(
            self.store, spans=spans, tokens=tokens, kv=layers, fingerprint=self.fingerprint.digest,
            profile=self.fingerprint.fields, chunk_size=self.chunk_size, producer=producer,
            salted=bool(cache_salt), title=title, codec=self.codec, signer=self.signer, vouched=vouched,
            keys=self.keys, private=private,
        ).manifest
        return manifest

    # -- GENERATEFROMKV ----------------------------------------------------------------

    def check_fingerprint(self, manifest: Manifest) -> None:
        """Refuse an artifact of another model, dtype or (unless allowed) compute profile."""
        if manifest.fingerprint == self.fingerprint.digest:
            return
        diff = fingerprint_diff(self.fingerprint.fields, manifest.profile)
        only_profile = all(line.split(":")[0].split(".")[0] in PROFILE_FIELDS for line in diff)
        if diff and only_profile and self.allow_cross_profile:
            return
        hint = " (pass allow_cross_profile=True / --allow-cross-profile to use it anyway)" if only_profile else ""
        raise FingerprintMismatch(
            f"artifact {manifest.doc_id[:16]} does not fit this model: " + "; ".join(diff or ["fingerprint"]) + hint
        )

    def find_document(self, prompt: list[int], cache_salt: str | None = None) -> str | None:
        """The published document (of this fingerprint) covering the longest prefix of ``prompt``."""
        match = self._index().match(prompt, cache_salt)
        return match.doc_id if match.num_tokens else None

    def _index(self) -> ChunkIndex:
        """The store's trusted documents of this fingerprint, read now."""
        index = ChunkIndex(self.store, self.fingerprint.digest, self.chunk_size, trust=self.trust, keys=self.keys)
        index.refresh(force=True)
        return index

    def load(self, doc_id: str) -> tuple[list[int], "object"]:
        """(document tokens, a transformers cache holding their KV on this device)."""
        from transformers import DynamicCache

        manifest = catalog.get_manifest(self.store, doc_id)
        if manifest is None:
            raise KeyError(f"no document {doc_id} in {self.store.url}")
        distrust = self.trust.verdict(manifest)
        if distrust is not None:
            raise UntrustedDocument(
                f"document {doc_id[:16]} is not loaded: its manifest is {distrust.replace('_', ' ')} (publisher "
                f"{manifest.publisher[:16] or 'none'}); trust its publisher's key (trusted_publishers=) or, for a "
                f"store only you write, allow_unsigned=True")
        self.check_fingerprint(manifest)
        cfg = self.model.config
        kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        tokens: list[int] = []
        per_layer: list[tuple[list, list]] = [([], []) for _ in range(cfg.num_hidden_layers)]
        for c in manifest.chunks:  # a tensor-parallel publish's parts joined (a cross-profile load)
            kv = read_whole_chunk(self.store, c, kv_heads, keys=self.keys, fingerprint=manifest.fingerprint,
                                  dtype=self.dtype,
                                  num_layers=cfg.num_hidden_layers, head_dim=head_dim)
            tokens += kv.tokens.tolist()
            for (ks, vs), k, v in zip(per_layer, kv.keys, kv.values):
                ks.append(k)
                vs.append(v)
        cache = DynamicCache(config=cfg)
        for i, (ks, vs) in enumerate(per_layer):
            k = torch.cat(ks).transpose(0, 1).unsqueeze(0).to(self.device)
            v = torch.cat(vs).transpose(0, 1).unsqueeze(0).to(self.device)
            cache.update(k, v, i)
        return tokens, cache

    def _cache_for(self, prompt: list[int], doc_id: str | None):
        doc_id = doc_id or self.find_document(prompt)
        if doc_id is None:
            return None, 0, None
        doc_tokens, cache = self.load(doc_id)
        if prompt[: len(doc_tokens)] != doc_tokens:
            first = next((i for i, (a, b) in enumerate(zip(prompt, doc_tokens)) if a != b), len(prompt))
            raise ValueError(f"the prompt does not start with document {doc_id[:16]} "
                             f"(they differ at token {first} of {len(doc_tokens)})")
        cached = min(len(doc_tokens), len(prompt) - 1)  # the model needs one token to compute
        if cached < len(doc_tokens):
            cache.crop(cached - len(doc_tokens))  # drop the document's last token(s): it must be computed
        return cache, cached, doc_id

    @torch.inference_mode()
    def generate(self, prompt: list[int], *, doc_id: str | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, **kwargs) -> Generation:
        """Continue ``prompt`` with the document's KV loaded (no re-prefill of the document)."""
        cache, cached, doc_id = self._cache_for(prompt, doc_id)
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new = out[0, len(prompt):].tolist()
        return Generation(new, self.tokenizer.decode(new), cached, doc_id)

    @torch.inference_mode()
    def next_token_logits(self, prompt: list[int], *, doc_id: str | None = None, use_artifact: bool = True):
        """Logits after ``prompt``: from the artifact's KV, or from a full prefill."""
        cache, cached = (None, 0)
        if use_artifact:
            cache, cached, _ = self._cache_for(prompt, doc_id)
        ids = torch.tensor([prompt[cached:]], device=self.device)
        mask = torch.ones(1, len(prompt), dtype=torch.long, device=self.device)
        out = self.model(ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)
        return out.logits[0, -1].float().cpu()
