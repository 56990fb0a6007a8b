"""Run one real vLLM engine through a list of operations, in a fresh process.

The tests and ``benchmarks/exactness.py`` use it: every engine is a new process (engines
never share state, and each gets vLLM's CPU thread setup of its own), and every
operation records the change in vLLM's own counters, so callers check what vLLM did,
not what the connector claims.

    python -m vllm_kvcdn.testing.engine_job SPEC.json OUT.json

SPEC: ``{"model", "store_url" (null: no connector), "prefix_caching", "chunk_size",
"extra_config", "engine_args" (more ``vllm.LLM`` arguments), "env" (more environment, e.g.
test faults), "loras" ({name: adapter path}: LoRA adapters requests may name), "ops": [...]}``.
Each op has a ``name`` and an ``op``:

- ``query`` / ``publish`` / ``verify``: one request alone (``ids``, ``salt``, ``max_tokens``,
  a publish's ``title``, ``private`` (sealed) and ``require_grant``, a query's read
  ``grant`` token, the publisher ``key`` to send: this process's own unless given;
  ``verify`` names the document to recompute ``ids`` against in ``doc``, or ``@OP`` for the
  document an earlier publish op reported; ``lora``: the name of an adapter of ``loras``;
  ``embeds``: ``{"seed", "scale"}``, random prompt embeddings for ``ids``, which stay as
  vLLM's mixed-mode placeholder ids);
- ``batch``: ``requests`` (ops of the three kinds above) submitted together;
- ``abort``: one query (``ids``) aborted after ``after_steps`` engine steps, ``pause_s``
  apart (time for background loads; needs ``"inproc": true`` in the spec: the engine core
  then steps only when asked), the
  engine then run until it is idle; returns what the connector reported for it, if anything;
- ``delete_during``: one query (``ids``) whose document (``doc``, or ``@OP``) is deleted
  from the store after ``after_steps`` engine steps (``inproc`` too; pair it with a slowed
  store, ``KVCDN_TEST_FAULTS=chunk_get_delay_s=S``, so the load is still reading); returns
  the answer and counters as ``query`` does;
- ``reset``: empty vLLM's prefix cache;
- ``write_file``: write ``text`` to ``path`` (e.g. a delay file: ``chunk_get_delay_file``);
- ``settle``: wait until no worker has a probe read in flight (``connector/load_costs``);
- ``kv_blocks``: digests of the paged-cache bytes behind the connector's last ``load`` or
  ``save`` (``of``), over its first ``tokens`` positions: whole blocks as raw bytes, the
  partial block's valid slots through the engine's own packing (see ``kv_layout``); under
  tensor parallelism a list, one per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vllm_kvcdn.defaults import CPU_ENGINE_ENV, DEFAULT_CHUNK_SIZE


def run(spec: dict) -> dict:
    from vllm_kvcdn.testing.offline import PUBLISH_KEY, engine_counters, generate_many, make_llm, request

    if any(op["op"] in ("kv_blocks", "settle") for op in spec["ops"]):
        # Functions we send run inside the worker process (the digests, the settling).
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if spec.get("inproc"):
        # The engine core runs in this process and takes one step per LLMEngine.step().
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = make_llm(
        spec["model"],
        store_url=spec.get("store_url"),
        extra_config=spec.get("extra_config"),
        enable_prefix_caching=spec.get("prefix_caching", True),
        chunk_size=spec.get("chunk_size", DEFAULT_CHUNK_SIZE),
        **spec.get("engine_args", {}),
    )
    if any(op["op"] == "kv_blocks" for op in spec["ops"]):
        llm.collective_rpc(_install_block_spy)

    def doc_of(op: dict) -> str | None:
        doc = op.get("doc")
        return results[doc[1:]]["answer"]["kvcdn"].get("document") if doc and doc.startswith("@") else doc

    def to_request(op: dict):
        doc = doc_of(op) if op["op"] == "verify" else None
        return request(op["ids"], max_tokens=op.get("max_tokens", 12), publish=op["op"] == "publish",
                       verify=doc, cache_salt=op.get("salt"), title=op.get("title", ""),
                       key=op.get("key", PUBLISH_KEY), embeds=_embeds(llm, op), private=op.get("private", False),
                       require_grant=op.get("require_grant", False), grant=op.get("grant"))

    loras = _lora_requests(spec.get("loras", {}))

    results = {}
    for op in spec["ops"]:
        before = engine_counters(llm)
        started_at = time.time()
        if op["op"] == "kv_blocks":
            digests = llm.collective_rpc(_block_digests, args=(op["of"], op["tokens"]))
            results[op["name"]] = digests[0] if len(digests) == 1 else digests  # one per rank (TP)
            continue
        if op["op"] == "reset":
            results[op["name"]] = {"reset": llm.reset_prefix_cache()}
            continue
        if op["op"] == "write_file":
            Path(op["path"]).write_text(op["text"])
            results[op["name"]] = {}
            continue
        if op["op"] == "settle":
            results[op["name"]] = {"settled": llm.collective_rpc(_settle_probes)}
            continue
        if op["op"] == "abort":
            results[op["name"]] = _abort_after(llm.llm_engine, to_request(op), op["after_steps"],
                                                   op.get("pause_s", 0.0))
            continue
        batch = op["requests"] if op["op"] == "batch" else [op]
        started = time.perf_counter()
        if op["op"] == "delete_during":
            answers = [asdict(_delete_during(llm.llm_engine, to_request(op), spec["store_url"], doc_of(op),
                                             op["after_steps"]))]
        else:
            lora_list = [loras[r["lora"]] if r.get("lora") else None for r in batch]
            answers = [asdict(a) for a in generate_many(llm, [to_request(r) for r in batch],
                                                        lora_list if any(lora_list) else None)]
        seconds = time.perf_counter() - started
        after = engine_counters(llm)
        delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
        result = {"answers": answers} if op["op"] == "batch" else {"answer": answers[0]}
        results[op["name"]] = {**result, "counters": delta, "seconds": seconds, "started": started_at}
    return results


def _lora_requests(paths: dict[str, str]) -> dict:
    """One ``LoRARequest`` per adapter name (ids 1, 2, ... in name order)."""
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(sorted(paths.items()), start=1)}


def _embeds(llm, op: dict):
    """Seeded random prompt embeddings for the op's ids (``op["embeds"]``), or None."""
    if not op.get("embeds"):
        return None
    import torch

    model_config = llm.llm_engine.model_config
    gen = torch.Generator().manual_seed(op["embeds"]["seed"])
    rows = torch.randn(len(op["ids"]), model_config.get_hidden_size(), generator=gen) * op["embeds"]["scale"]
    return rows.to(model_config.dtype)


