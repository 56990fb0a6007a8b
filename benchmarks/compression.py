"""Lossless compression of our KV artifacts, measured: the paper calls KV "nearly
incompressible"; this publishes the number for the artifacts we store (format v2, codec.py).

KV computed with transformers (bf16, eager attention, CPU) for a 1024-token document of the
project's corpus, cut into 256-token chunks exactly as a publish does, for two models with
**seeded random weights** (no model hub here): the tiny test model and the Qwen3-0.6B shape
(28 layers, 8 KV heads of 128). Per codec: the ratio (v1 chunk bytes / stored bytes),
encode and decode GB/s of KV (decode = what a load does: decompress, byte planes back,
checksum, tensor views), also without byte planes (the same codec on the interleaved bytes);
then per tier the KV GB/s a load gets: the RAM tier holds engine block images (never
compressed); the disk tier reads the stored object (page cache warm) then decodes; remote
tiers are modelled from the measured decode speed and a link's nominal rate (stored bytes /
link + decode), for 10 and 1 Gbit/s. Medians of ``--reps``.

    python benchmarks/compression.py                      # both models, ~2-4 minutes on 2 cores
    python benchmarks/compression.py --models tiny --reps 1 --tokens 512   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.report import write_report  # noqa: E402
from vllm_kvcdn.artifact import codec as codecs  # noqa: E402
from vllm_kvcdn.artifact.chunk_format import as_v1, decode_chunk, encode_chunk, read_chunk_header  # noqa: E402

CODECS = ["zstd:1", "zstd:3", "zstd:9", "lz4", "zlib:6"]
CHUNK = 256
LINKS_GBIT = (10, 1)


def document_kv(shape: str, tokens: int, workdir: Path) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(token ids, per layer (K, V) as [tokens, kv_heads, head_dim]) of the corpus' first words."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvcdn.testing.tiny_model import corpus, make_model

    model_dir = make_model(workdir / shape, shape, seed=0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(" ".join(corpus()[:4000])).input_ids[:tokens]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, attn_implementation="eager")
    with torch.inference_mode():
        cache = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1).past_key_values
    return ids, [(layer.keys[0].transpose(0, 1).contiguous(), layer.values[0].transpose(0, 1).contiguous())
                 for layer in cache.layers]


def chunks(ids, kv, spec: str | None) -> list[bytes]:
    out = []
    for s in range(0, len(ids), CHUNK):
        e = min(s + CHUNK, len(ids))
        out.append(encode_chunk(f"{s:064x}", "0" * 64, "f" * 64, ids[s:e], [k[s:e].contiguous() for k, _ in kv],
                                [v[s:e].contiguous() for _, v in kv], codec=spec)[0])
    return out


def median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(model: str, ids, kv, reps: int, store_dir: Path) -> list[dict]:
    from vllm_kvcdn.store.file import FileStore

    raw = chunks(ids, kv, None)
    raw_bytes = sum(len(c) for c in raw)
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in kv)
    buffer = memoryview(bytearray(max(len(c) for c in raw)))
    store = FileStore(store_dir / model, durable=False)
    rows = []
    for spec in [None, *CODECS]:
        encode_s = median(lambda: chunks(ids, kv, spec), reps) if spec else 0.0
        stored = chunks(ids, kv, spec)
        for i, c in enumerate(stored):
            store.put(f"{spec or 'raw'}/{i}", c)

        def decode_all():
            for c in stored:
                buffer[: len(c)] = c  # as a read leaves it in its buffer
                decode_chunk(buffer[: len(c)], out=buffer, verify=True)

        def read_and_decode_all():
            for i in range(len(stored)):
                data = store.get(f"{spec or 'raw'}/{i}", buffer)
                decode_chunk(data, out=buffer, verify=True)

        decode_s = median(decode_all, reps)
        disk_s = median(read_and_decode_all, reps)
        size = sum(len(c) for c in stored)
        row = {"model": model, "codec": spec or "none (v1)", "ratio": raw_bytes / size, "stored_mb": size / 1e6,
               "encode_gbps": kv_bytes / encode_s / 1e9 if spec else "-", "decode_gbps": kv_bytes / decode_s / 1e9,
               "disk_gbps": kv_bytes / disk_s / 1e9, "exact": all(as_v1(c) == r for c, r in zip(stored, raw))}
        for gbit in LINKS_GBIT:
            row[f"link{gbit}_gbps"] = kv_bytes / (size / (gbit / 8 * 1e9) + decode_s) / 1e9
        if spec:  # the same codec without byte planes: what the planes buy
            c = codecs.parse(spec)
            offsets = [read_chunk_header(r)[2] for r in raw]
            interleaved = sum(o + len(c.compress(memoryview(r)[o:])) for r, o in zip(raw, offsets))
            row["ratio_no_planes"] = raw_bytes / interleaved
        rows.append(row)
        print(f"[compression] {model} {row['codec']}: {row['ratio']:.3f}x, decode {row['decode_gbps']:.2f} GB/s, "
              f"disk {row['disk_gbps']:.2f} GB/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,qwen3-0.6b", help="tiny_model shapes, comma-separated")
    p.add_argument("--tokens", type=int, default=1024, help="document tokens (chunks of 256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.models.split(","):
            ids, kv = document_kv(shape, args.tokens, Path(tmp))
            rows += measure(shape, ids, kv, args.reps, Path(tmp) / "store")

    def plot(ax):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [r for r in rows if r["model"] == model]
            ax.scatter([r["decode_gbps"] for r in pts], [r["ratio"] for r in pts], label=model)
            for r in pts:
                ax.annotate(r["codec"], (r["decode_gbps"], r["ratio"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("decode GB/s of KV (load path: decompress, planes, checksum)")
        ax.set_ylabel("compression ratio (v1 bytes / stored)")
        ax.legend(fontsize=8)

    columns = [("model", "model"), ("codec", "codec"), ("ratio", "ratio"), ("ratio_no_planes", "ratio, no planes"),
               ("stored_mb", "stored MB"), ("encode_gbps", "encode GB/s"), ("decode_gbps", "decode GB/s"),
               ("disk_gbps", "disk tier: read+decode GB/s"),
               *[(f"link{g}_gbps", f"remote {g} Gbit/s: GB/s") for g in LINKS_GBIT], ("exact", "byte-exact")]
    notes = ("KV of a 1024-token corpus document, bf16, computed with transformers on CPU; **random weights** "
             "(seeded), 256-token chunks. GB/s are of KV delivered. The RAM tier keeps engine block images "
             "uncompressed (a memcpy). Remote rows are modelled: stored bytes at the link's nominal rate + measured "
             "decode time.")
    path = write_report(args.out, "compression", title="Lossless compression of KV artifacts (format v2)", rows=rows,
                        columns=columns, notes=notes, plot=plot, extra={"args": vars(args)})
    print(path.read_text())


if __name__ == "__main__":
    main()
