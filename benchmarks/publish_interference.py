"""Does a publish's background work slow the engine's Python beside it, and is it the GIL?

A worker's publish encodes and writes the document's chunks in a background thread of the
worker process, the process whose Python also runs vLLM's model runner between kernels (on
a GPU, the part of a decode step the CPU does). This measures a stand-in for that Python
(a fixed unit of pure-Python work, ~1 ms, every 2 ms) while the real publish code
(``artifact.documents.write_chunks``: encode, checksum, write to a ``file://`` store) runs:

- ``alone``: nothing else;
- ``thread``: the publish in a thread of the same process (how the worker runs it: shares the GIL);
- ``process``: the same publish in a process of its own (no GIL shared; the same memory, cache
  and disk).

If the thread costs the Python work much more than the process does, the GIL is the cause and a
publish process would remove it; if both cost the same, it is the memory and disk traffic.
Rounds interleave the three modes; medians over rounds.

    python benchmarks/publish_interference.py [--tokens 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = {"layers": 28, "kv_heads": 8, "head_dim": 128}  # Qwen3-0.6B's KV: 114,688 bytes a token


def publish(root: str, tokens: int, documents: int, started=None) -> None:
    """Publish ``documents`` distinct documents of ``tokens`` tokens (random KV) to a file store."""
    import torch

    from vllm_kvcdn.artifact.chain import document_chunks
    from vllm_kvcdn.artifact.documents import write_chunks
    from vllm_kvcdn.store import open_store

    torch.set_num_threads(1)
    kv = [(torch.randn(tokens, SHAPE["kv_heads"], SHAPE["head_dim"]).to(torch.bfloat16),
           torch.randn(tokens, SHAPE["kv_heads"], SHAPE["head_dim"]).to(torch.bfloat16))
          for _ in range(SHAPE["layers"])]
    if started is not None:
        started.set()
    for n in range(documents):
        ids = [t + n * tokens for t in range(tokens)]
        write_chunks(open_store(f"file://{root}/{n}"), spans=document_chunks(ids, "f" * 64, None, 256), tokens=ids,
                     kv=kv, fingerprint="f" * 64, codec=None)


def _python_unit() -> int:
    x = 0
    for i in range(20000):
        x += i * i % 7
    return x


def measure(seconds: float) -> list[float]:
    """Milliseconds each unit of Python work took, one every 2 ms, for ``seconds``."""
    took, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        _python_unit()
        took.append((time.perf_counter() - t) * 1e3)
        time.sleep(0.002)
    return took


def one_round(mode: str, work: Path, tokens: int, documents: int, seconds: float) -> dict:
    root = tempfile.mkdtemp(dir=work)
    runner = None
    if mode != "alone":
        ctx = mp.get_context("spawn")
        started = ctx.Event() if mode == "process" else threading.Event()
        target = dict(target=publish, args=(root, tokens, documents, started))
        runner = ctx.Process(**target) if mode == "process" else threading.Thread(**target)
        runner.start()
        started.wait()
    t0 = time.perf_counter()
    took = measure(seconds)
    busy = None
    if runner is not None:
        runner.join()
        busy = time.perf_counter() - t0
        if busy < seconds:
            raise SystemExit(f"the publish ended before the measurement ({busy:.2f}s): raise --documents")
    return {"mode": mode, "median_ms": statistics.median(took), "p99_ms": statistics.quantiles(took, n=100)[98],
            "units": len(took), "publish_s": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of each published document")
    ap.add_argument("--documents", type=int, default=6,
                    help="documents each publish writes (it must outlast --seconds)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    from report import write_report

    modes = ["alone", "thread", "process"]
    with tempfile.TemporaryDirectory(prefix="kvcdn-interference-") as work:
        raw = []
        for r in range(args.rounds):
            for mode in modes[r % 3:] + modes[: r % 3]:  # rotating order
                print(f"[interference] round {r + 1}/{args.rounds}: {mode} ...", flush=True)
                raw.append(one_round(mode, Path(work), args.tokens, args.documents, args.seconds))
    alone = statistics.median(x["median_ms"] for x in raw if x["mode"] == "alone")
    rows = []
    for mode in modes:
        xs = [x for x in raw if x["mode"] == mode]
        median = statistics.median(x["median_ms"] for x in xs)
        rows.append({"mode": mode, "median_ms": median, "p99_ms": statistics.median(x["p99_ms"] for x in xs),
                     "vs_alone": median / alone})
    columns = [("mode", "publish runs in"), ("median_ms", "Python unit, median (ms)"),
               ("p99_ms", "p99 (ms)"), ("vs_alone", "median vs alone")]
    notes = (f"A ~1 ms unit of pure Python every 2 ms for {args.seconds}s while {args.documents} documents of "
             f"{args.tokens} tokens (Qwen3-0.6B KV shape, {args.tokens * 114688 / 1e6:.0f} MB each) are "
             f"published to a file:// store; medians of {args.rounds} rounds, modes in rotating order.")

    def plot(ax):
        ax.bar([r["mode"] for r in rows], [r["median_ms"] for r in rows], label="median")
        ax.bar([r["mode"] for r in rows], [r["p99_ms"] - r["median_ms"] for r in rows],
               bottom=[r["median_ms"] for r in rows], alpha=0.4, label="p99")
        ax.set_ylabel("ms per unit of Python work")
        ax.legend()

    print(write_report(args.out, "publish_interference", title="A publish beside the engine's Python: GIL or not",
                       rows=rows, columns=columns, notes=notes, extra={"raw": raw, "args": vars(args)},
                       plot=plot).read_text())


if __name__ == "__main__":
    main()
