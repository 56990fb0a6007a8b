"""The paper's table on vLLM: TTFT of a cold prefill vs. a kvcdn hit vs. the peers.

For each document length L, prompt = L document tokens + 16 question tokens, max_tokens=1:

  cold          plain vLLM, no connector, no prefix cache (the paper's "prefill")
  kvcdn hit     the document's KV loaded by the connector (vLLM's own prefix cache off, so
                every hit comes through kvcdn): a hot document, whole blocks from the worker's
                host-RAM tier; "first hit (file)" is the first read of a node that never had
                the document, from the store's chunk files; "first hit (image)" the first read
                of the node that published it, after a restart: the block images it kept on
                its disk at publish time (page cache), read straight into the paged cache
  resident      vLLM's own prefix cache holding the document (the floor a load approaches;
                it keeps whole 128-token blocks only, so up to 127 document tokens recompute)
  example hit   vLLM's in-tree ExampleConnector, the identical prompt repeated
  example miss  ExampleConnector, same document with a new question (it keys whole prompts)
  cold (ctl)    a miss on the kvcdn engine (unpublished salt): the connector's lookup cost

Every variant checks vLLM's own counters: a "hit" with zero external/prefix hits fails the run.
All engines run with VLLM_CPU_NUM_OF_RESERVED_CPU=0 (same CPU thread setup). Medians of --reps
(the misses that only set things up, "example miss" and "cold (ctl)", are measured once).

    python benchmarks/paper_table.py [--shape qwen3-0.6b] [--lengths 255,485,...] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_kvcdn.defaults import cpu_engine_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PAPER = {255: (0.67, 0.078), 485: (1.29, 0.093), 945: (2.65, 0.122), 1888: (5.81, 0.179), 3774: (14.71, 0.296)}
QUESTION_LEN = 16
COMPUTED = "vllm:request_prefill_kv_computed_tokens"


def doc_tokens(length: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed * 1_000_003 + length)
    return [rng.randrange(100, 500) for _ in range(length)]


def question(tag: str) -> list[int]:
    import random

    rng = random.Random(tag)
    return [rng.randrange(100, 500) for _ in range(QUESTION_LEN)]


def timed(llm, prompt, **kw):
    from vllm_kvcdn.testing.offline import engine_counters, generate

    before = engine_counters(llm)
    t0 = time.perf_counter()
    answer = generate(llm, prompt, max_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    after = engine_counters(llm)
    delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    return ttft, delta, answer


def run_phase(phase: str, model: str, lengths: list[int], reps: int, work: Path) -> dict:
    """One engine, all its measurements (runs in its own process). Every full prefill
    that is not itself measured is done once per length, to keep the run short."""
    from vllm_kvcdn.testing.offline import make_llm

    max_len = max(lengths) + QUESTION_LEN + 64
    common = dict(max_model_len=max_len, max_num_batched_tokens=max_len)
    if phase == "example":
        from vllm.config import KVTransferConfig

        llm = make_llm(model, enable_prefix_caching=False, **common, kv_transfer_config=KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": str(work / "example")}))
    elif phase in ("publish", "images"):  # the publishing node: its disk keeps block images
        llm = make_llm(model, store_url=f"file://{work / 'store'}", enable_prefix_caching=False, **common,
                       extra_config={"disk_cache_gib": 8.0, "disk_cache_dir": str(work / "publisher-disk")})
    elif phase == "kvcdn":  # vLLM's own prefix cache off: every hit comes from the store
        llm = make_llm(model, store_url=f"file://{work / 'store'}", enable_prefix_caching=False, **common,
                       extra_config={"ram_tier_gib": 4.0})
    else:
        llm = make_llm(model, enable_prefix_caching=phase == "resident", **common)
    timed(llm, doc_tokens(64, seed=99) + question("warmup"))
    # An engine's first step over loaded context pays a one-time setup: a hit on another
    # document first, so the first read of each length measures the read.
    warm_doc = doc_tokens(min(600, max(lengths)), seed=98)
    if phase == "publish":
        timed(llm, warm_doc, publish=True)
    elif phase in ("images", "kvcdn"):
        timed(llm, warm_doc + question("warm"))
    results: list[dict] = []

    def record(variant, length, rep, ttft, delta, ok, **extra):
        results.append({"variant": variant, "L": length, "rep": rep, "ttft": ttft, "ok": bool(ok),
                        "computed": delta.get(COMPUTED, 0), **extra})

    for length in lengths:  # once per length: what the measured requests need in place
        doc = doc_tokens(length)
        if phase == "publish":
            timed(llm, doc, publish=True)
        elif phase == "images":  # restarted publisher: images and tail files from the page cache, no chunk read
            ttft, d, answer = timed(llm, doc + question("image"))
            record("kvcdn hit (image)", length, 1, ttft, d, answer.kvcdn.get("loaded_tokens") == length
                   and d.get("vllm:kvcdn_image_tier_hits", 0) and not d.get("vllm:kvcdn_store_read_bytes"),
                   loaded_bytes=d.get("vllm:kvcdn_loaded_bytes", 0),
                   load_s=d.get("vllm:kvcdn_load_duration_seconds", 0))
        elif phase == "kvcdn":
            ttft, d, _ = timed(llm, doc + question("ctl"), cache_salt=f"cold-{length}")
            record("cold (ctl)", length, 1, ttft, d, d.get(COMPUTED) == length + QUESTION_LEN)
            # First read: chunk files from the store (page cache), verified, packed by the op.
            ttft, d, answer = timed(llm, doc + question("first"))
            record("kvcdn hit (file)", length, 1, ttft, d, answer.kvcdn.get("loaded_tokens") == length,
                   loaded_bytes=d.get("vllm:kvcdn_loaded_bytes", 0),
                   load_s=d.get("vllm:kvcdn_load_duration_seconds", 0))
        elif phase == "resident":
            timed(llm, doc + question("warm"))
        elif phase == "example":
            timed(llm, doc + question("example-fixed"))  # stores the whole prompt
            ttft, d, _ = timed(llm, doc + question("example-new"))
            # Not always a full miss: it keys the block-aligned prompt minus one token,
            # so a new question still hits when that prefix lies inside the document.
            record("example miss", length, 1, ttft, d, True)
    for rep in range(1, reps + 1):
        for length in lengths:
            doc = doc_tokens(length)
            q = question(f"{phase}{rep}")
            if phase == "plain":
                ttft, d, _ = timed(llm, doc + q)
                record("cold", length, rep, ttft, d, d.get(COMPUTED) == length + QUESTION_LEN)
            elif phase == "kvcdn":  # hot document: whole blocks from the worker's RAM tier
                ttft, d, answer = timed(llm, doc + q)
                record("kvcdn hit", length, rep, ttft, d,
                       answer.kvcdn.get("loaded_tokens") == length and d.get(COMPUTED) == QUESTION_LEN,
                       loaded_bytes=d.get("vllm:kvcdn_loaded_bytes", 0),
                       load_s=d.get("vllm:kvcdn_load_duration_seconds", 0))
            elif phase in ("publish", "images"):
                continue
            elif phase == "resident":
                ttft, d, _ = timed(llm, doc + q)
                record("resident", length, rep, ttft, d, d.get("vllm:prefix_cache_hits", 0) > 0,
                       cached=d.get("vllm:prefix_cache_hits", 0))
            else:
                ttft, d, _ = timed(llm, doc + question("example-fixed"))
                record("example hit", length, rep, ttft, d, d.get("vllm:external_prefix_cache_hits", 0) > 0)
    return {"results": results}


def memcpy_gbps(nbytes: int = 256 << 20, reps: int = 7) -> float:
    import torch

    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def page_cache_gbps(work: Path, nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Reading a file that sits in the page cache into a buffer already touched."""
    import torch

    path = work / "page-cache-probe.bin"
    path.write_bytes(bytes(nbytes))
    buffer = memoryview(torch.zeros(nbytes, dtype=torch.uint8).numpy())
    times = []
    for _ in range(reps + 1):  # the first read warms the page cache
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < nbytes:
                got += f.readinto(buffer[got:])
        times.append(time.perf_counter() - t0)
    path.unlink()
    return nbytes / statistics.median(times[1:]) / 1e9


