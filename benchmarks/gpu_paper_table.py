"""The paper's table on a server GPU, through the transformers path (the paper's "future work").

Needs torch, transformers, safetensors, xxhash and this repository only (what the lent GPU
machine has: no vLLM). A Qwen3-4B-shaped model with seeded random weights (generated here by
``vllm_kvcdn.testing.tiny_model``: the real shape, so the real compute and KV bytes), in bf16, run by
``vllm_kvcdn.hf.HFKVCDN``, which publishes and loads our artifacts:

- exactness: a published document and a question over it, answered from the loaded artifact
  and from a full prefill: greedy tokens in agreement (of ``--new-tokens``) and the max |logit
  difference| of the next token (same attention kernels both ways);
- the table, per document length L (+ a 16-token question): ``prefill`` (the whole prompt),
  ``reuse`` (one step over the question with the document's KV already on the GPU: the paper's
  GENERATEFROMKV step), ``hit_ram`` (the document's KV copied from pinned host RAM into a fresh
  cache, then that step) and ``hit_store`` (the same from our artifact in a local file store:
  read, verify, decode, copy, step). Medians of ``--reps`` after one warm-up.

    python benchmarks/gpu_paper_table.py                          # CUDA, Qwen3-4B shape, 255..32768 tokens
    python benchmarks/gpu_paper_table.py --device cpu --shape tiny --lengths 255,300 --reps 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.report import write_report  # noqa: E402

QUESTION_TOKENS = 16
# The paper's measured table (Qwen3-4B fp16, Apple M1 Pro): prefill s, reuse step s.
PAPER = {255: (0.67, 0.078), 485: (1.29, 0.093), 945: (2.65, 0.122), 1888: (5.81, 0.179), 3774: (14.71, 0.296)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, reps: int, device: torch.device, after=None) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up; ``after()`` runs untimed."""
    times = []
    for rep in range(reps + 1):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        if rep:
            times.append(time.perf_counter() - started)
        if after is not None:
            after()
    return statistics.median(times)


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()  # past the special tokens


@torch.inference_mode()
def exactness(kv, length: int, new_tokens: int) -> dict:
    vocab = kv.model.config.vocab_size
    doc = random_tokens(length, vocab, seed=1)
    prompt = doc + random_tokens(QUESTION_TOKENS, vocab, seed=2)
    manifest = kv.publish(doc)
    hit = kv.generate(prompt, doc_id=manifest.doc_id, max_new_tokens=new_tokens).token_ids
    ids = torch.tensor([prompt], device=kv.device)
    cold = kv.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=kv.tokenizer.pad_token_id)[0, len(prompt):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(hit, cold)) if a != b), min(len(hit), len(cold)))
    diff = (kv.next_token_logits(prompt, doc_id=manifest.doc_id) - kv.next_token_logits(prompt, use_artifact=False))
    return {"length": length, "loaded_tokens": length, "greedy_agree": agree, "new_tokens": new_tokens,
            "max_logit_diff": float(diff.abs().max())}