def _abort_after(engine, request: tuple, steps: int, pause_s: float) -> dict:
    """Submit one request, take ``steps`` engine steps (``pause_s`` apart), abort it, run
    until idle."""
    from vllm_kvcdn.connector.wire import report_of

    reports, finished = [], False

    def take(outputs) -> None:
        nonlocal finished
        for out in outputs:
            finished |= out.finished
            if out.kv_transfer_params:
                reports.append(report_of(out.kv_transfer_params) or None)

    req_id = engine.add_request(f"abort-{time.monotonic_ns()}", *request)
    for _ in range(steps):
        time.sleep(pause_s)
        take(engine.step())
    engine.abort_request([req_id], internal=True)
    while engine.has_unfinished_requests():
        take(engine.step())
    return {"reports": reports, "finished_before_abort": finished}


def _delete_during(engine, request: tuple, store_url: str, doc_id: str, steps: int):
    """Submit one request, take ``steps`` engine steps, delete ``doc_id`` from the store
    (as another server's `kvcdn rm` would), run until idle; the request's answer."""
    from vllm_kvcdn.artifact import catalog
    from vllm_kvcdn.store import open_store
    from vllm_kvcdn.testing.offline import _answer

    engine.add_request(f"delete-during-{time.monotonic_ns()}", *request)
    final = None  # the only request in the engine: its finished output
    for _ in range(steps):
        final = next((o for o in engine.step() if o.finished), final)
    store = open_store(store_url)
    catalog.delete_document(store, catalog.get_entry(store, doc_id))
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    return _answer(final)


def run_in_subprocess(spec: dict, workdir: Path, name: str, timeout: float = 900) -> dict:
    """Run ``spec`` in a fresh process (``workdir/name.*`` keep its spec, log and output)."""
    spec_path, out_path, log_path = (workdir / f"{name}{ext}" for ext in (".json", ".out.json", ".log"))
    spec_path.write_text(json.dumps(spec))
    env = {**CPU_ENGINE_ENV, **os.environ, **spec.get("env", {})}  # every engine: the same CPU settings
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "vllm_kvcdn.testing.engine_job", str(spec_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"engine job {name} failed (rc={proc.returncode}), log {log_path}:\n"
                           + log_path.read_text()[-6000:])
    return json.loads(out_path.read_text())


# -- inside the worker process (sent with collective_rpc) --------------------------------

def _settle_probes(worker) -> bool:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().worker_half.costs.wait_for_probes(30.0)


def _install_block_spy(worker) -> None:
    """Keep a copy of the blocks (from position 0) of the connector's last load and save,
    taken when the load has written them and when the save copies them out: once the
    request ends its partial block is free for the next request (e.g. a publish's
    wait_for)."""
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    half = get_kv_transfer_group().worker_half
    half.spied_blocks = {}
    load, copy_out = half.loader.load, half.saver.copy_out

    def snapshot(of: str, block_ids: list[int]) -> None:
        ids = torch.tensor(block_ids, dtype=torch.long)
        half.spied_blocks[of] = [half.layout.blocks(cache).index_select(0, ids) for cache in half.caches]

    def spy_load(spec):
        outcome = load(spec)
        snapshot("load", spec.block_ids)
        return outcome

    def spy_copy_out(spec):
        snapshot("save", spec.block_ids)
        return copy_out(spec)

    half.loader.load, half.saver.copy_out = spy_load, spy_copy_out


def _block_digests(worker, of: str, tokens: int) -> dict:
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    half = get_kv_transfer_group().worker_half
    bs = half.geometry.block_size
    caches = half.spied_blocks[of]  # block i of the copy is the request's i-th block
    block_ids = list(range(caches[0].shape[0]))
    whole = torch.tensor(block_ids[: tokens // bs], dtype=torch.long)
    tail = half.geometry.slots(block_ids, tokens // bs * bs, tokens)

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    return {
        "whole_blocks": len(whole),
        "whole": [digest([cache.index_select(0, whole)]) for cache in caches],
        # back to the cache view's shape (kernel blocks, where they split the manager's)
        "partial": [digest(half.layout.read(cache.flatten(0, cache.dim() - 4), tail)) for cache in caches],
    }


if __name__ == "__main__":
    spec_file, out_file = sys.argv[1], sys.argv[2]
    result = run(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