def summarize(results: list[dict], lengths: list[int], bytes_per_token: int) -> list[dict]:
    rows = []
    for length in lengths:
        med = {}
        for variant in ("cold", "kvcdn hit", "kvcdn hit (file)", "kvcdn hit (image)", "resident", "example hit",
                        "example miss", "cold (ctl)"):
            runs = [r for r in results if r["variant"] == variant and r["L"] == length]
            if runs:
                med[variant] = statistics.median(r["ttft"] for r in runs)
                if not all(r["ok"] for r in runs):
                    med[variant + " FAILED"] = True
        def gbps(variant):
            runs = [r for r in results if r["variant"] == variant and r["L"] == length and r.get("load_s")]
            return sum(r["loaded_bytes"] for r in runs) / sum(r["load_s"] for r in runs) / 1e9 if runs else 0.0
        paper = PAPER.get(length)
        row = {
            "L": length,
            "cold_s": med.get("cold", float("nan")),
            "kvcdn_s": med.get("kvcdn hit", float("nan")),
            "kvcdn_file_s": med.get("kvcdn hit (file)", float("nan")),
            "kvcdn_image_s": med.get("kvcdn hit (image)", float("nan")),
            # A hot hit less its load: the question (and the engine's step) alone.
            "question_s": statistics.median([r["ttft"] - r["load_s"] for r in results
                                             if r["variant"] == "kvcdn hit" and r["L"] == length] or [float("nan")]),
            "resident_s": med.get("resident", float("nan")),
            "example_hit_s": med.get("example hit", float("nan")),
            "example_miss_s": med.get("example miss", float("nan")),
            "example_miss_computed": next((r["computed"] for r in results
                                           if r["variant"] == "example miss" and r["L"] == length), ""),
            "cold_ctl_s": med.get("cold (ctl)", float("nan")),
            "speedup": med.get("cold", float("nan")) / med.get("kvcdn hit", float("nan")),
            "vs_resident": med.get("resident", float("nan")) / med.get("kvcdn hit", float("nan")),
            "vs_example": med.get("example hit", float("nan")) / med.get("kvcdn hit", float("nan")),
            "paper_speedup": paper[0] / paper[1] if paper else float("nan"),
            "kv_mb": bytes_per_token * length / 1e6,
            "load_gbps": gbps("kvcdn hit"),
            "load_file_gbps": gbps("kvcdn hit (file)"),
            "load_image_gbps": gbps("kvcdn hit (image)"),
            "failed": ", ".join(k.removesuffix(" FAILED") for k in med if k.endswith("FAILED")) or "",
        }
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: generate --shape under ~/.cache/kvcdn)")
    parser.add_argument("--shape", default="qwen3-0.6b", choices=["tiny", "qwen3-0.6b", "qwen3-4b"])
    parser.add_argument("--lengths", default="255,485,945,1888,3774,8192")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kv-cache-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE for the engines")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--work", default=None, help="keep engine results here; phases already there are reused")
    parser.add_argument("--redo", default="", help="comma-separated phases to run again even if --work has them")
    parser.add_argument("--_phase", nargs=2, metavar=("PHASE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    model = args.model or str(ensure_model(args.shape))
    if args._phase:
        phase, work = args._phase
        Path(work, f"{phase}.json").write_text(json.dumps(run_phase(phase, model, lengths, args.reps, Path(work))))
        return

    from report import write_report

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kvcdn-paper-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cpu_engine_env(kvcache_gib=args.kv_cache_gib)}
    results = []
    for phase in ("publish", "images", "kvcdn", "resident", "plain", "example"):
        if (work / f"{phase}.json").exists() and phase not in args.redo.split(","):
            print(f"[paper-table] engine '{phase}': reusing {work / f'{phase}.json'}", flush=True)
            results += json.loads((work / f"{phase}.json").read_text())["results"]
            continue
        for leftover in {"publish": ["store", "publisher-disk"], "example": ["example"]}.get(phase, []):
            shutil.rmtree(work / leftover, ignore_errors=True)  # a phase starts from an empty store
        print(f"[paper-table] engine '{phase}': lengths {lengths}, {args.reps} reps ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--model", model, "--lengths", args.lengths, "--reps",
                        str(args.reps), "--_phase", phase, str(work)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=open(work / f"{phase}.log", "w"))
        results += json.loads((work / f"{phase}.json").read_text())["results"]
        print(f"[paper-table]   done in {time.perf_counter() - t0:.0f}s", flush=True)

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    bytes_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    rows = summarize(results, lengths, bytes_per_token)
    copy, page_cache = memcpy_gbps(), page_cache_gbps(work)
    for r in rows:
        r["load_vs_memcpy"] = r["load_gbps"] / copy
        r["speedup_file"] = r["cold_s"] / r["kvcdn_file_s"]
        # Issue 29's goal for a first read from a local store: within 25 % of reading its
        # bytes from the page cache at this box's rate, plus computing the question.
        r["first_read_goal_s"] = 1.25 * (bytes_per_token * r["L"] / page_cache / 1e9 + r["question_s"])
        image, file = (r[k] / r["first_read_goal_s"] for k in ("kvcdn_image_s", "kvcdn_file_s"))
        r["first_read_goal"] = f"{'met' if image <= 1 else 'not met'} (image {image:.2f}x, file {file:.2f}x)"
    notes = (f"Model: {Path(model).name} ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads x "
             f"{cfg.head_dim}, bf16, random weights): {bytes_per_token:,} KV bytes/token. TTFT in seconds, median "
             f"of {args.reps}. speedup = cold / kvcdn; vs resident = resident / kvcdn (>1: the kvcdn hit beats "
             f"vLLM's own resident prefix cache); vs example = ExampleConnector hit / kvcdn. Load GB/s = bytes "
             f"read, verified and copied into the paged cache per second inside the worker; this machine's "
             f"memcpy: {copy:.1f} GB/s, page-cache read: {page_cache:.1f} GB/s (same run). First-read goal "
             f"(issue 29) = 1.25 x (KV bytes / page-cache rate + question), question = a hot hit's TTFT less "
             f"its load. Paper: Qwen3-4B fp16 on an M1 Pro, prefill vs one reuse step.")

    def plot(ax):
        for key, label in (("cold_s", "cold prefill"), ("resident_s", "vLLM prefix cache (resident)"),
                           ("example_hit_s", "ExampleConnector hit"), ("kvcdn_s", "kvcdn hit (hot: RAM tier)")):
            ax.plot([r["L"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.set_ylabel("TTFT (s)")
        ax.plot([r["L"] for r in rows], [r["kvcdn_file_s"] for r in rows], marker="x", linestyle="--",
                label="kvcdn first hit (file)")
        ax.plot([r["L"] for r in rows], [r["kvcdn_image_s"] for r in rows], marker="x", linestyle=":",
                label="kvcdn first hit (image)")
        ax.legend(fontsize=8)

    path = write_report(
        args.out, f"paper_table_{args.shape}", title=f"TTFT on vLLM CPU, {args.shape}-shaped model",
        rows=rows, notes=notes, plot=plot, extra={"raw": results, "memcpy_gbps": copy, "page_cache_gbps": page_cache},
        columns=[("L", "L"), ("cold_s", "cold"), ("kvcdn_s", "kvcdn hit"), ("kvcdn_file_s", "kvcdn first hit (file)"),
                 ("kvcdn_image_s", "kvcdn first hit (image)"), ("first_read_goal_s", "first-read goal"),
                 ("first_read_goal", "first read vs goal"),
                 ("resident_s", "resident"),
                 ("example_hit_s", "example hit"), ("example_miss_s", "example miss"),
                 ("example_miss_computed", "example miss: tokens computed"), ("cold_ctl_s", "cold (ctl)"),
                 ("speedup", "speedup"), ("speedup_file", "speedup, first hit"), ("paper_speedup", "paper"),
                 ("vs_resident", "vs resident"), ("vs_example", "vs example"), ("kv_mb", "KV MB"),
                 ("load_gbps", "load GB/s"), ("load_file_gbps", "first-hit load GB/s"),
                 ("load_image_gbps", "image first-hit load GB/s"),
                 ("load_vs_memcpy", "load/memcpy"), ("failed", "failed checks")])
    print(path.read_text())


def ensure_model(shape: str) -> Path:
    from vllm_kvcdn.cli.demo import demo_model_dir, ensure_tiny_model
    from vllm_kvcdn.testing.tiny_model import make_model

    if shape == "tiny":
        return ensure_tiny_model(demo_model_dir())
    path = demo_model_dir().parent / shape
    if not (path / "config.json").exists():
        print(f"[paper-table] generating a {shape}-shaped model in {path} ...", flush=True)
        make_model(path, shape)
    return path


if __name__ == "__main__":
    main()
