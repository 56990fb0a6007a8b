"""Does store I/O stall the engine? In-step (``async_io: false``) vs background I/O, side by side.

One run, one engine per mode, alternating: the engine core runs in this process and is
stepped by the script, which stamps every token as it appears; the worker runs in its own
process with its OpenMP threads bound by vLLM's executor, as ``vllm serve`` runs it. vLLM's prefix caching is
off (every hit comes through kvcdn) and publishes share steps (``publish_isolation_s: 0``)
so both modes see the same batches. The store is a local directory behind a wrapper that
sleeps ``--get-delay-s`` before each chunk read (``store/latency.py``: a remote store's
round trip). Phases, each with N requests decoding throughout:

- ``decode``: nothing else (no store I/O): the decoders' inter-token latency (ITL);
- ``load``: a request hitting a published L-token document arrives (its first read, over
  the slowed store): ITL until its first token, and its TTFT;
- ``hot``: the same request again, its chunks now in the worker's RAM tier: the same run
  with no store I/O (the request's own question step is in both; only the reads differ);
- ``compute``: an L-token document arrives as a plain request (the publish's compute, no
  write): ITL until its first token;
- ``publish``: that document published: ITL until its result is back.

Then, alone and from local files (no delay), a hit's TTFT at each ``--ttft-lengths``: with
the RAM tier off (every read from the files; median of ``--ttft-reads``), then with it (the
reads after the first come from RAM), each after one warm-up hit on another document (an
engine's first step that attends over loaded context pays a one-time setup, whichever
the I/O mode).

    python benchmarks/async_io.py [--shape kv-0.6b] [--doc-tokens 2048] [--decoders 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_kvcdn.defaults import cpu_engine_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = {"in-step": False, "background": True}
PHASES = ("decode", "load", "hot", "compute", "publish")
# Engine settings of each run: it measures loads, the phases' over a store slowed on purpose.
ALWAYS = {"load_policy": "always"}
RUNS = {"phases": ALWAYS, "files": {**ALWAYS, "ram_tier_gib": 0}, "ram": ALWAYS}


VOCAB = 500  # token ids drawn from [3, VOCAB): inside every shape's vocabulary


def _tokens(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


class Stepper:
    """Steps an in-process engine and stamps each request's tokens."""

    def __init__(self, engine):
        self.engine = engine
        self.stamps: dict[str, list[float]] = {}
        self.reports: dict[str, dict] = {}
        self.done: set[str] = set()
        self.internal: dict[str, str] = {}
        self._n = 0

    def add(self, prompt_ids: list[int], ignore_eos: bool = False, **kw) -> str:
        from vllm_kvcdn.testing.offline import request

        self._n += 1
        req_id = f"r{self._n}"
        prompt, params = request(prompt_ids, **kw)
        params.ignore_eos = ignore_eos  # decoders of a random model must not stop early
        self.stamps[req_id] = [time.perf_counter()]  # arrival, then one stamp per token
        self.internal[req_id] = self.engine.add_request(req_id, prompt, params)  # vLLM adds a suffix
        return req_id

    def step(self) -> None:
        for out in self.engine.step():
            stamps = self.stamps[out.request_id]
            while len(stamps) - 1 < len(out.outputs[0].token_ids):
                stamps.append(time.perf_counter())
            if out.finished:
                self.done.add(out.request_id)
                self.reports[out.request_id] = (out.kv_transfer_params or {}).get("kvcdn", {})

    def until(self, predicate, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark phase did not finish")
            self.step()

    def first_token(self, req_id: str) -> bool:
        return len(self.stamps[req_id]) > 1

    def gaps(self, req_ids: list[str], start: float, end: float) -> list[float]:
        """Inter-token gaps of ``req_ids`` whose later token fell in [start, end]."""
        out = []
        for r in req_ids:
            s = self.stamps[r][1:]
            out += [b - a for a, b in zip(s, s[1:]) if start <= b <= end]
        return out

    def abort(self, req_ids: list[str]) -> None:
        self.engine.abort_request([self.internal[r] for r in req_ids], internal=True)
        while self.engine.has_unfinished_requests():
            self.step()


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")


def child(spec: dict) -> dict:
    """One engine in one mode: the phases, ``repeats`` times, then the TTFT sweep."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm_kvcdn.testing.offline import generate, make_llm

    llm = make_llm(spec["model"], store_url=spec["store_url"], enable_prefix_caching=False,
                   max_model_len=spec["max_model_len"], max_num_batched_tokens=spec["max_model_len"],
                   extra_config={"async_io": spec["async_io"], "publish_isolation_s": 0, **spec.get("extra", {})},
                   distributed_executor_backend="mp")  # the worker in its own process, bound as vLLM binds it
    sweep_docs = [p[:n] for n, p in spec["ttft_prompts"]] + [spec["warmup"][:-16]]
    setup = spec["setup_docs"] if spec["phases"] else sweep_docs
    for doc in setup if spec["publish_setup"] else []:
        assert generate(llm, doc, publish=True).kvcdn.get("published"), "setup publish failed"
    st = Stepper(llm.llm_engine)
    rows, ttft = [], []
    for rep in range(spec["repeats"] if spec["phases"] else 0):
        for phase in PHASES:
            decoders = [st.add(_tokens(16, 1000 * rep + i), max_tokens=spec["max_model_len"] - 32, ignore_eos=True)
                        for i in range(spec["decoders"])]
            st.until(lambda: all(len(st.stamps[d]) > 4 for d in decoders))  # steady decode
            start = time.perf_counter()
            row = {"phase": phase, "repeat": rep}
            if phase == "decode":
                st.until(lambda: len(st.stamps[decoders[0]]) > 40)
            elif phase in ("load", "hot"):
                hit = st.add(spec["hit_prompts"][rep], max_tokens=1)
                st.until(lambda: st.first_token(hit))
                row["ttft_s"] = st.stamps[hit][1] - st.stamps[hit][0]
                row["loaded"] = st.reports.get(hit, {}).get("loaded_tokens")
            elif phase == "compute":
                plain = st.add(spec["publish_docs"][rep], max_tokens=1)
                st.until(lambda: st.first_token(plain))
            else:
                pub = st.add(spec["publish_docs"][rep], publish=True)
                st.until(lambda: pub in st.done)
                wait = st.add([0], max_tokens=1, wait_for=st.reports[pub].get("document"))
                st.until(lambda: wait in st.done)
                row["published"] = bool(st.reports[wait].get("published"))
            end = time.perf_counter()
            gaps = st.gaps(decoders, start, end)
            row.update(window_s=end - start, itl_p99_ms=1000 * _p99(gaps),
                       itl_median_ms=1000 * statistics.median(gaps), gaps=len(gaps))
            rows.append(row)
            st.abort(decoders)
    if not spec["phases"]:
        warm = st.add(spec["warmup"], max_tokens=1)
        st.until(lambda: warm in st.done)
    for n, prompt in spec["ttft_prompts"] if not spec["phases"] else []:
        times = []
        for _ in range(spec["ttft_reads"]):
            req = st.add(prompt, max_tokens=1)
            st.until(lambda: req in st.done)
            times.append(st.stamps[req][1] - st.stamps[req][0])
            loaded = st.reports[req].get("loaded_tokens")
        ttft.append({"doc_tokens": n, "times": times, "loaded": loaded})
    return {"rows": rows, "ttft": ttft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="kv-0.6b", help="tiny_model shape (kv-0.6b: Qwen3-0.6B's KV bytes)")
    ap.add_argument("--model", help="model directory (default: generate --shape)")
    ap.add_argument("--doc-tokens", type=int, default=2048, help="L: tokens of the loaded and published documents")
    ap.add_argument("--decoders", type=int, default=4, help="N: requests decoding throughout")
    ap.add_argument("--get-delay-s", type=float, default=0.05, help="sleep before each chunk read")
    ap.add_argument("--ttft-lengths", default="255,945,2048", help="document lengths of the TTFT sweep")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the phases")
    ap.add_argument("--ttft-reads", type=int, default=5, help="reads of each document in the TTFT sweeps")
    ap.add_argument("--kv-cache-gib", default="4")
    ap.add_argument("--reserved-cpus", type=int, default=0,
                    help="cores vLLM leaves to other threads (VLLM_CPU_NUM_OF_RESERVED_CPU), the same in both "
                         "modes; 1 leaves one to the I/O threads, as a GPU server's host has spare cores")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of the TTFT sweeps, modes alternating in each; their reads are pooled")
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs to do (the others are read from --work)")
    ap.add_argument("--work", help="work directory of an earlier run, to redo some of its runs (--runs)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from report import run_child

    if run_child(args.child, child):
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kvcdn-async-io-"))
    model = args.model or (str(work / "model") if (work / "model").exists() else None)
    if not model:
        from vllm_kvcdn.testing.tiny_model import make_model

        model = str(make_model(work / "model", args.shape))
    lengths = [int(x) for x in args.ttft_lengths.split(",") if x]
    question = _tokens(16, 7)
    loaded_docs = [_tokens(args.doc_tokens, 1 + r) for r in range(args.repeats)]  # each one's first read
    ttft_docs = {n: _tokens(n, 100 + n) for n in lengths}
    spec = {
        "model": model, "repeats": args.repeats, "ttft_reads": args.ttft_reads, "decoders": args.decoders,
        "max_model_len": max([args.doc_tokens, *lengths]) + 64,
        "setup_docs": loaded_docs,
        "hit_prompts": [doc + question for doc in loaded_docs],
        "warmup": _tokens(300, 3) + question,
        "publish_docs": [_tokens(args.doc_tokens, 500 + r) for r in range(args.repeats)],
        "ttft_prompts": [(n, d + question) for n, d in ttft_docs.items()],
    }
    results = {mode: {} for mode in MODES}
    # Phases over the slowed store, then the TTFT sweeps from local files (every read from
    # the files: RAM tier off; then with the RAM tier); modes alternate, the sweeps --rounds
    # times (this machine's noise is tens of percent between engines of the same mode).
    redo = set(args.runs.split(","))
    for run, extra in RUNS.items():
        phases = run == "phases"
        for rnd in range(1 if phases else args.rounds):
            for mode, async_io in MODES.items():
                name = f"{mode}-{run}" + (f"-{rnd}" if rnd else "")
                if run not in redo:  # kept from the earlier run in --work, if it has it
                    if not (work / f"{name}.json").exists():
                        continue
                    part = json.loads((work / f"{name}.json").read_text())
                else:
                    part = _run_child(args, spec, work, name, run, extra, async_io)
                if phases:
                    results[mode][run] = part["rows"]
                else:
                    results[mode].setdefault(run, []).append(part["ttft"])
    _report(args, results)
    print(f"[async_io] work files in {work}")


def _run_child(args, spec: dict, work: Path, name: str, run: str, extra: dict, async_io: bool) -> dict:
    """One engine in its own process: one mode, one run."""
    phases = run == "phases"
    env = {**os.environ, **cpu_engine_env(kvcache_gib=args.kv_cache_gib, reserved_cpus=args.reserved_cpus)}
    if phases:
        env["KVCDN_TEST_FAULTS"] = f"chunk_get_delay_s={args.get_delay_s}"
    # The phases publish, so each mode has its own store; the sweeps only read, so they
    # share one (async_io is not in the fingerprint) and a long document's prefill is paid once.
    store = work / (f"store-{name}" if phases else "store-sweeps")
    first_sweep = not (store / "manifests").exists()
    child_spec = {**spec, "async_io": async_io, "phases": phases, "store_url": f"file://{store}",
                  "extra": extra, "publish_setup": phases or first_sweep, "out": str(work / f"{name}.json")}
    (work / f"{name}.spec").write_text(json.dumps(child_spec))
    print(f"[async_io] {name}: running...", flush=True)
    subprocess.run([sys.executable, __file__, "--child", str(work / f"{name}.spec")], env=env, check=True)
    return json.loads((work / f"{name}.json").read_text())


def _pooled(rounds: list[list[dict]], first: int) -> dict[int, list[float]]:
    """Document length -> the TTFTs of every round, each round's reads from ``first`` on
    (the RAM tier's: the reads after the round's first, which came from the files)."""
    pooled: dict[int, list[float]] = {}
    for sweep in rounds:
        for t in sweep:
            pooled.setdefault(t["doc_tokens"], []).extend(t["times"][first:])
    return {n: times for n, times in pooled.items() if times}


def _report(args, results: dict) -> None:
    from report import write_report

    rows = []
    for mode, res in results.items():
        for phase in PHASES if "phases" in res else ():
            rs = [r for r in res["phases"] if r["phase"] == phase]
            rows.append({"mode": mode, "phase": phase,
                         "itl_p99_ms": statistics.median(r["itl_p99_ms"] for r in rs),
                         "itl_median_ms": statistics.median(r["itl_median_ms"] for r in rs),
                         "ttft_s": statistics.median(r["ttft_s"] for r in rs) if phase in ("load", "hot") else "",
                         "window_s": statistics.median(r["window_s"] for r in rs)})
        for run, where, first in (("files", "from local files", 0), ("ram", "RAM tier", 1)):
            for n, times in _pooled(res.get(run, []), first).items():
                rows.append({"mode": mode, "phase": f"hit alone, L={n}, {where}", "ttft_s": statistics.median(times)})
    columns = [("mode", "I/O"), ("phase", "phase"), ("itl_p99_ms", "decoders' ITL p99 (ms)"),
               ("itl_median_ms", "ITL median (ms)"), ("ttft_s", "hit TTFT (s)"), ("window_s", "window (s)")]

    def plot(ax):
        phases = list(PHASES) if any("phases" in res for res in results.values()) else []
        for i, mode in enumerate(results):
            vals = [next(r["itl_p99_ms"] for r in rows if r["mode"] == mode and r["phase"] == p) for p in phases]
            ax.bar([x + 0.4 * i for x in range(len(phases))], vals, width=0.4, label=f"{mode} I/O")
        ax.set_xticks([x + 0.2 for x in range(len(phases))], phases)
        ax.set_yscale("log")  # a prefill step is minutes, a decode step tens of ms
        ax.set_ylabel("decoders' inter-token latency p99 (ms)")
        ax.legend()

    notes = (f"{args.decoders} requests decode throughout each phase; documents of {args.doc_tokens} tokens "
             f"({args.shape} shape); chunk reads delayed {args.get_delay_s}s each in the phases; medians of "
             f"{args.repeats} repeats; {args.reserved_cpus} core(s) left out of vLLM's compute threads. "
             f"TTFT rows: a hit alone, read from local files (RAM tier off: every read from the files), then "
             f"from the RAM tier (the reads after the first); medians of {args.ttft_reads} reads x {args.rounds} "
             "round(s), modes alternating.")
    suffix = f"_reserved{args.reserved_cpus}" if args.reserved_cpus else ""
    title = "Store I/O in the engine step vs in the background"
    print(write_report(args.out, f"async_io_{args.shape}{suffix}", title=title, rows=rows, columns=columns,
                       notes=notes, extra={"raw": results, "args": vars(args)}, plot=plot).read_text())


if __name__ == "__main__":
    main()