@torch.inference_mode()
def table_row(kv, length: int, reps: int) -> dict:
    from transformers import DynamicCache

    device, model, cfg = kv.device, kv.model, kv.model.config
    doc = random_tokens(length, cfg.vocab_size, seed=length)
    prompt = doc + random_tokens(QUESTION_TOKENS, cfg.vocab_size, seed=length + 1)
    full = torch.tensor([prompt], device=device)
    question = full[:, length:]
    mask = torch.ones_like(full)

    prefill = median_time(lambda: model(full, use_cache=True, logits_to_keep=1), reps, device)

    cache = model(full[:, :length], use_cache=True, logits_to_keep=1).past_key_values
    reuse = median_time(lambda: model(question, past_key_values=cache, attention_mask=mask, logits_to_keep=1),
                        reps, device, after=lambda: cache.crop(-QUESTION_TOKENS))  # back to the document

    pin = device.type == "cuda"
    host = [(layer.keys.cpu().pin_memory() if pin else layer.keys.cpu(),
             layer.values.cpu().pin_memory() if pin else layer.values.cpu()) for layer in cache.layers]
    cache = None  # the GPU copy goes: the hits below build their own

    def hit_from_ram():
        fresh = DynamicCache(config=cfg)
        for i, (k, v) in enumerate(host):
            fresh.update(k.to(device, non_blocking=True), v.to(device, non_blocking=True), i)
        model(question, past_key_values=fresh, attention_mask=mask, logits_to_keep=1)

    hit_ram = median_time(hit_from_ram, reps, device)
    manifest = kv.publish(doc)
    hit_store = median_time(lambda: kv.next_token_logits(prompt, doc_id=manifest.doc_id), reps, device)
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in host)
    row = {"length": length, "prefill_s": prefill, "reuse_s": reuse, "reuse_x": prefill / reuse,
           "hit_ram_s": hit_ram, "hit_ram_x": prefill / hit_ram, "hit_store_s": hit_store,
           "hit_store_x": prefill / hit_store, "kv_mb": kv_bytes / 1e6}
    if length in PAPER:
        row["paper_x"] = PAPER[length][0] / PAPER[length][1]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="qwen3-4b", help="a vllm_kvcdn.testing.tiny_model shape (tiny for a smoke run)")
    p.add_argument("--lengths", default="255,485,945,1888,3774,8192,32768")
    p.add_argument("--exactness-length", type=int, default=945)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--attn", default="sdpa", help="transformers attention (eager runs out of memory at 32k tokens)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "kvcdn" / "gpu_paper_table"),
                   help="model and store directory")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu --shape tiny for a smoke run")

    from vllm_kvcdn.hf import HFKVCDN
    from vllm_kvcdn.testing.tiny_model import make_model

    work = Path(args.work)
    model_dir = work / args.shape
    if not (model_dir / "config.json").exists():
        print(f"[gpu-table] writing a {args.shape}-shaped model (random weights) to {model_dir} ...", flush=True)
        make_model(model_dir, args.shape)
    kv = HFKVCDN(str(model_dir), store_url=f"file://{work / 'store'}", device=args.device,
                 attn_implementation=args.attn)
    exact = exactness(kv, args.exactness_length, args.new_tokens)
    print(f"[gpu-table] exactness: {exact}", flush=True)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows.append(table_row(kv, length, args.reps))
        print(f"[gpu-table] {rows[-1]}", flush=True)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU smoke run)"
    try:
        import matplotlib  # noqa: F401

        def plot(ax):
            xs = [r["length"] for r in rows]
            for key, label in [("reuse_x", "prefill / reuse step"), ("hit_ram_x", "prefill / hit from pinned RAM"),
                               ("hit_store_x", "prefill / hit from the file store")]:
                ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
            paper = [r for r in rows if "paper_x" in r]
            ax.plot([r["length"] for r in paper], [r["paper_x"] for r in paper], "k--", label="paper (M1 Pro)")
            ax.set_xscale("log")
            ax.set_xlabel("document tokens")
            ax.set_ylabel("speedup over prefill")
            ax.legend(fontsize=8)
    except ImportError:
        plot = None
    write_report(
        args.out, f"gpu_paper_table_{args.shape}_{device.type}",
        title=f"The paper's table on {gpu}, {args.shape} shape (random weights), bf16, transformers {args.attn}",
        rows=rows, plot=plot, extra={"gpu": gpu, "exactness": exact, "args": vars(args)},
        columns=[("length", "doc tokens"), ("prefill_s", "prefill s"), ("reuse_s", "reuse step s"),
                 ("reuse_x", "x"), ("paper_x", "paper x"), ("hit_ram_s", "hit, pinned RAM s"), ("hit_ram_x", "x"),
                 ("hit_store_s", "hit, file store s"), ("hit_store_x", "x"), ("kv_mb", "KV MB")],
        notes=f"Exactness at {exact['length']} tokens: {exact['greedy_agree']}/{exact['new_tokens']} greedy tokens "
              f"agree with a full prefill, max |logit diff| {exact['max_logit_diff']:.3g}.",
    )


if __name__ == "__main__":
    main()
