"""A hit's TTFT by where its chunks come from: the shared S3 bucket (a cold node), the node's
disk tier after a restart (canonical chunks; block images), the worker's RAM tier (hot),
beside a cold prefill; and the S3 client's GET throughput against one raw loopback GET of
the same objects.

The bucket is moto's S3 server (``moto[server]``) on loopback in a process of its own: the
real protocol, but a Python server (it copies the whole object for every ranged GET, and
shares this machine's cores), so its figures say what our client does over HTTP, not what
AWS S3 or MinIO would give. Throughput reads every chunk object ``io_threads`` (4) at a
time, as the connector's loader does, both ways; the client's CPU seconds per GB are
measured too (the server runs in another process). Three engines, one after the other (vLLM's prefix cache off, so
every hit comes through kvcdn; ``VLLM_CPU_NUM_OF_RESERVED_CPU`` the same for all):

- ``publisher``: per length L, a cold prefill of document + question (TTFT), then publishes
  the document to the bucket;
- ``node``: a fresh node (empty RAM and disk tiers): the first hit reads the bucket; the
  next ``--reps`` hits come from the RAM tier;
- ``node-restarted-chunks``: the same node after a restart, block images off
  (``disk_images: false``): the first hit reads canonical chunks from its disk tier;
- ``node-restarted-images``: restarted again, block images on (the default): whole chunks
  are read as the engine's own block images (no packing op), the tail from its chunk.

Every hit is checked with vLLM's own counters (only the question computed) and kvcdn's
(``loaded_tokens`` = L; disk-tier misses, image-tier hits as expected).

    python benchmarks/s3_tiers.py [--shape kv-0.6b] [--lengths 255,945,3774,8192] [--reps 3]
    python benchmarks/s3_tiers.py --get-only 24 --reps 5    # no engines: the client's CPU per byte
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
import urllib.request
from pathlib import Path

from vllm_kvcdn.defaults import cpu_engine_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QUESTION_LEN = 16
CHUNK_TOKENS = 256  # the connector's default chunk size
DISK_CHUNKS = "hit, disk tier: chunks"  # canonical chunks: read, verify, the packing op
DISK_IMAGES = "hit, disk tier: block images"  # the engine's own blocks: read, verify, copy
COMPUTED = "vllm:request_prefill_kv_computed_tokens"
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def tokens(n: int, seed: str) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 500) for _ in range(n)]


def timed(llm, prompt: list[int], **kw) -> tuple[float, dict, dict]:
    from vllm_kvcdn.testing.offline import engine_counters, generate

    before = engine_counters(llm)
    t0 = time.perf_counter()
    answer = generate(llm, prompt, max_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    after = engine_counters(llm)
    return ttft, {k: after[k] - before.get(k, 0.0) for k in after}, answer.kvcdn


def run_phase(spec: dict) -> list[dict]:
    """One engine (in its own process): the measurements of ``spec["phase"]``."""
    from vllm_kvcdn.testing.offline import make_llm

    lengths, phase = spec["lengths"], spec["phase"]
    max_len = max(lengths) + QUESTION_LEN + 64
    llm = make_llm(spec["model"], store_url=spec["store_url"], enable_prefix_caching=False, max_model_len=max_len,
                   max_num_batched_tokens=max_len, extra_config={
                       "ram_tier_gib": 4.0, "disk_cache_gib": 8.0, "disk_cache_dir": spec["disk_dir"],
                       "disk_images": spec["disk_images"], "publish_isolation_s": 0,
                       "signing_key": spec["signing_key"],  # a bucket serves signed documents only
                       "load_policy": "always"})  # it measures every tier's loads, even one that loses
    timed(llm, tokens(64, "warmup"), cache_salt="warmup")
    rows, published = [], []

    def record(variant: str, length: int, ttft: float, delta: dict, ok: bool) -> None:
        rows.append({"variant": variant, "L": length, "ttft": ttft, "ok": bool(ok), "computed": delta.get(COMPUTED, 0),
                     "disk_hits": delta.get("vllm:kvcdn_disk_tier_hits", 0),
                     "disk_misses": delta.get("vllm:kvcdn_disk_tier_misses", 0),
                     "image_hits": delta.get("vllm:kvcdn_image_tier_hits", 0),
                     "load_s": delta.get("vllm:kvcdn_load_duration_seconds", 0)})

    for length in lengths:
        doc = tokens(length, f"doc{length}")

        def hit(d: dict, report: dict) -> bool:
            return report.get("loaded_tokens") == length and d.get(COMPUTED) == QUESTION_LEN
        if phase == "publisher":
            ttft, d, _ = timed(llm, doc + tokens(QUESTION_LEN, "cold"), cache_salt="nothing-published-here")
            record("cold prefill", length, ttft, d, d.get(COMPUTED) == length + QUESTION_LEN)
            _, _, report = timed(llm, doc, publish=True)
            assert report.get("document"), report
            published.append(report["document"])
        elif phase == "node":
            ttft, d, report = timed(llm, doc + tokens(QUESTION_LEN, "first"))
            record("hit, from S3 (cold node)", length, ttft, d,
                   hit(d, report) and d.get("vllm:kvcdn_disk_tier_misses", 0) > 0)
            for rep in range(spec["reps"]):
                ttft, d, report = timed(llm, doc + tokens(QUESTION_LEN, f"hot{rep}"))
                record("hit, RAM tier", length, ttft, d, hit(d, report))
        else:  # restarted: everything from the node's disk, as chunks or (whole chunks) as block images
            ttft, d, report = timed(llm, doc + tokens(QUESTION_LEN, "restarted"))
            images = d.get("vllm:kvcdn_image_tier_hits", 0)
            record(DISK_IMAGES if spec["disk_images"] else DISK_CHUNKS, length, ttft, d,
                   hit(d, report) and not d.get("vllm:kvcdn_disk_tier_misses")
                   and (images >= length // CHUNK_TOKENS if spec["disk_images"] else images == 0))
    for doc_id in published:  # the writes run in the background: let them finish
        _, _, report = timed(llm, [1], wait_for=doc_id)
        assert report.get("published"), report
    return rows


def throughput(store_url: str, endpoint: str, bucket: str, reps: int, concurrency: int = 4) -> dict:
    """GB/s and client CPU s/GB of the store's GET vs one plain GET of each chunk object (a
    presigned URL read with urllib: no boto3 on that path), ``concurrency`` objects at a time.
    "kvcdn, whole objects" is the store with parts as large as a chunk (one GET each)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from vllm_kvcdn.store import open_store

    store = open_store(store_url)
    whole = open_store(store_url + "&part_mib=64")
    keys = [info.key for info in store.scan("chunks/")]
    client = boto3.client("s3", endpoint_url=endpoint)
    urls = [client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": store.prefix + k})
            for k in keys]
    nbytes = sum(store.size(k) for k in keys)

    def plain_get(url: str) -> None:
        with urllib.request.urlopen(url) as r:
            r.read()

    variants = (("kvcdn", store.get, keys), ("kvcdn, whole objects", whole.get, keys), ("raw", plain_get, urls))
    timings = {name: [] for name, _, _ in variants}
    with ThreadPoolExecutor(concurrency) as pool:
        for rep in range(reps):
            # Interleaved, each round in another order: no client always follows the same one.
            for name, read, items in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                wall, cpu = time.perf_counter(), time.process_time()
                list(pool.map(read, items))
                timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    out = {"objects": len(keys), "bytes": nbytes, "concurrency": concurrency,
           "part_mib": store.options.part_mib}
    for name, runs in timings.items():
        out[f"{name}_gbps"] = nbytes / statistics.median(w for w, _ in runs) / 1e9
        out[f"{name}_cpu_s_per_gb"] = statistics.median(c for _, c in runs) / (nbytes / 1e9)
    return out


