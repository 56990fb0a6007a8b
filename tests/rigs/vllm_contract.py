"""The connector against the vLLM that is importable, without an engine or a GPU:

    python -m tests.rigs.vllm_contract MODEL_DIR ADAPTER_DIR STORE_DIR   # prints a JSON report

``tests/unit/test_vllm_contract.py`` runs it under the installed vLLM (the CPU build, 0.32) and
under vLLM 0.33's own Python sources (the CUDA release; ``ci/setup.sh`` unpacks them into
``.vllm-0.33``, nothing of it installed): the base class's abstract methods, the
signatures of every method we override, the properties and class hooks, our connector's
scheduler half built from that vLLM's own ``VllmConfig`` and ``KVCacheConfig`` and driven
with its ``Request``, ``LoRARequest``, ``MultiModalFeatureSpec``, ``KVCacheBlocks`` and
``SchedulerOutput``, and the start-up refusals read from its configs.
"""

from __future__ import annotations

import inspect
import json
import sys

KV = {"kv_connector": "KVCDNConnector", "kv_role": "kv_both"}


def signatures() -> dict:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from vllm_kvcdn.connector.connector import KVCDNConnector

    mismatched = {}
    for name, ours in vars(KVCDNConnector).items():
        base = getattr(KVConnectorBase_V1, name, None)
        if base is None or name.startswith("__") and name != "__init__":
            continue
        if isinstance(ours, property) != isinstance(inspect.getattr_static(KVConnectorBase_V1, name), property):
            mismatched[name] = "property in one, not the other"
            continue
        if isinstance(ours, property) or not callable(getattr(KVCDNConnector, name)):
            continue  # a property's name is what counts; a class attribute (the hit source) too
        theirs_params = list(inspect.signature(base).parameters)
        ours_params = list(inspect.signature(getattr(KVCDNConnector, name)).parameters)
        if ours_params != theirs_params:
            mismatched[name] = f"{ours_params} vs {theirs_params}"
    has_sleep_hook = hasattr(KVConnectorBase_V1, "supports_sleep_mode")
    return {"abstract_left": sorted(getattr(KVCDNConnector, "__abstractmethods__", ())),
            "mismatched": mismatched,
            "overridden": sorted(n for n in vars(KVCDNConnector) if hasattr(KVConnectorBase_V1, n)),
            "sleep_mode": KVCDNConnector.supports_sleep_mode(None) if has_sleep_hook else "no such hook"}


def scheduler_half(model: str, adapter: str, store: str) -> dict:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from tests.rigs.scheduler import blocks_for, publish, vllm_request
    from vllm_kvcdn.connector.connector import KVCDNConnector
    from vllm_kvcdn.connector.request_profile import AdapterDigests
    from vllm_kvcdn.store import open_store

    url = f"file://{store}"
    transfer = {**KV, "kv_connector_extra_config": {"store_url": url, "ledger_path": "", "index_refresh_s": 3600}}
    config = EngineArgs(model=model, enforce_eager=True, max_model_len=4096, kv_transfer_config=transfer,
                        enable_lora=True, max_lora_rank=8).create_engine_config()
    spec = FullAttentionSpec(block_size=config.cache_config.block_size, num_kv_heads=2, head_size=64,
                             dtype=torch.bfloat16)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    kv_cache_config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    doc = list(range(100, 700))
    prompt = doc + [5, 6, 7]
    adapter_digest = AdapterDigests().digest(adapter)
    out = {}
    connector = KVCDNConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config)
    try:
        fingerprint = connector.fingerprint.digest
        docs = {"base": publish(open_store(url), doc, fingerprint=fingerprint),
                "a": publish(open_store(url), doc, fingerprint=fingerprint, adapter=adapter_digest)}
        connector.scheduler_half.index.refresh(force=True)
        out["requires_kv_delivery"] = connector.requires_kv_delivery
        out["fingerprint_runtime"] = connector.fingerprint.fields["runtime"]
        cases = {"base": {}, "a": {"lora": LoRARequest("a", 1, adapter)}, "image": {"image": True},
                 "embeds": {"embeds": True}}
        for name, kw in cases.items():
            request = vllm_request(prompt, **kw)
            connector.on_new_request(request)
            count, is_async = connector.get_num_new_matched_tokens(request, 0)
            connector.update_state_after_alloc(request, blocks_for(len(prompt)), count or 0)
            meta = connector.build_connector_meta(SchedulerOutput.make_empty())
            _, params = connector.request_finished(request, [])
            load = meta.loads[0] if meta.loads else None
            out[name] = {"count": count, "async": is_async, "document": params["kvcdn"].get("document"),
                         "expected_document": docs.get(name), "chunks": len(load.chunks) if load else 0,
                         "block_ids": load.block_ids if load else []}
        out["unsupported"] = connector.get_kv_connector_stats().data.get("unsupported_requests")
    finally:
        connector.shutdown()
    return out


def refusals(model: str) -> dict:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvcdn.connector.kv_settings import engine_refusal

    def refusal(**kw):
        args = {"model": model, "enforce_eager": True, "max_model_len": 4096, "kv_transfer_config": KV, **kw}
        return engine_refusal(EngineArgs(**args).create_engine_config())

    return {"plain": refusal(),
            "draft_model": refusal(speculative_config={"method": "draft_model", "model": model,
                                                       "num_speculative_tokens": 2}),
            "ngram": refusal(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                 "prompt_lookup_max": 3}),
            "tp2": refusal(tensor_parallel_size=2), "pp2": refusal(pipeline_parallel_size=2)}


def main(argv: list[str]) -> None:
    import vllm

    model, adapter, store = argv
    report = {"vllm": vllm.__version__, "signatures": signatures(), "scheduler": scheduler_half(model, adapter, store),
              "refusals": refusals(model)}
    print("CONTRACT " + json.dumps(report, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
