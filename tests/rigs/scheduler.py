"""The connector's scheduler half driven with vLLM's own objects (``Request``,
``LoRARequest``, ``MultiModalFeatureSpec``, ``KVCacheBlocks``), no engine: for the unit
tests, and for ``tests/rigs/vllm_contract.py`` under another vLLM release."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import write_document
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.scheduler import KVCDNScheduler
from vllm_kvcdn.store import open_store

CHUNK = 256
BLOCK = 128
FINGERPRINT = Fingerprint("e" * 32, {"test": "scheduler rig"})
PUBLISH_KEY = "rig-key"
_ids = itertools.count()


def publish(store, tokens: list[int], *, adapter: str | None = None, salt: str | None = None,
            fingerprint: str = FINGERPRINT.digest, signer=None, require_grant: bool = False) -> str:
    """Store a document of ``tokens`` (zero KV: the scheduler never reads it) as the
    engine would publish it under this fingerprint, salt and adapter digest (signed by
    ``signer``, its reads sold by grants if ``require_grant``); its id."""
    spans = document_chunks(tokens, fingerprint, salt, CHUNK, adapter)
    zeros = torch.zeros(len(tokens), 1, 8, dtype=torch.bfloat16)
    write_document(store, spans=spans, tokens=tokens, kv=[(zeros, zeros)], fingerprint=fingerprint,
                   profile={}, chunk_size=CHUNK, producer={}, salted=bool(salt), adapter=adapter or "",
                   signer=signer, require_grant=require_grant)
    return spans[-1].key


def scheduler(store_url: str) -> KVCDNScheduler:
    config = KVCDNConfig(store_url=store_url, chunk_size=CHUNK, ledger_path="", publish_key=PUBLISH_KEY,
                         index_refresh_s=3600)
    half = KVCDNScheduler(config, FINGERPRINT, open_store(store_url))
    return half


def vllm_request(tokens: list[int], *, salt: str | None = None, lora=None, image: bool = False,
                 embeds: bool = False, pooling: bool = False, kvcdn: dict | None = None):
    """A vLLM ``Request`` as the engine makes it: ``lora`` a ``LoRARequest``; ``image``:
    one image over positions 2..9; ``embeds``: mixed-mode prompt embeddings for every
    position (the ids stay as placeholders); ``pooling``: a pooling request;
    ``kvcdn``: its ``kv_transfer_params["kvcdn"]``."""
    from vllm import PoolingParams, SamplingParams
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.request import Request

    extra = {"kv_transfer_params": {"kvcdn": kvcdn}} if kvcdn is not None else None
    mm = [MultiModalFeatureSpec(data=None, modality="image", identifier="image-sha-1",
                                mm_position=PlaceholderRange(offset=2, length=8))] if image else None
    rows = torch.randn(len(tokens), 16) if embeds else None
    sampling = None if pooling else SamplingParams(max_tokens=4, extra_args=extra)
    return Request(f"rig-{next(_ids)}", list(tokens), sampling, PoolingParams() if pooling else None,
                   prompt_embeds=rows, prompt_is_token_ids=[False] * len(tokens) if embeds else None,
                   mm_features=mm, lora_request=lora, cache_salt=salt)


def blocks_for(num_tokens: int):
    """``KVCacheBlocks`` of one group holding ``num_tokens`` (block ids 1, 2, ...)."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return KVCacheBlocks(([KVCacheBlock(block_id=i + 1) for i in range(-(-num_tokens // BLOCK))],))


def admit(half: KVCDNScheduler, request) -> int:
    """What the scheduler half loads for a new request (vLLM's calls in its order);
    the loaded token count, 0 for none."""
    half.on_new_request(request)
    count, is_async = half.get_num_new_matched_tokens(request, 0)
    if not count:
        half.update_state_after_alloc(request, blocks_for(len(request.prompt_token_ids)), 0)
        return 0
    assert is_async, "loads are asynchronous"
    half.update_state_after_alloc(request, blocks_for(len(request.prompt_token_ids)), count)
    return count


def step_output(*new: tuple, total: int | None = None) -> SimpleNamespace:
    """A ``SchedulerOutput`` scheduling new requests: (request, block ids, tokens)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id, block_ids=(ids,), num_computed_tokens=0)
                            for r, ids, _ in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(),
                                              num_computed_tokens=[]),
        num_scheduled_tokens={r.request_id: n for r, _, n in new},
        total_num_scheduled_tokens=sum(n for *_, n in new) if total is None else total,
    )