def get_only(args, store_url: str, endpoint: str, bucket: str) -> None:
    """``--get-only N``: N chunk-sized objects of random bytes, then only ``throughput``."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    size = CHUNK_TOKENS * 114_688  # one 256-token chunk of Qwen3-0.6B's KV (28 x 2 x 8 x 128 x 2 B a token)
    for n in range(args.get_only):
        client.put_object(Bucket=bucket, Key=f"{args.shape}/chunks/{n:04d}", Body=os.urandom(size))
    tput = throughput(store_url, endpoint, bucket, reps=args.reps)
    from report import write_report

    rows = [{"client": name, "gbps": tput[f"{name}_gbps"], "cpu_s_per_gb": tput[f"{name}_cpu_s_per_gb"],
             "cpu_vs_plain": tput[f"{name}_cpu_s_per_gb"] / tput["raw_cpu_s_per_gb"]}
            for name in ("kvcdn", "kvcdn, whole objects", "raw")]

    def plot(ax):
        ax.bar([r["client"] for r in rows], [r["cpu_s_per_gb"] for r in rows])
        ax.set_ylabel("client CPU s per GB")

    notes = (f"{args.get_only} objects of {size / 1e6:.1f} MB (one 256-token Qwen3-0.6B chunk each) on moto's S3 "
             f"server (loopback, its own process), {tput['concurrency']} GETs at a time as the loader reads, "
             f"{tput['part_mib']} MiB ranged parts; raw = one presigned GET per object read with urllib. Medians "
             f"of {args.reps} interleaved rounds. Goal (issue 29): kvcdn's CPU per byte within 1.5x of raw.")
    print(write_report(args.out, f"s3_get_{args.shape}", title="S3 GETs: the client's CPU per byte", rows=rows,
                       columns=[("client", "client"), ("gbps", "GB/s"), ("cpu_s_per_gb", "client CPU s/GB"),
                                ("cpu_vs_plain", "CPU vs plain GET")],
                       notes=notes, extra={"throughput": tput}, plot=plot).read_text())


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (its GIL is not the client's)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="kv-0.6b", help="tiny_model shape (kv-0.6b: Qwen3-0.6B's KV bytes)")
    ap.add_argument("--model", help="model directory (default: generate --shape)")
    ap.add_argument("--lengths", default="255,945,3774,8192")
    ap.add_argument("--reps", type=int, default=3, help="RAM-tier hits per length (median)")
    ap.add_argument("--kv-cache-gib", default="4")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--get-only", type=int, default=0, metavar="N",
                    help="no engines: N chunk-sized objects, then only the GET throughput and CPU per byte")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from report import run_child

    if run_child(args.child, run_phase):
        return

    os.environ.update(S3_ENV)
    server, endpoint = start_moto()
    try:
        bucket = "kvcdn-bench"
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        store_url = f"s3://{bucket}/{args.shape}?endpoint_url={endpoint}"
        if args.get_only:
            return get_only(args, store_url, endpoint, bucket)
        work = Path(tempfile.mkdtemp(prefix="kvcdn-s3-tiers-"))
        model = args.model
        if not model:
            from vllm_kvcdn.testing.tiny_model import make_model

            model = str(make_model(work / "model", args.shape))
        lengths = [int(x) for x in args.lengths.split(",") if x]
        from vllm_kvcdn.artifact.provenance import PublisherKey

        PublisherKey.generate().save(work / "publisher.pem")  # the publisher's and every node's (trusted) key
        rows = []
        env = {**os.environ, **cpu_engine_env(kvcache_gib=args.kv_cache_gib)}
        phases = (("publisher", "disk-publisher", True), ("node", "disk-node", True),
                  ("node-restarted-chunks", "disk-node", False), ("node-restarted-images", "disk-node", True))
        for phase, disk, images in phases:
            spec = {"phase": phase, "model": model, "lengths": lengths, "reps": args.reps, "store_url": store_url,
                    "disk_dir": str(work / disk), "disk_images": images, "out": str(work / f"{phase}.json"),
                    "signing_key": str(work / "publisher.pem")}
            (work / f"{phase}.spec").write_text(json.dumps(spec))
            print(f"[s3_tiers] {phase}: running...", flush=True)
            subprocess.run([sys.executable, __file__, "--child", str(work / f"{phase}.spec")], env=env, check=True)
            rows += json.loads((work / f"{phase}.json").read_text())
        tput = throughput(store_url, endpoint, bucket, reps=3)
    finally:
        server.terminate()
    _report(args, rows, tput)
    print(f"[s3_tiers] work files in {work}")


def _report(args, rows: list[dict], tput: dict) -> None:
    from report import write_report

    variants = ["cold prefill", "hit, from S3 (cold node)", DISK_CHUNKS, DISK_IMAGES, "hit, RAM tier"]
    table = []
    for length in sorted({r["L"] for r in rows}):
        row = {"L": length}
        for v in variants:
            rs = [r for r in rows if r["L"] == length and r["variant"] == v]
            row[v] = statistics.median(r["ttft"] for r in rs) if rs else None
        cold = row["cold prefill"]
        for v in variants[1:]:
            row[f"x {v}"] = cold / row[v] if row[v] else None
        row["failed checks"] = ", ".join(f"{r['variant']}" for r in rows if r["L"] == length and not r["ok"])
        table.append(row)
    columns = [("L", "L"), *[(v, f"{v} (s)") for v in variants],
               *[(f"x {v}", f"speedup, {v.removeprefix('hit, ')}") for v in variants[1:]],
               ("failed checks", "failed checks")]

    def plot(ax):
        xs = [r["L"] for r in table]
        for v in variants:
            ax.plot(xs, [r[v] for r in table], marker="o", label=v)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.set_ylabel("TTFT (s)")
        ax.legend()

    notes = (f"Model {args.shape}, vLLM CPU, prompt = L document tokens + {QUESTION_LEN} question tokens, "
             "max_tokens=1; "
             f"RAM-tier TTFT: median of {args.reps}. S3 = moto's server on loopback, in its own process (a "
             f"Python server: its throughput bounds the first read). GET throughput over the {tput['objects']} "
             f"chunk objects ({tput['bytes'] / 1e6:.0f} MB), {tput['concurrency']} at a time: kvcdn's S3 client "
             f"({tput['part_mib']} MiB ranged parts) {tput['kvcdn_gbps']:.2f} GB/s at "
             f"{tput['kvcdn_cpu_s_per_gb']:.2f} client CPU s/GB vs one plain GET per object "
             f"{tput['raw_gbps']:.2f} GB/s at {tput['raw_cpu_s_per_gb']:.2f} s/GB "
             f"({tput['kvcdn_gbps'] / tput['raw_gbps']:.2f}x).")
    print(write_report(args.out, f"s3_tiers_{args.shape}", title="A hit's TTFT by tier: S3, disk, RAM", rows=table,
                       columns=columns, notes=notes, extra={"raw": rows, "throughput": tput, "args": vars(args)},
                       plot=plot).read_text())


if __name__ == "__main__":
    main()
