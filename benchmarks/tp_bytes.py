"""Are a document's KV bytes the same under tensor parallelism? (issue 28: whether TP=1 and
TP=2 artifacts may be shared decides whether the TP size goes into the compute profile.)

Plain vLLM on the CPU build, no connector: one engine per variant, in its own process,
prefills the same document (whole blocks, ``max_tokens=1``, so only the prompt is in the
cache) and hands back each rank's KV blocks. A fresh engine's first request gets blocks
1..n (block 0 is vLLM's null block); that the blocks are the document's is checked, not
assumed: the TP=1 engine's blocks must be bit-equal across two runs, and under TP each
rank's blocks must match the TP=1 engine's head slice wherever the compute agrees (layer
0's K and V depend on no all-reduce). Variants: TP=1 on one OpenMP thread and on two, TP=2
(one thread per rank, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``). Rank r of TP=2 holds the KV
heads ``[r * H/2, (r + 1) * H/2)`` (vLLM's ``get_num_kv_heads`` with H divisible by 2; a
replicated head is not tested here).

    python benchmarks/tp_bytes.py [--shape tiny|qwen3-0.6b] [--tokens 512]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {  # name: (tensor_parallel_size, VLLM_CPU_OMP_THREADS_BIND)
    "tp1_1thread": (1, "0"),
    "tp1_1thread_again": (1, "0"),
    "tp1_2threads": (1, "0-1"),
    "tp2": (2, "0|1"),
}


def _blocks(worker, num_blocks: int):
    """This rank's KV blocks 1..num_blocks, per layer (inside the worker process)."""
    caches = worker.model_runner.kv_caches
    return [c[1 : num_blocks + 1].clone() for c in caches]


def engine_phase(model: str, tp: int, tokens: int, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, tensor_parallel_size=tp, distributed_executor_backend="mp", enforce_eager=True,
              max_model_len=tokens + 16, gpu_memory_utilization=0.3, enable_prefix_caching=True)
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    ids = [(7919 * i + 11) % vocab for i in range(tokens)]  # the same document in every variant
    llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    assert tokens % block_size == 0, "whole blocks only: a partial block's free slots hold nothing comparable"
    per_rank = llm.collective_rpc(_blocks, args=(tokens // block_size,))
    import torch

    torch.save(per_rank, out)


def compare(runs: dict, num_kv_heads: int) -> list[dict]:
    """Per variant and layer: bit-equal to TP=1 (one thread)? and the max |difference|."""
    import torch

    ref = runs["tp1_1thread"][0]  # rank 0 of the one-rank engine: all heads
    rows = []
    for name, ranks in runs.items():
        if name == "tp1_1thread":
            continue
        heads = num_kv_heads // len(ranks)
        for layer in range(len(ref)):
            equal, worst = True, 0.0
            for r, rank in enumerate(ranks):
                mine, theirs = rank[layer], ref[layer][:, r * heads : (r + 1) * heads]
                equal &= torch.equal(mine.view(torch.int16), theirs.contiguous().view(torch.int16))
                worst = max(worst, (mine.float() - theirs.float()).abs().max().item())
            rows.append({"variant": name, "layer": layer, "bit_equal": equal, "max_abs_diff": worst})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", help="tiny (the test model) or a Qwen3 shape: qwen3-0.6b")
    parser.add_argument("--model", default=None, help="a model dir (default: generated for --shape)")
    parser.add_argument("--tokens", type=int, default=512, help="document length, whole 128-token blocks")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--_phase", nargs=4, metavar=("MODEL", "TP", "TOKENS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._phase:
        model, tp, tokens, out = args._phase
        return engine_phase(model, int(tp), int(tokens), out)

    import json

    import torch
    from report import write_report

    from vllm_kvcdn.defaults import cpu_engine_env

    work = Path(tempfile.mkdtemp(prefix="tp-bytes-"))
    model = args.model
    if model is None:
        from vllm_kvcdn.testing.tiny_model import make_model

        model = str(make_model(work / args.shape, args.shape, seed=0))
    num_kv_heads = json.loads((Path(model) / "config.json").read_text())["num_key_value_heads"]
    runs = {}
    for name, (tp, bind) in VARIANTS.items():
        out = work / f"{name}.pt"
        env = {**os.environ, **cpu_engine_env(), "VLLM_CPU_OMP_THREADS_BIND": bind,
               "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # collective_rpc of our own function
        log = work / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--_phase", model, str(tp), str(args.tokens), str(out)],
                                  env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
        if proc.returncode:
            raise SystemExit(f"{name} failed; log {log}:\n{log.read_text()[-3000:]}")
        runs[name] = torch.load(out)
        print(f"[tp-bytes] {name}: {len(runs[name])} rank(s), {len(runs[name][0])} layers")
    if not all(torch.equal(a, b) for a, b in zip(runs["tp1_1thread"][0], runs.pop("tp1_1thread_again")[0])):
        raise SystemExit("the one-rank engine's blocks differ between two runs: these are not the document's blocks")
    rows = compare(runs, num_kv_heads)
    layer0 = [r for r in rows if r["layer"] == 0 and r["variant"] == "tp2"]
    if not layer0[0]["bit_equal"]:
        print("[tp-bytes] note: layer 0 differs under TP too (the k/v projections' GEMM tiling), not only "
              "layers after an all-reduce")
    summary = [{"variant": name, "layers": sum(1 for r in rows if r["variant"] == name),
                "bit_equal_layers": sum(r["bit_equal"] for r in rows if r["variant"] == name),
                "max_abs_diff": max(r["max_abs_diff"] for r in rows if r["variant"] == name)}
               for name in dict.fromkeys(r["variant"] for r in rows)]
    for s in summary:
        print(f"[tp-bytes] {s['variant']}: {s['bit_equal_layers']}/{s['layers']} layers bit-equal to TP=1 "
              f"(one thread), max |diff| {s['max_abs_diff']:.3g}")

    def plot(ax):
        for name in dict.fromkeys(r["variant"] for r in rows):
            pts = [(r["layer"], r["max_abs_diff"]) for r in rows if r["variant"] == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel("max |KV difference| vs TP=1, one thread")
        ax.legend()

    path = write_report(
        args.out, f"tp_bytes_{args.shape}", title=f"KV bytes under tensor parallelism, {args.shape} (vLLM CPU)",
        rows=summary, columns=[("variant", "variant"), ("bit_equal_layers", "layers bit-equal"),
                               ("layers", "layers"), ("max_abs_diff", "max abs diff")],
        notes=f"One {args.tokens}-token document, prefilled alone by plain vLLM (eager); each rank's KV blocks "
              "compared with the one-rank engine's head slice, one OpenMP thread. tp1_2threads: the same engine "
              "on two threads (the thread count alone). tp2: two ranks, one thread each.",
        extra={"per_layer": rows}, plot=plot)
    print(f"[tp-bytes] wrote {path}")


if __name__ == "__main__":
    main()
