"""A store slowed step by step until loading loses: a hit's TTFT against a cold prefill,
with the load-or-recompute planner on (``load_policy=measured``, the default) and off
(``always``) (issue 29).

One engine per policy, in its own process (vLLM's prefix cache and the RAM tier off, so
every hit reads the store; a ``file://`` store whose chunk reads sleep as long as a delay
file says, ``KVCDN_TEST_FAULTS=chunk_get_delay_file``). Per delay step: one request that
learns it (the first read at a new speed pays it), then ``--reps`` measured requests, each
document + a new 16-token question, max_tokens=1. Then the store heals (delay 0) and
requests go on until one loads again: how many it took. The cold prefill is measured on the
same engine (a salt nothing is published under). Goal (issue 29): after learning, a hit's
TTFT is never above cold by more than 10 %.

    python benchmarks/slow_store.py [--shape qwen3-0.6b] [--length 255] [--delays 0,0.2,0.4,0.8,1.6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

POLICIES = ("measured", "always")
HEAL_LIMIT_S = 60.0  # how long requests go on after healing before we give up waiting for loads


def run_phase(spec: dict) -> list[dict]:
    from s3_tiers import QUESTION_LEN, timed, tokens

    from vllm_kvcdn.testing.offline import make_llm

    delay = Path(spec["delay_file"])
    delay.write_text("0")
    length = spec["length"]
    max_len = length + QUESTION_LEN + 64
    llm = make_llm(spec["model"], store_url=spec["store_url"], enable_prefix_caching=False, max_model_len=max_len,
                   max_num_batched_tokens=max_len,
                   extra_config={"ram_tier_gib": 0, "publish_isolation_s": 0, "load_policy": spec["policy"]})
    timed(llm, tokens(64, "warmup"), cache_salt="warmup")
    doc = tokens(length, "doc")
    _, _, report = timed(llm, doc, publish=True)
    assert report.get("document"), report
    asked = iter(range(10**6))

    def ask(**kw) -> tuple[float, bool]:
        ttft, _, report = timed(llm, doc + tokens(QUESTION_LEN, f"q{next(asked)}"), **kw)
        return ttft, bool(report.get("hit"))

    rows = [{"policy": spec["policy"], "delay_s": 0.0, "variant": "cold", "ttft": ask(cache_salt="cold")[0],
             "loaded": False} for _ in range(spec["reps"])]
    for step in spec["delays"]:
        delay.write_text(str(step))
        learn_ttft, learn_loaded = ask()
        rows.append({"policy": spec["policy"], "delay_s": step, "variant": "learning", "ttft": learn_ttft,
                     "loaded": learn_loaded})
        for _ in range(spec["reps"]):
            ttft, loaded = ask()
            rows.append({"policy": spec["policy"], "delay_s": step, "variant": "hit", "ttft": ttft, "loaded": loaded})
    delay.write_text("0")
    healed, n, loaded = time.perf_counter(), 0, False
    while not loaded and time.perf_counter() - healed < HEAL_LIMIT_S:
        ttft, loaded = ask()
        n += 1
    rows.append({"policy": spec["policy"], "delay_s": 0.0, "variant": "healed", "ttft": ttft, "loaded": loaded,
                 "requests_to_resume": n if loaded else None,
                 "seconds_to_resume": round(time.perf_counter() - healed, 3) if loaded else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", help="tiny_model shape (qwen3-0.6b: its real prefill cost)")
    ap.add_argument("--model", help="model directory (default: generate --shape)")
    ap.add_argument("--length", type=int, default=255, help="document tokens")
    ap.add_argument("--delays", default="0,0.2,0.4,0.8,1.6", help="seconds each chunk read sleeps, step by step")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from report import run_child, spawn_child, write_report

    if run_child(args.child, run_phase):
        return

    from vllm_kvcdn.defaults import TEST_FAULTS_ENV, cpu_engine_env
    from vllm_kvcdn.testing.tiny_model import make_model

    work = Path(tempfile.mkdtemp(prefix="slow-store-"))
    model = args.model or make_model(work / args.shape, args.shape, seed=0)
    delays = [float(x) for x in args.delays.split(",")]
    rows = []
    for policy in args.policies.split(","):
        delay_file = work / f"delay-{policy}"
        spec = {"model": str(model), "store_url": f"file://{work / f'store-{policy}'}", "length": args.length,
                "delays": delays, "reps": args.reps, "policy": policy, "delay_file": str(delay_file)}
        env = {**os.environ, **cpu_engine_env(), TEST_FAULTS_ENV: f"chunk_get_delay_file={delay_file}"}
        print(f"[slow-store] policy {policy}: running (log {work / policy}.log) ...", flush=True)
        rows += spawn_child(__file__, spec, work, policy, env)
    table = summarize(rows)
    for row in table:
        print(f"[slow-store] {row['policy']:>8} delay {row['delay_s']:.2f}s: hit {row['hit_s']:.3f}s "
              f"({row['loaded']}), cold {row['cold_s']:.3f}s, x{row['vs_cold']:.2f}")

    def plot(ax):
        for policy in dict.fromkeys(r["policy"] for r in table):
            pts = [r for r in table if r["policy"] == policy]
            ax.plot([r["delay_s"] for r in pts], [r["hit_s"] for r in pts], marker="o", label=f"hit, {policy}")
        ax.plot([r["delay_s"] for r in table], [r["cold_s"] for r in table], linestyle="--", color="gray",
                label="cold prefill")
        ax.set_xlabel("seconds per chunk read (store slowed)")
        ax.set_ylabel("TTFT (s)")
        ax.legend(fontsize=8)

    healed = {r["policy"]: (r.get("requests_to_resume"), r.get("seconds_to_resume")) for r in rows
              if r["variant"] == "healed"}
    path = write_report(
        args.out, f"slow_store_{args.shape}", title=f"A slowed store: hit vs cold ({args.shape}, {args.length} tokens)",
        rows=table, plot=plot, extra={"raw": rows, "requests_to_resume": healed},
        columns=[("policy", "policy"), ("delay_s", "s per chunk read"), ("hit_s", "hit TTFT (s)"),
                 ("loaded", "loaded?"), ("learning_s", "learning request (s)"), ("cold_s", "cold (s)"),
                 ("vs_cold", "hit / cold"), ("goal", "goal: hit <= 1.1 x cold")],
        notes=f"Document of {args.length} tokens + 16-token question, max_tokens=1, medians of {args.reps} after one "
              f"learning request per step; vLLM's prefix cache and the RAM tier off; cold measured on the same "
              f"engine. After healing, loads resumed after (requests, seconds) {healed}: the store's probe "
              f"in flight when it healed ends, then two fast ones outvote the slow reads.")
    print(f"[slow-store] wrote {path}")


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        cold = statistics.median(r["ttft"] for r in mine if r["variant"] == "cold")
        for step in dict.fromkeys(r["delay_s"] for r in mine if r["variant"] == "hit"):
            hits = [r for r in mine if r["variant"] == "hit" and r["delay_s"] == step]
            learning = next(r for r in mine if r["variant"] == "learning" and r["delay_s"] == step)
            hit = statistics.median(r["ttft"] for r in hits)
            loaded = sum(r["loaded"] for r in hits)
            table.append({"policy": policy, "delay_s": step, "hit_s": hit,
                          "loaded": f"{loaded}/{len(hits)} loaded" if loaded else "recomputed",
                          "learning_s": learning["ttft"], "cold_s": cold, "vs_cold": hit / cold,
                          "goal": "met" if hit <= 1.1 * cold else "not met"})
    return table


if __name__ == "__main__":
    main()
