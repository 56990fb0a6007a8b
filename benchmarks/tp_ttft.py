"""A hit's TTFT under tensor parallelism: TP=2 against TP=1 on the same two cores, from the
same kind of store (issue 28).

Per TP size, one engine in its own process (``--shape kv-0.6b``: Qwen3-0.6B's KV bytes per
token, a small MLP so prefill is quick on this CPU; vLLM's prefix cache off, so every hit
comes through kvcdn) publishes each document to a fresh ``file://`` store and then serves,
per document length L: a cold prefill of document + question, a first read (the
document's chunks from the store: under TP=2 each rank reads its own part, half the bytes)
and ``--reps`` hot hits (each rank's RAM tier). TP=1 runs on both cores
(``VLLM_CPU_OMP_THREADS_BIND=0-1``), TP=2 one core per rank (``0|1``): the same cores, as a
fleet would give a model one GPU or two. A TP=2 artifact is not a TP=1 artifact (the TP
size is in the fingerprint): each engine reads what it published. Every hit is checked
with vLLM's counters (only the question computed).

    python benchmarks/tp_ttft.py [--lengths 945,3774] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {1: "0-1", 2: "0|1"}  # tensor_parallel_size: VLLM_CPU_OMP_THREADS_BIND


def run_phase(spec: dict) -> list[dict]:
    from s3_tiers import COMPUTED, QUESTION_LEN, timed, tokens

    from vllm_kvcdn.testing.offline import make_llm

    lengths, tp = spec["lengths"], spec["tp"]
    max_len = max(lengths) + QUESTION_LEN + 64
    llm = make_llm(spec["model"], store_url=spec["store_url"], enable_prefix_caching=False, max_model_len=max_len,
                   max_num_batched_tokens=max_len, tensor_parallel_size=tp, distributed_executor_backend="mp",
                   extra_config={"ram_tier_gib": 2.0, "disk_cache_gib": 0, "publish_isolation_s": 0})
    timed(llm, tokens(64, "warmup"), cache_salt="warmup")
    rows = []
    for length in lengths:
        doc = tokens(length, f"doc{length}")
        _, _, report = timed(llm, doc, publish=True)
        assert report.get("document"), report
        ttft, d, _ = timed(llm, doc + tokens(QUESTION_LEN, "cold"), cache_salt="nothing-published-here")
        rows.append({"tp": tp, "L": length, "variant": "cold prefill", "ttft": ttft, "read_mb": 0.0,
                     "ok": d.get(COMPUTED) == length + QUESTION_LEN})
        for variant, reps in (("hit, first read", 1), ("hit, RAM tier", spec["reps"])):
            for rep in range(reps):
                ttft, d, report = timed(llm, doc + tokens(QUESTION_LEN, f"{variant}{rep}"))
                rows.append({"tp": tp, "L": length, "variant": variant, "ttft": ttft,
                             "read_mb": d.get("vllm:kvcdn_store_read_bytes", 0) / tp / 1e6,  # per rank
                             "ok": report.get("loaded_tokens") == length and d.get(COMPUTED) == QUESTION_LEN})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="kv-0.6b", help="tiny_model shape (kv-0.6b: Qwen3-0.6B's KV bytes)")
    ap.add_argument("--model", help="model directory (default: generate --shape)")
    ap.add_argument("--lengths", default="945,3774")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from report import run_child, spawn_child, write_report

    if run_child(args.child, run_phase):
        return


    from vllm_kvcdn.defaults import cpu_engine_env
    from vllm_kvcdn.testing.tiny_model import make_model

    work = Path(tempfile.mkdtemp(prefix="tp-ttft-"))
    model = args.model or make_model(work / args.shape, args.shape, seed=0)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for tp, bind in VARIANTS.items():
        spec = {"model": str(model), "store_url": f"file://{work / f'store-tp{tp}'}", "lengths": lengths, "tp": tp,
                "reps": args.reps}
        env = {**os.environ, **cpu_engine_env(), "VLLM_CPU_OMP_THREADS_BIND": bind}
        rows += spawn_child(__file__, spec, work, f"tp{tp}", env)
        print(f"[tp-ttft] TP={tp} done")
    if not all(r["ok"] for r in rows):
        raise SystemExit(f"a hit did not load the whole document, or computed more than the question: {rows}")
    table = []
    for (tp, length, variant) in dict.fromkeys((r["tp"], r["L"], r["variant"]) for r in rows):
        runs = [r for r in rows if (r["tp"], r["L"], r["variant"]) == (tp, length, variant)]
        table.append({"tp": tp, "L": length, "variant": variant, "ttft_s": statistics.median(r["ttft"] for r in runs),
                      "read_mb_per_rank": runs[0]["read_mb"], "runs": len(runs)})
    for row in table:
        print(f"[tp-ttft] TP={row['tp']} L={row['L']} {row['variant']}: {row['ttft_s']:.3f} s, "
              f"{row['read_mb_per_rank']:.0f} MB read per rank")

    def plot(ax):
        for tp in VARIANTS:
            for variant in dict.fromkeys(r["variant"] for r in table):
                pts = [(r["L"], r["ttft_s"]) for r in table if r["tp"] == tp and r["variant"] == variant]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"TP={tp} {variant}")
        ax.set_xlabel("document tokens")
        ax.set_ylabel("TTFT (s)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)

    path = write_report(
        args.out, f"tp_ttft_{args.shape}", title=f"A hit's TTFT, TP=2 vs TP=1 on the same cores ({args.shape}, CPU)",
        rows=table, columns=[("tp", "TP"), ("L", "doc tokens"), ("variant", "variant"), ("ttft_s", "TTFT (s)"),
                             ("read_mb_per_rank", "MB read / rank"), ("runs", "runs")],
        notes="Document + 16-token question, max_tokens=1, vLLM's prefix cache off; medians. TP=1 on two cores, "
              "TP=2 one core per rank. First read: the file store (page cache) through the disk-less path; RAM "
              "tier: each rank's own.", plot=plot)
    print(f"[tp-ttft] wrote {path}")


if __name__ == "__main__":
    main()
