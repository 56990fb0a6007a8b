"""The GPU load path against the link: chunks into vLLM-shaped paged caches on a CUDA device.

Runs where vLLM cannot (the lent GPU machine has torch, safetensors and xxhash, no vLLM):
the caches are laid out as vLLM 0.32's ``allocate_kv_cache`` lays them out (one backing
buffer, per layer a logical ``[blocks, kv_heads, block_size, K|V]`` view with the stride
order of ``LBNHC`` = NHD or ``LBHNC`` = HND; ``tests/worker/test_gpu_layouts.py`` checks our layout
on caches vLLM itself allocates). Per shape and stride order:

- ``h2d``: one pinned host-to-device copy of a chunk's bytes (the ceiling);
- ``upload+scatter``: what the GPU path adds once a chunk sits decoded in a pinned read buffer
  (``CacheDevice.upload``: one copy; ``SplitKVLayout.write``: every layer into its slots),
  on a side stream, waited for, as a load job does;
- ``load``: the whole path per chunk, from a chunk file in the page cache: read into a
  pinned buffer, checksum, decode, upload, scatter;
- exactness: every slot read back through the layout equals the stored K/V, bit for bit.

    python benchmarks/gpu_load.py                     # on a CUDA machine, ~1-2 minutes
    python benchmarks/gpu_load.py --device cpu --chunks 2 --shapes kv-tiny   # smoke run, no GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_report  # noqa: E402
from vllm_kvcdn.artifact.chunk_format import decode_chunk, encode_chunk  # noqa: E402
from vllm_kvcdn.connector.device_copies import CacheDevice  # noqa: E402
from vllm_kvcdn.connector.kv_layout import SplitKVLayout  # noqa: E402
from vllm_kvcdn.connector.read_buffers import ReadBuffers  # noqa: E402

SHAPES = {"kv-0.6b": 28, "kv-4b": 36, "kv-tiny": 2}  # layers; all 8 KV heads x 128, bf16 (tiny: smoke tests)
HEADS, DIM, DTYPE, BLOCK, CHUNK = 8, 128, torch.bfloat16, 16, 256
STRIDE_ORDERS = {"NHD": (0, 2, 1, 3), "HND": (0, 1, 2, 3)}  # physical order of the logical [B, H, N, C]


def paged_caches(layers: int, num_blocks: int, order: str, device) -> list[torch.Tensor]:
    """Per-layer logical views over one backing buffer, as vLLM 0.32 allocates them."""
    logical = (num_blocks, HEADS, BLOCK, 2 * DIM)
    physical = [logical[i] for i in STRIDE_ORDERS[order]]
    page = HEADS * BLOCK * 2 * DIM
    backing = torch.zeros(layers * num_blocks * page, dtype=DTYPE, device=device)
    views = []
    for layer in range(layers):
        flat = backing[layer * num_blocks * page:(layer + 1) * num_blocks * page]
        physical_view = flat.view(physical)
        inverse = [STRIDE_ORDERS[order].index(i) for i in range(4)]
        views.append(physical_view.permute(inverse))  # logical dims, physical strides
    return views


def chunk_files(work: Path, layers: int, chunks: int) -> list[tuple[Path, list, list]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in range(chunks):
        keys = [torch.randn(CHUNK, HEADS, DIM, generator=gen).to(DTYPE) for _ in range(layers)]
        values = [torch.randn(CHUNK, HEADS, DIM, generator=gen).to(DTYPE) for _ in range(layers)]
        data, _ = encode_chunk(f"{n:064x}", "0" * 64, "f" * 64, list(range(CHUNK)), keys, values)
        path = work / f"chunk{n}"
        path.write_bytes(data)
        out.append((path, keys, values))
    return out


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shape: str, order: str, chunks: int, rounds: int, device, work: Path) -> dict:
    layers = SHAPES[shape]
    files = chunk_files(work, layers, chunks)
    nbytes = files[0][0].stat().st_size
    buffers = ReadBuffers(1, nbytes, pin=device.type == "cuda")
    buffer = buffers.acquire()
    blocks_per_chunk = CHUNK // BLOCK
    caches = paged_caches(layers, chunks * blocks_per_chunk + 1, order, device)
    layout = SplitKVLayout(BLOCK, BLOCK, DIM)
    mover = CacheDevice(device)
    mover.moves = True  # on a CPU smoke run the "device" copy lands in host memory
    kv_bytes = layers * 2 * CHUNK * HEADS * DIM * DTYPE.itemsize

    def slots(n: int) -> torch.Tensor:  # chunk n in blocks 1 + n * blocks_per_chunk ... (block 0 is vLLM's null block)
        return torch.arange(CHUNK) + (1 + n * blocks_per_chunk) * BLOCK

    def read_into_buffer(path: Path):
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(buffer)
        return decode_chunk(buffer[:got], verify=True)

    def upload_and_scatter(chunk, n: int) -> None:
        with mover.side_stream():
            moved = mover.upload(chunk.keys + chunk.values, buffer)
            where = mover.index(slots(n))
            for cache, k, v in zip(caches, moved[:layers], moved[layers:]):
                layout.write(cache, k, v, where)

    host = torch.frombuffer(buffer, dtype=torch.uint8)[:nbytes]
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = {"h2d": [], "upload_scatter": [], "load": []}
    for _ in range(rounds):
        for n, (path, _, _) in enumerate(files):
            chunk = read_into_buffer(path)
            synchronize(device)
            t = time.perf_counter()
            on_device.copy_(host, non_blocking=True)
            synchronize(device)
            times["h2d"].append(time.perf_counter() - t)
            t = time.perf_counter()
            upload_and_scatter(chunk, n)
            times["upload_scatter"].append(time.perf_counter() - t)
            t = time.perf_counter()
            upload_and_scatter(read_into_buffer(path), n)
            times["load"].append(time.perf_counter() - t)
    exact = all(
        torch.equal(layout.read(cache, mover.index(slots(n)))[0].cpu(), keys[layer])
        and torch.equal(layout.read(cache, mover.index(slots(n)))[1].cpu(), values[layer])
        for n, (_, keys, values) in enumerate(files) for layer, cache in enumerate(caches)
    )
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    h2d_gbps = nbytes / median["h2d"] / 1e9
    row = {"shape": shape, "order": order, "chunk_mb": nbytes / 1e6, "h2d_gbps": h2d_gbps,
           "upload_scatter_gbps": kv_bytes / median["upload_scatter"] / 1e9,
           "load_gbps": kv_bytes / median["load"] / 1e9, "exact": exact}
    row["upload_scatter_vs_h2d"] = row["upload_scatter_gbps"] / h2d_gbps
    row["load_vs_h2d"] = row["load_gbps"] / h2d_gbps
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    p.add_argument("--shapes", default="kv-0.6b,kv-4b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--orders", default="NHD,HND", help="stride orders: NHD (LBNHC), HND (LBHNC)")
    p.add_argument("--chunks", type=int, default=16, help="chunks of 256 tokens per run (16: a 4096-token document)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu for a smoke run")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for shape in args.shapes.split(","):
            for order in args.orders.split(","):
                rows.append(measure(shape, order, args.chunks, args.rounds, device, Path(work)))
                print(rows[-1], flush=True)
    name = f"gpu_load_{device.type}"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (smoke run on the CPU)"
    try:
        import matplotlib  # noqa: F401

        def plot(ax):
            labels = [f"{r['shape']}\n{r['order']}" for r in rows]
            x = range(len(rows))
            for i, (key, label) in enumerate([("h2d_gbps", "pinned H2D copy"),
                                              ("upload_scatter_gbps", "upload + scatter"),
                                              ("load_gbps", "whole load (file in page cache)")]):
                ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] for r in rows], width=0.27, label=label)
            ax.set_xticks(list(x), labels)
            ax.set_ylabel("GB/s of KV")
            ax.legend(fontsize=8)
    except ImportError:
        plot = None
    write_report(args.out, name, title=f"GPU load path ({gpu})", rows=rows, plot=plot,
                 columns=[("shape", "shape"), ("order", "stride order"), ("chunk_mb", "chunk MB"),
                          ("h2d_gbps", "pinned H2D GB/s"), ("upload_scatter_gbps", "upload+scatter GB/s"),
                          ("upload_scatter_vs_h2d", "vs H2D"), ("load_gbps", "whole load GB/s"),
                          ("load_vs_h2d", "vs H2D"), ("exact", "exact")],
                 extra={"gpu": gpu, "args": vars(args)},
                 notes="Medians over every chunk of every round. Goal: upload+scatter >= 70 % of the pinned copy.")


if __name__ == "__main__":
    main()
