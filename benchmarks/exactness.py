"""Where a hit's last bits come from, and the exactness contract, measured (README "Exactness").

Part 1, the kernel (vLLM's CPU attention op alone, random Q/K/V with the model's head shape,
this process's threads): for a document of L tokens and a 16-token question,
  (A) document rows computed alone (the span [0, L)) vs inside the span [0, L+16);
  (B) question rows computed in the span [L, L+16) (a hit) vs inside [0, L+16) (cold).
Part 2, the engine (the model, every engine a fresh process, same thread setup):
  (A) the document's KV as a publish computes it (the document alone) vs the same positions
      when document and question are computed in one pass (both read back from the store);
  (B) a kvcdn hit and vLLM's own prefix-cache hit against a cold single-pass prefill (greedy
      agreement over --new-tokens, max |logprob diff| while both agree), and the hit against
      plain vLLM computing the document first, in a step of its own (level 2: identical?).

    python benchmarks/exactness.py [--shape tiny|qwen3-0.6b] [--lengths 256,512,700,945]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QUESTION_LEN = 16
HEAD_SHAPES = {"tiny": (4, 2, 64), "qwen3-0.6b": (16, 8, 128), "qwen3-4b": (32, 8, 128)}  # q heads, kv heads, dim


def tokens(n: int, seed: str) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 500) for _ in range(n)]


# -- part 1: the kernel -----------------------------------------------------------------------


def kernel_rows(lengths: list[int]) -> list[dict]:
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    # Linux lets a process run AMX tile instructions only after it asks (vLLM's CPU worker
    # does); the op picks the "amx" ISA where the CPU has it, and faults (SIGILL) without.
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
    rows = []
    for shape, (heads, kv_heads, dim) in HEAD_SHAPES.items():
        torch.manual_seed(0)
        block = 128
        isa = _get_attn_isa(torch.bfloat16, block, dim, "auto")
        total = max(lengths) + QUESTION_LEN
        num_blocks = total // block + 1
        cache = torch.zeros(num_blocks, kv_heads, block, 2 * dim, dtype=torch.bfloat16)
        k_cache, v_cache = cache.view(num_blocks, kv_heads, 2 * block, dim).chunk(2, dim=2)
        q, k, v = (torch.randn(total, h, dim).bfloat16() for h in (heads, kv_heads, kv_heads))
        ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, torch.arange(total), isa)
        table = torch.arange(num_blocks, dtype=torch.int32).view(1, -1)

        def attend(start: int, end: int):
            n = end - start
            out = torch.empty(n, heads, dim, dtype=torch.bfloat16)
            loc, seq = torch.tensor([0, n], dtype=torch.int32), torch.tensor([end], dtype=torch.int32)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, seq_lens=seq,
                dtype=torch.bfloat16, query_start_loc=loc, causal=True, sliding_window_size=-1, isa=isa,
                enable_kv_split=True, kv_cache_dtype="auto")
            ops.cpu_attention_with_kv_cache(
                query=q[start:end], key_cache=k_cache, value_cache=v_cache, output=out, query_start_loc=loc,
                seq_lens=seq, scale=dim**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=table, softcap=0, scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
                k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            return out.float()

        for n in lengths:
            one_pass = attend(0, n + QUESTION_LEN)
            rows.append({
                "shape": shape, "isa": isa, "threads": torch.get_num_threads(), "L": n,
                "doc_rows_diff": (attend(0, n) - one_pass[:n]).abs().max().item(),
                "question_rows_diff": (attend(n, n + QUESTION_LEN) - one_pass[n:]).abs().max().item(),
            })
    return rows


# -- part 2: the engine -----------------------------------------------------------------------


def engine_rows(model: str, lengths: list[int], new_tokens: int, work: Path) -> list[dict]:
    from vllm_kvcdn.testing.engine_job import run_in_subprocess
    from vllm_kvcdn.testing.exactness import agreement, identical, max_logprob_diff

    store = f"file://{work / 'store'}"
    docs = {n: tokens(n, f"doc-{n}") for n in lengths}
    prompts = {n: docs[n] + tokens(QUESTION_LEN, f"q-{n}") for n in lengths}

    def query(name, ids, salt=None, max_tokens=new_tokens):
        return {"name": name, "op": "query", "ids": ids, "salt": salt, "max_tokens": max_tokens}

    common = {"model": model, "engine_args": {"max_model_len": max(lengths) + QUESTION_LEN + new_tokens + 64}}
    print("[exactness] publishing (each document alone, and with its question in one pass) ...", flush=True)
    pub = run_in_subprocess({**common, "store_url": store, "prefix_caching": False, "ops": [
        op for n in lengths for op in (
            {"name": f"alone_{n}", "op": "publish", "ids": docs[n]},
            {"name": f"within_{n}", "op": "publish", "ids": prompts[n], "salt": "within"})]}, work, "publish")
    print("[exactness] plain vLLM: cold prefills, then its prefix cache holding each document ...", flush=True)
    vllm_ops = []
    for n in lengths:
        vllm_ops += [query(f"cold_{n}", prompts[n], salt=f"cold-{n}"),
                     query(f"warm_{n}", docs[n], salt=f"own-{n}", max_tokens=1),
                     query(f"own_{n}", prompts[n], salt=f"own-{n}")]
    plain = run_in_subprocess({**common, "store_url": None, "prefix_caching": True, "ops": vllm_ops}, work, "vllm")
    print("[exactness] kvcdn hits in a fresh engine ...", flush=True)
    hits = run_in_subprocess({**common, "store_url": store, "prefix_caching": False,
                              "ops": [query(f"hit_{n}", prompts[n]) for n in lengths]}, work, "hits")
    rows = []
    for n in lengths:
        print(f"[exactness] plain vLLM computing the {n}-token document in a step of its own ...", flush=True)
        step = run_in_subprocess({**common, "store_url": None, "prefix_caching": False,
                                  "engine_args": {**common["engine_args"], "max_num_batched_tokens": n},
                                  "ops": [query("step", prompts[n])]}, work, f"doc-step-{n}")["step"]["answer"]
        alone, within = (pub[f"{kind}_{n}"]["answer"]["kvcdn"]["document"] for kind in ("alone", "within"))
        hit, cold, own = hits[f"hit_{n}"]["answer"], plain[f"cold_{n}"]["answer"], plain[f"own_{n}"]["answer"]
        common_agree = min(agreement(hit, cold), agreement(own, cold))
        rows.append({
            "L": n, **kv_difference(work / "store", alone, within, n),
            "hit_agree": agreement(hit, cold), "hit_diff": max_logprob_diff(hit, cold, common_agree),
            "own_cache_agree": agreement(own, cold), "own_cache_diff": max_logprob_diff(own, cold, common_agree),
            "hit_equals_doc_step": identical(hit, step),
            "hit_computed": hits[f"hit_{n}"]["counters"].get("vllm:request_prefill_kv_computed_tokens"),
        })
    return rows


def kv_difference(store: Path, alone: str, within: str, n: int) -> dict:
    """Per-layer K/V of the first ``n`` positions of two published documents, compared."""
    import torch

    from vllm_kvcdn.artifact import catalog
    from vllm_kvcdn.artifact.chunk_format import decode_chunk
    from vllm_kvcdn.store import open_store
    from vllm_kvcdn.store.keys import chunk_object_key

    fs = open_store(f"file://{store}")

    def layers(doc_id: str) -> list[torch.Tensor]:
        chunks = [decode_chunk(fs.get(chunk_object_key(c.key))) for c in catalog.get_manifest(fs, doc_id).chunks]
        return [torch.cat([torch.stack([c.keys[i], c.values[i]], 1) for c in chunks])[:n].float()
                for i in range(len(chunks[0].keys))]

    diffs = [(a - b).abs() for a, b in zip(layers(alone), layers(within))]
    rows_differing = torch.stack([d.flatten(1).amax(1) > 0 for d in diffs]).any(0)
    return {"kv_max_diff": max(d.max().item() for d in diffs), "kv_positions_differing": int(rows_differing.sum()),
            "kv_layers_differing": sum(int(d.max() > 0) for d in diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: generate --shape under ~/.cache/kvcdn)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b", "qwen3-4b"])
    parser.add_argument("--lengths", default="256,512,700,945")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    from paper_table import ensure_model
    from report import write_report

    from vllm_kvcdn.defaults import set_cpu_env

    set_cpu_env()
    lengths = [int(x) for x in args.lengths.split(",")]
    model = args.model or str(ensure_model(args.shape))
    kernel = kernel_rows(lengths)
    write_report(args.out, "exactness_kernel", title="vLLM CPU attention: does a row depend on its step's span?",
                 rows=kernel, columns=[("shape", "head shape"), ("isa", "attn ISA"), ("threads", "threads"),
                                       ("L", "L"), ("doc_rows_diff", "(A) doc rows: alone vs in [0, L+16)"),
                                       ("question_rows_diff", "(B) question rows: [L, L+16) vs [0, L+16)")],
                 notes="Max |difference| of attention outputs (bf16) for the same rows computed in two spans.")
    work = Path(tempfile.mkdtemp(prefix="kvcdn-exactness-"))
    rows = engine_rows(model, lengths, args.new_tokens, work)

    def plot(ax):
        ax.plot(lengths, [max(r["own_cache_diff"], 1e-6) for r in rows], "s-", label="vLLM prefix cache vs cold")
        ax.plot(lengths, [max(r["hit_diff"], 1e-6) for r in rows], "o:", markersize=10, fillstyle="none",
                label="kvcdn hit vs cold")
        ax.plot(lengths, [max(r["kv_max_diff"], 1e-6) for r in rows], "^--",
                label="(A) document KV: alone vs in one pass")
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.set_ylabel("max |difference| (0 drawn at 1e-6)")
        ax.legend(fontsize=8)

    path = write_report(
        args.out, f"exactness_{args.shape}", title=f"Exactness on vLLM CPU, {args.shape}-shaped model",
        rows=rows, plot=plot, extra={"kernel": kernel, "new_tokens": args.new_tokens},
        columns=[("L", "L"), ("kv_max_diff", "(A) doc KV max |diff|"), ("kv_positions_differing", "positions"),
                 ("kv_layers_differing", "layers"), ("hit_agree", "hit: greedy agree"), ("hit_diff", "hit |dlogprob|"),
                 ("own_cache_agree", "vLLM cache: agree"), ("own_cache_diff", "vLLM cache |dlogprob|"),
                 ("hit_equals_doc_step", "hit == vLLM doc-first step"), ("hit_computed", "hit: tokens computed")],
        notes=f"Prompt = L random document tokens + {QUESTION_LEN} question tokens; {args.new_tokens} greedy tokens. "
              "|dlogprob| is the max over the tokens where both the hit and vLLM's cache still follow the cold "
              "prefill. (A) compares a publish of the document alone with a publish of document + question.")
    print(path.read_text())


if __name__ == "__main__":
    main()
