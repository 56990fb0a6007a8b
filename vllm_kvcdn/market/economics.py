"""The paper's cost model (formulas (1)-(4)), a tariff, and compute ratios measured by us.

Notation (the paper's, section 5): for one document of L tokens read N times,
``C_p`` is the cost to prefill it, ``C_l`` the cost of a read (loading / attending over
the stored KV), ``s`` the artifact's bytes, ``beta`` the egress price per byte (once per
load, when the artifact is shipped to the reader), ``sigma`` the storage price per byte
and month, ``T`` the hosting horizon in months. Costs are priced the paper's way: a
prefill costs its tokens at the input price, and a read costs that times the measured
compute ratio ``C_l / C_p``.

Imports nothing heavy (``kvcdn economics`` and the usage report run without torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

# The paper's Table 1: Qwen3-4B fp16 on an Apple M1 Pro. (tokens, prefill s, reuse step s, KV MB)
PAPER_TABLE = [(255, 0.67, 0.078, 38), (485, 1.29, 0.093, 72), (945, 2.65, 0.122, 139),
               (1888, 5.81, 0.179, 278), (3774, 14.71, 0.296, 557)]
PAPER_SPEEDUP_3774 = 49.7  # the ratio the paper's worked example uses (Table 1, rounded)
PAPER_READS = 80_000_000
PAPER_TOKENS = 3774
# The paper's worked example converts its 557 MB artifact to 0.544 "GB" (MB / 1024): that is
# what gives its $0.049 per load and $3.9M; in SI gigabytes the same line is $4.0M.
PAPER_GB = 1.024e9
GB = 1e9


@dataclass(frozen=True)
class Tariff:
    """Prices a provider charges and pays (defaults: the paper's worked example)."""

    input_usd_per_mtok: float = 5.0  # $0.019 of prefill for 3774 tokens, as in the paper
    cache_read_multiplier: float = 0.1  # a cache read's price / the input price (hosted APIs: 0.1x)
    storage_usd_per_gb_month: float = 0.023  # object storage, standard class
    egress_usd_per_gb: float = 0.09  # commodity internet egress, as in the paper

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"kvcdn: tariff.{f.name} must be a number >= 0, got {value!r}")
        if self.cache_read_multiplier > 1:
            raise ValueError(f"kvcdn: tariff.cache_read_multiplier must be <= 1 (a read billed above a "
                             f"prefill), got {self.cache_read_multiplier!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "Tariff":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"kvcdn: unknown tariff keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def prefill_usd(self, tokens: float) -> float:
        return tokens * self.input_usd_per_mtok / 1e6


@dataclass(frozen=True)
class ComputeRatios:
    """Measured read cost / prefill cost by document length (log-log interpolation between
    measured lengths, the nearest measurement outside them)."""

    points: tuple[tuple[int, float, float], ...]  # (tokens, prefill s, read s), by tokens
    source: str
    bytes_per_token: float | None = None  # the artifact's measured size per token, if known

    def ratio(self, tokens: float) -> float:
        pts = self.points
        if tokens <= pts[0][0]:
            return pts[0][2] / pts[0][1]
        for (l0, p0, r0), (l1, p1, r1) in zip(pts, pts[1:]):
            if tokens <= l1:
                w = math.log(tokens / l0) / math.log(l1 / l0)
                return math.exp((1 - w) * math.log(r0 / p0) + w * math.log(r1 / p1))
        return pts[-1][2] / pts[-1][1]


PAPER_RATIOS = ComputeRatios(tuple((n, p, r) for n, p, r, _ in PAPER_TABLE),
                             "the paper's Table 1 (Qwen3-4B fp16, Apple M1 Pro: one reuse step vs prefill)",
                             bytes_per_token=36 * 2 * 8 * 128 * 2)


def load_measured(path: str | Path) -> ComputeRatios:
    """Ratios from one of our benchmark results: ``gpu_paper_table.py`` (transformers:
    ``prefill_s`` vs ``reuse_s``, the paper's definition) or ``paper_table.py`` (vLLM:
    cold TTFT ``cold_s`` vs a whole kvcdn hit ``kvcdn_s``, load included)."""
    data = json.loads(Path(path).read_text())
    points, sizes = [], []
    for row in data.get("rows", []):
        if "prefill_s" in row and "reuse_s" in row:
            n, p, r, what = row["length"], row["prefill_s"], row["reuse_s"], "one reuse step vs prefill"
        elif "cold_s" in row and "kvcdn_s" in row:
            n, p, r = row["L"], row["cold_s"], row["kvcdn_s"]
            what = "a kvcdn hit's TTFT (load included) vs a cold prefill"
        else:
            continue
        if p and r:
            points.append((int(n), float(p), float(r)))
            if row.get("kv_mb"):
                sizes.append(row["kv_mb"] * 1e6 / n)
    if not points:
        raise ValueError(f"{path}: no rows with prefill and read times (expected a result of "
                         f"benchmarks/gpu_paper_table.py or benchmarks/paper_table.py)")
    machine = data.get("machine", {})
    gpu = data.get("gpu")  # gpu_paper_table.py: the GPU's name
    where = gpu if isinstance(gpu, str) and gpu.startswith(("NVIDIA", "Tesla")) else (
        machine.get("cpu_model") or f"{machine.get('cpus', '?')} CPUs")
    return ComputeRatios(tuple(sorted(points)), f"{Path(path).name}: {data.get('title', '')} on {where} ({what})",
                         bytes_per_token=sum(sizes) / len(sizes) if sizes else None)


# -- the paper's formulas ---------------------------------------------------------------

def from_scratch(n: float, c_p: float) -> float:
    """(1): every read prefills."""
    return n * c_p


def kv_reuse(n: float, c_p: float, c_l: float) -> float:
    """(2): one prefill, then n reads."""
    return c_p + n * c_l


def break_even(c_p: float, c_l: float) -> float:
    """(3): the reads after which reuse costs less than from scratch, N* = C_p / (C_p - C_l)."""
    return math.inf if c_l >= c_p else c_p / (c_p - c_l)


def storage_aware(n: float, c_p: float, c_l: float, s: float, beta: float, sigma: float, months: float) -> float:
    """(4): reuse plus egress per load (beta * s) and storage over the horizon (sigma * s * T)."""
    return c_p + n * (c_l + beta * s) + sigma * s * months


@dataclass(frozen=True)
class Line:
    strategy: str
    usd: float
    how: str
    paper_usd: float | None = None  # the paper's figure, in paper mode


@dataclass(frozen=True)
class Example:
    reads: float
    tokens: int
    artifact_bytes: float
    ratio: float  # C_l / C_p at this length
    compression: float  # lossless ratio applied to shipped and stored bytes
    months: float
    tariff: Tariff
    ratios: ComputeRatios
    gb: float  # bytes per GB in the prices
    lines: list[Line]

    @property
    def c_p(self) -> float:
        return self.tariff.prefill_usd(self.tokens)

    @property
    def c_l(self) -> float:
        return self.c_p * self.ratio

    @property
    def n_star(self) -> float:
        return break_even(self.c_p, self.c_l)


def worked_example(tariff: Tariff = Tariff(), ratios: ComputeRatios | None = None, *, reads: float = PAPER_READS,
                   tokens: int = PAPER_TOKENS, compression: float = 1.0, months: float = 1.0) -> Example:
    """The paper's section 7 table. Without ``ratios`` it is the paper's own example (its
    ratio 49.7, its 557 MB artifact and its GB); with them, our measurements."""
    paper = ratios is None
    ratios = ratios or PAPER_RATIOS
    ratio = 1 / PAPER_SPEEDUP_3774 if paper and tokens == PAPER_TOKENS else ratios.ratio(tokens)
    per_token = ratios.bytes_per_token or PAPER_RATIOS.bytes_per_token
    size = 557e6 if paper and tokens == PAPER_TOKENS else tokens * per_token
    gb = PAPER_GB if paper else GB
    c_p = tariff.prefill_usd(tokens)
    c_l = c_p * ratio
    beta, sigma = tariff.egress_usd_per_gb / gb, tariff.storage_usd_per_gb_month / gb
    shipped = size / compression
    figures = {"re-prefill": 1_509_600, "raw": 3.9e6, "int8": 2.0e6, "priced": 150_960, "physical": 30_370}

    def line(key: str, strategy: str, usd: float, how: str) -> Line:
        return Line(strategy, usd, how, figures[key] if paper and key in figures else None)

    lines = [
        line("re-prefill", "re-prefill (today)", from_scratch(reads, c_p), "(1) N * C_p"),
        line("raw", "ship the artifact, lossless" + (f" ({compression:.3g}x)" if compression != 1 else " (raw)"),
             reads * beta * shipped, "N * beta * s (egress per load)"),
        line("int8", "ship int8 (lossy, inexact)", reads * beta * size / 2, "N * beta * s / 2 (int8 halves bf16)"),
        line("priced", f"host, priced at {tariff.cache_read_multiplier:g}x", reads * c_p * tariff.cache_read_multiplier,
             "N * C_p * multiplier (what readers pay)"),
        line("physical", "host, physical (measured)", kv_reuse(reads, c_p, c_l),
             f"(2) C_p + N * C_l, C_l / C_p = 1/{1 / ratio:.3g}"),
        line("storage", f"host, physical + storage ({months:g} month)",
             storage_aware(reads, c_p, c_l, shipped, 0.0, sigma, months),
             f"(4), beta = 0 (hosted: no egress); storage sigma * s * T = ${sigma * shipped * months:.4f}"),
    ]
    return Example(reads, tokens, size, ratio, compression, months, tariff, ratios, gb, lines)


def per_call_curves(ex: Example, reads: list[float]) -> dict[str, list[float]]:
    """Cost per call against N, for the plot: each strategy's total / N."""
    shipped = ex.artifact_bytes / ex.compression
    beta, sigma = ex.tariff.egress_usd_per_gb / ex.gb, ex.tariff.storage_usd_per_gb_month / ex.gb
    return {
        "re-prefill (1)": [ex.c_p for _ in reads],
        "KV reuse, hosted (2)": [kv_reuse(n, ex.c_p, ex.c_l) / n for n in reads],
        "KV reuse, hosted + storage (4)": [storage_aware(n, ex.c_p, ex.c_l, shipped, 0, sigma, ex.months) / n
                                           for n in reads],
        "KV shipped per load (4)": [storage_aware(n, ex.c_p, ex.c_l, shipped, beta, sigma, ex.months) / n
                                    for n in reads],
        f"cache-read price ({ex.tariff.cache_read_multiplier:g}x)": [ex.c_p * ex.tariff.cache_read_multiplier
                                                                     for _ in reads],
    }
