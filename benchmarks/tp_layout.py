"""How should a tensor-parallel rank store and read its part of a chunk? (issue 28: the
storage layout, decided by measurement.)

One chunk of the Qwen3-0.6B shape (28 layers, 8 KV heads x 128, bf16, 256 tokens: 29 MB),
stored three ways, read the way each rank of TP=1, 2, 4 and 8 would, from ``file://`` (page
cache) and from ``s3://`` (moto's S3 server on loopback, a process of its own):

- ``whole``: one object per chunk, ``[tokens, heads, dim]`` per layer (the one-rank
  format); every rank reads all of it and copies out its heads;
- ``head_major``: one object per chunk, ordered head first, so a rank's heads are one
  contiguous byte range; a rank asks for the header, then for its range;
- ``parts`` (what kvcdn does): one object per rank's part (``artifact.parts``); a rank
  reads its own.

Per rank: bytes read, requests to the store (S3 GETs counted on the boto3 client, ranged
parts included), and the time until its K and V are in memory as ``[tokens, heads, dim]``
per layer (median of ``--reps``; the ranks read one after another here, on separate hosts
they read at once). Writing is not timed: ``whole`` and ``head_major`` need every rank's
heads in one object, so a gather across ranks before each write (or a multipart upload fed
by several ranks); ``parts`` needs nothing.

    python benchmarks/tp_layout.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LAYERS, HEADS, DIM, TOKENS = 28, 8, 128, 256
TP_SIZES = (1, 2, 4, 8)
KEY = "ab" + "0" * 62


def chunk_kv():
    import torch

    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
             torch.randn(TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16)) for _ in range(LAYERS)]


def head_major_bytes(kv) -> bytes:
    """8-byte header length, a JSON header, then per head: per layer K then V ``[tokens, dim]``."""
    import torch

    data = torch.stack([torch.stack([k, v]) for k, v in kv])  # [layers, 2, tokens, heads, dim]
    data = data.permute(3, 0, 1, 2, 4).contiguous()  # [heads, layers, 2, tokens, dim]
    head = json.dumps({"heads": HEADS, "layers": LAYERS, "tokens": TOKENS, "dim": DIM,
                       "head_bytes": data[0].numel() * 2}).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data.view(torch.uint8).numpy().tobytes()


def store_chunk(store, kv) -> None:
    from vllm_kvcdn.artifact.chunk_format import encode_chunk
    from vllm_kvcdn.artifact.parts import KVPart, all_parts
    from vllm_kvcdn.store.keys import chunk_object_key

    tokens = list(range(TOKENS))
    store.put(chunk_object_key(KEY), encode_chunk(KEY, "", "f", tokens, [k for k, _ in kv], [v for _, v in kv])[0])
    for tp in TP_SIZES[1:]:
        for name in all_parts(HEADS, tp):
            p = KVPart.parse(name, HEADS)
            data, _ = encode_chunk(KEY, "", "f", tokens, [k[:, p.first_head : p.end_head] for k, _ in kv],
                                   [v[:, p.first_head : p.end_head] for _, v in kv], part=name)
            store.put(chunk_object_key(KEY, name), data)
    store.put(f"head_major/{KEY}", head_major_bytes(kv))


class Reader:
    """One store's three ways of reading a rank's part, counting bytes and (on a file store)
    requests; S3 GETs, ranged parts included, are counted on the boto3 client."""

    def __init__(self, store, ranged):
        self.store, self.ranged = store, ranged  # ranged(key, start, end) -> bytes (one request)
        self.requests = 0
        self.bytes = 0

    def whole(self, part):
        from vllm_kvcdn.artifact.chunk_format import decode_chunk
        from vllm_kvcdn.store.keys import chunk_object_key

        kv = decode_chunk(self._get(chunk_object_key(KEY)))
        a, b = part.first_head, part.end_head
        return [(k[:, a:b].contiguous(), v[:, a:b].contiguous()) for k, v in zip(kv.keys, kv.values)]

    def parts(self, part):
        from vllm_kvcdn.artifact.chunk_format import decode_chunk
        from vllm_kvcdn.store.keys import chunk_object_key

        kv = decode_chunk(self._get(chunk_object_key(KEY, part.name)), part=part.name)
        return list(zip(kv.keys, kv.values))

    def head_major(self, part):
        import torch

        first = self._range(f"head_major/{KEY}", 0, 4096)  # the header fits in the first 4 KB
        (head_len,) = struct.unpack("<Q", first[:8])
        meta = json.loads(first[8 : 8 + head_len])
        start = 8 + head_len + part.first_head * meta["head_bytes"]
        data = self._range(f"head_major/{KEY}", start, start + part.num_heads * meta["head_bytes"])
        t = torch.frombuffer(bytearray(data), dtype=torch.bfloat16).view(part.num_heads, LAYERS, 2, TOKENS, DIM)
        t = t.permute(1, 2, 3, 0, 4).contiguous()  # [layers, 2, tokens, heads, dim]
        return [(t[i, 0], t[i, 1]) for i in range(LAYERS)]

    def _get(self, key):
        data = self.store.get(key)
        self.bytes += len(data)
        self.requests += 1
        return data

    def _range(self, key, start, end):
        data = self.ranged(key, start, end)
        self.bytes += len(data)
        self.requests += 1
        return data


def file_store(root: Path):
    from vllm_kvcdn.store import open_store

    store = open_store(f"file://{root}")

    def ranged(key, start, end):
        with open(root / key, "rb") as f:
            return os.pread(f.fileno(), end - start, start)

    return store, ranged


def s3_store(endpoint: str, counter: list):
    import boto3

    from vllm_kvcdn.store import open_store

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tp-layout")
    store = open_store(f"s3://tp-layout/bench?endpoint_url={endpoint}")

    def count(**_):
        counter[0] += 1

    store._client.meta.events.register("before-call.s3.GetObject", count)  # every GET, ranged parts too

    def ranged(key, start, end):
        r = store._client.get_object(Bucket="tp-layout", Key=store.prefix + key, Range=f"bytes={start}-{end - 1}")
        return r["Body"].read()

    return store, ranged


def measure(name: str, store, ranged, reps: int, s3_gets: list | None) -> list[dict]:
    from vllm_kvcdn.artifact.parts import rank_part

    rows = []
    for tp in TP_SIZES:
        for layout in ("whole", "head_major", "parts"):
            if layout == "parts" and tp == 1:
                continue  # one rank's part is the whole chunk
            per_rank = []
            for rank in range(tp):
                part = rank_part(HEADS, tp, rank)
                times, reader = [], None
                for _ in range(reps):
                    reader = Reader(store, ranged)
                    if s3_gets is not None:
                        s3_gets[0] = 0
                    started = time.perf_counter()
                    kv = getattr(reader, layout)(part)
                    times.append(time.perf_counter() - started)
                    assert kv[0][0].shape == (TOKENS, part.num_heads, DIM)
                requests = s3_gets[0] if s3_gets is not None else reader.requests
                per_rank.append((statistics.median(times), reader.bytes, requests))
            rows.append({"store": name, "tp": tp, "layout": layout,
                         "mb_per_rank": per_rank[0][1] / 1e6, "requests_per_rank": per_rank[0][2],
                         "requests_per_load": sum(r[2] for r in per_rank),
                         "ms_per_rank": 1000 * statistics.median(r[0] for r in per_rank)})
            print(f"[tp-layout] {name} TP={tp} {layout}: {rows[-1]['mb_per_rank']:.1f} MB, "
                  f"{rows[-1]['requests_per_rank']} requests, {rows[-1]['ms_per_rank']:.1f} ms per rank")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stores", default="file,s3")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from report import write_report
    from s3_tiers import S3_ENV, start_moto

    kv = chunk_kv()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="tp-layout-"))
    if "file" in args.stores:
        store, ranged = file_store(work / "store")
        store_chunk(store, kv)
        rows += measure("file", store, ranged, args.reps, None)
    if "s3" in args.stores:
        os.environ.update(S3_ENV)
        server, endpoint = start_moto()
        try:
            gets = [0]
            store, ranged = s3_store(endpoint, gets)
            store_chunk(store, kv)
            rows += measure("s3", store, ranged, args.reps, gets)
        finally:
            server.terminate()

    def plot(ax):
        for store in dict.fromkeys(r["store"] for r in rows):
            for layout in ("whole", "head_major", "parts"):
                pts = [(r["tp"], r["ms_per_rank"]) for r in rows if r["store"] == store and r["layout"] == layout]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{store} {layout}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor-parallel size")
        ax.set_ylabel("ms until a rank's KV is in memory (one chunk)")
        ax.legend(fontsize=7)

    path = write_report(
        args.out, "tp_layout_kv-0.6b", title="A rank's part of a chunk: three storage layouts (Qwen3-0.6B shape)",
        rows=rows, columns=[("store", "store"), ("tp", "TP"), ("layout", "layout"), ("mb_per_rank", "MB read / rank"),
                            ("requests_per_rank", "requests / rank"), ("requests_per_load", "requests / load"),
                            ("ms_per_rank", "ms / rank")],
        notes=f"One {TOKENS}-token chunk, {LAYERS} layers x {HEADS} KV heads x {DIM}, bf16 (29 MB whole). file: "
              "page cache; s3: moto on loopback, kvcdn's S3 store (16 MiB ranged parts, in parallel), GETs counted "
              f"on the boto3 client. Median of {args.reps} reads per rank; ranks read one after another.",
        plot=plot)
    print(f"[tp-layout] wrote {path}")


if __name__ == "__main__":
    main()
