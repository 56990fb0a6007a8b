"""What signed provenance and sealed private documents cost a load (issue 30): the checksum
every chunk read now hashes (BLAKE3, cryptographic, where it was xxh3), the signature check
per manifest and the decryption of a sealed chunk, beside a load that hashes nothing.

1. Per GB on one core: xxh3-128 (the checksum before), BLAKE3 (now), AES-256-GCM sealing
   and opening (``sealing``), decoding a chunk without hashing; per manifest: Ed25519 signing
   and verification (``provenance``).
2. The worker's load of one document (Qwen3-0.6B's KV shape, random values, vLLM's CPU
   packing op into paged caches on plain tensors, a ``file://`` store in the page cache), per
   length, modes interleaved:
   - ``unhashed``: unsigned documents allowed and ``verify_checksums`` off: the chunks' data
     is not hashed, only their headers' checksums compared with the manifest's (the floor;
     what a single-party store may choose);
   - ``signed``: the document signed, the manifest's signature checked at index time, every
     chunk's data hashed and its checksum compared with the signed manifest's (the default on
     ``s3://``);
   - ``sealed``: the same document signed and private: each chunk opened (AES-256-GCM) first;
   first read (chunk files) and hot (the worker's RAM tier: nothing hashed either way).

    python benchmarks/provenance_cost.py [--lengths 945,3774,8192] [--reps 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import write_report  # noqa: E402

SHAPES = {"kv-0.6b": (28, 8, 128), "kv-tiny": (2, 2, 64)}  # layers, KV heads, head dim
BLOCK, CHUNK = 128, 256
SEALED_SALT = "sealed"  # the private copies of the documents: their own chunk keys
MODES = ("unhashed", "signed", "sealed")


def per_gb_costs(mib: int) -> list[dict]:
    import os

    import blake3
    import torch
    import xxhash

    from vllm_kvcdn.artifact.chunk_format import decode_chunk, encode_chunk
    from vllm_kvcdn.artifact.manifest import Manifest, ManifestChunk
    from vllm_kvcdn.artifact.provenance import PublisherKey, TrustPolicy

    data = os.urandom(mib << 20)
    tokens = max(1, (mib << 20) // (2 * 28 * 8 * 128 * 2))
    kv = [torch.randn(tokens, 8, 128).to(torch.bfloat16) for _ in range(2 * 28)]
    chunk, _ = encode_chunk("a" * 64, "b" * 64, "f" * 64, list(range(tokens)), kv[:28], kv[28:])

    def rate(fn, nbytes: int) -> float:
        fn()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return nbytes / statistics.median(runs) / 1e9

    from vllm_kvcdn.artifact.sealing import FileTenantKey, TenantKeys, object_context

    keys, context = TenantKeys([FileTenantKey.generate()]), object_context("a" * 64)
    sealed = keys.seal(data, context)
    out = memoryview(bytearray(len(data)))  # the loader opens into its pooled read buffers
    rows = [
        {"step": "xxh3-128 (the checksum before)", "gbps": rate(lambda: xxhash.xxh3_128(data).digest(), len(data))},
        {"step": "AES-256-GCM seal (a private publish)", "gbps": rate(lambda: keys.seal(data, context), len(data))},
        {"step": "AES-256-GCM open into a fresh buffer", "gbps": rate(lambda: keys.open(sealed, context), len(data))},
        {"step": "AES-256-GCM open into a reused buffer (a private first read)",
         "gbps": rate(lambda: keys.open(sealed, context, out), len(data))},
        {"step": "BLAKE3, one thread (the checksum now)",
         "gbps": rate(lambda: blake3.blake3(data, max_threads=1).digest(), len(data))},
        {"step": "decode a chunk, no hash (zero-copy views)",
         "gbps": rate(lambda: decode_chunk(chunk, verify=False), len(chunk))},
    ]
    key = PublisherKey.generate()
    chunks = [ManifestChunk(f"{i:064x}", f"{i:064x}", 256, 29_360_128, "blake3:" + "1" * 64) for i in range(32)]
    manifest = Manifest(doc_id="a" * 64, fingerprint="f" * 64, num_tokens=8192, chunk_size=256, chunks=chunks)
    signed = key.sign(manifest)
    trust = TrustPolicy(frozenset({key.public_hex}), allow_unsigned=False)
    for step, fn in (("sign a 32-chunk manifest", lambda: key.sign(manifest)),
                     ("verify a 32-chunk manifest", lambda: trust.verdict(signed))):
        fn()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        rows.append({"step": step, "us": (time.perf_counter() - t0) / 200 * 1e6})
    return rows


class Reader:
    """A reading node: its index (trust policy) and its worker over plain paged caches."""

    def __init__(self, url: str, mode: str, pub_file: Path, shape, max_tokens: int, ram_gib: float,
                 tenant_key: Path):
        import torch

        from vllm_kvcdn.artifact.fingerprint import Fingerprint
        from vllm_kvcdn.artifact.index import ChunkIndex
        from vllm_kvcdn.config import KVCDNConfig
        from vllm_kvcdn.connector.geometry import KVGeometry
        from vllm_kvcdn.connector.kv_layout import layout_for
        from vllm_kvcdn.connector.worker import KVCDNWorker

        layers, heads, dim = shape
        signed = mode != "unhashed"
        self.salt = SEALED_SALT if mode == "sealed" else None
        self.config = KVCDNConfig(store_url=url, chunk_size=CHUNK, ram_tier_gib=ram_gib, load_policy="always",
                                  verify_checksums=signed, allow_unsigned=not signed,
                                  trusted_publishers=[str(pub_file)], load_timeout_s=600,
                                  tenant_keys=[str(tenant_key)] if mode == "sealed" else [])
        self.index = ChunkIndex(self.config.open_store(), "f" * 64, CHUNK, trust=self.config.trust_policy(),
                                keys=self.config.keyring())
        self.index.refresh(force=True)
        geometry = KVGeometry(BLOCK, heads, dim, torch.bfloat16, "auto")
        self.worker = KVCDNWorker(self.config, Fingerprint("f" * 64, {}), self.config.open_store(), geometry,
                                  layout_factory=layout_for)
        blocks = -(-max_tokens // BLOCK) + 1
        self.worker.register_kv_caches({f"model.layers.{i}.attn": torch.zeros(blocks, heads, BLOCK, 2 * dim,
                                                                               dtype=torch.bfloat16)
                                        for i in range(layers)})
        self.n = 0

    def load(self, tokens: list[int]) -> float:
        from vllm_kvcdn.connector.wire import ChunkLoad, KVCDNMetadata, LoadSpec

        match = self.index.match(tokens + [0], self.salt)
        assert match.num_tokens == len(tokens), "the document is not served in this mode"
        chunks = [ChunkLoad(s.key, s.start, s.num_tokens, s.start, s.end, s.num_tokens < CHUNK,
                            tokens[s.start : s.end], dict(c.checksums), c.private)
                  for s, c in zip(match.spans, match.chunks)]
        self.n += 1
        spec = LoadSpec(f"r{self.n}", list(range(-(-len(tokens) // BLOCK))), chunks)
        t0 = time.perf_counter()
        self.worker.start_load_kv(KVCDNMetadata(loads=[spec], idle=True))
        while spec.req_id not in self.worker.take_finished_loads(idle=True):
            pass
        seconds = time.perf_counter() - t0
        assert not self.worker.get_block_ids_with_load_errors(), "a load failed"
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="kv-0.6b", choices=sorted(SHAPES))
    parser.add_argument("--lengths", default="945,3774,8192", help="document lengths in tokens")
    parser.add_argument("--reps", type=int, default=3, help="documents per length (each read once first, then hot)")
    parser.add_argument("--hash-mib", type=int, default=256, help="bytes hashed for the per-GB rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from vllm_kvcdn.artifact.chain import document_chunks
    from vllm_kvcdn.artifact.documents import write_document
    from vllm_kvcdn.artifact.provenance import PublisherKey
    from vllm_kvcdn.artifact.sealing import FileTenantKey, TenantKeys

    torch.set_num_threads(1)
    costs = per_gb_costs(args.hash_mib)
    shape = SHAPES[args.shape]
    layers, heads, dim = shape
    lengths = [int(x) for x in args.lengths.split(",") if x]
    token_bytes = 2 * layers * heads * dim * 2
    work = Path(tempfile.mkdtemp(prefix="kvcdn-provenance-"))
    key = PublisherKey.generate()
    (work / "publisher.pub").write_text(key.public_hex)
    tenant = FileTenantKey.generate()
    tenant.save(work / "tenant.key")
    url = f"file://{work / 'store'}"
    from vllm_kvcdn.store import open_store

    store = open_store(url)
    documents = []
    for length in tqdm(lengths, desc="publishing"):
        kv = [(torch.randn(length, heads, dim).to(torch.bfloat16), torch.randn(length, heads, dim).to(torch.bfloat16))
              for _ in range(layers)]
        for rep in range(args.reps):
            tokens = [(length * 1000 + rep * 100_000 + t) % 150_000 for t in range(length)]
            for salt in (None, SEALED_SALT):
                write_document(store, spans=document_chunks(tokens, "f" * 64, salt, CHUNK), tokens=tokens, kv=kv,
                               fingerprint="f" * 64, profile={}, chunk_size=CHUNK, producer={}, signer=key,
                               salted=bool(salt), keys=TenantKeys([tenant]), private=bool(salt))
            documents.append((length, tokens))
    ram_gib = 1.3 * max(lengths) * token_bytes / 2**30 + 0.1  # a hot read follows its document's first read
    readers = {mode: Reader(url, mode, work / "publisher.pub", shape, max(lengths), ram_gib, work / "tenant.key")
               for mode in MODES}
    times: dict[tuple, list[float]] = {}
    for n, (length, tokens) in enumerate(tqdm(documents, desc="loading")):
        for mode in MODES[n % len(MODES):] + MODES[: n % len(MODES)]:  # interleaved, the order rotating
            for read in ("first", "hot"):
                times.setdefault((length, mode, read), []).append(readers[mode].load(tokens))
    rows = []
    for length in lengths:
        for read in ("first", "hot"):
            base = statistics.median(times[(length, "unhashed", read)])
            for mode in MODES:
                s = statistics.median(times[(length, mode, read)])
                rows.append({"L": length, "read": read, "mode": mode, "seconds": s,
                             "gbps": length * token_bytes / s / 1e9, "vs_unhashed": s / base})
    loads_md = write_report(args.out, f"provenance_loads_{args.shape}", title="A load with signed provenance, "
                            "and of a sealed private document, vs one that hashes nothing", rows=rows,
                            columns=[("L", "document tokens"), ("read", "read"), ("mode", "mode"),
                                     ("seconds", "load s"), ("gbps", "GB/s"), ("vs_unhashed", "x unhashed")],
                            notes=f"Medians of {args.reps} documents per length; one worker per mode, modes "
                                  "interleaved. `first`: from chunk files in the page cache; `hot`: the RAM tier.",
                            plot=lambda ax: _plot(ax, rows, lengths))
    costs_md = write_report(args.out, "provenance_costs", title="Checksums and signatures: cost per GB and per "
                            "manifest (one core)", rows=costs,
                            columns=[("step", "step"), ("gbps", "GB/s"), ("us", "us per call")])
    print(costs_md.read_text())
    print(loads_md.read_text())


def _plot(ax, rows: list[dict], lengths: list[int]) -> None:
    for mode in MODES:
        for read, style in (("first", "-o"), ("hot", "--s")):
            ys = [r["gbps"] for r in rows if r["mode"] == mode and r["read"] == read]
            ax.plot(lengths, ys, style, label=f"{mode}, {read}")
    ax.set_xlabel("document tokens")
    ax.set_ylabel("load GB/s")
    ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
