"""The usage report: the ledger's reads per document and tenant, priced at a tariff.

For each (document, tenant): what the reader was billed (loaded tokens at the cache-read
price), what they saved against re-prefilling those tokens, and the provider's estimated
compute cost of serving the reads (the re-prefill price times the measured read/prefill
ratio at the document's length: economics.ComputeRatios). Shared by
``GET /kvcdn/v1/usage`` and ``kvcdn usage``; imports nothing heavy.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

from vllm_kvcdn.market import ledger
from vllm_kvcdn.market.economics import ComputeRatios, Tariff

MONEY = ("billed_usd", "saved_usd", "compute_usd")
COLUMNS = ["document", "tenant", "reads", "loaded_tokens", "cached_tokens", "computed_tokens", "store_bytes",
           "load_seconds", *MONEY]


def priced(t: ledger.Totals, tariff: Tariff, ratios: ComputeRatios) -> dict:
    row = asdict(t)
    full = tariff.prefill_usd(t.loaded_tokens)  # re-prefilling what was loaded
    row["billed_usd"] = full * tariff.cache_read_multiplier
    row["saved_usd"] = full - row["billed_usd"]
    row["compute_usd"] = full * ratios.ratio(t.loaded_tokens / max(t.reads, 1))
    return row


def report(path: str | Path, filters: ledger.Filters, tariff: Tariff, ratios: ComputeRatios) -> dict:
    rows = [priced(t, tariff, ratios) for t in ledger.totals(path, filters)]
    total = {k: sum(r[k] for r in rows) for k in COLUMNS[2:]}
    return {
        "filters": {k: v for k, v in asdict(filters).items() if v is not None},
        "tariff": asdict(tariff),
        "compute_ratios": ratios.source,
        "rows": rows,
        "total": total,
    }


def as_csv(rep: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rep["rows"])
    return out.getvalue()


def as_table(rep: dict) -> str:
    def money(x: float) -> str:
        return f"${x:,.4f}" if x < 100 else f"${x:,.0f}"

    header = f"{'document':16}  {'tenant':21}  {'reads':>7}  {'loaded tok':>11}  {'computed':>9}  " \
             f"{'billed':>10}  {'saved':>10}  {'compute':>10}"
    lines = [header]
    for r in [*rep["rows"], {"document": "total", "tenant": "", **rep["total"]}]:
        lines.append(f"{r['document'][:16]:16}  {r['tenant'][:21]:21}  {r['reads']:>7,}  {r['loaded_tokens']:>11,}  "
                     f"{r['computed_tokens']:>9,}  {money(r['billed_usd']):>10}  {money(r['saved_usd']):>10}  "
                     f"{money(r['compute_usd']):>10}")
    t = rep["tariff"]
    lines.append(f"tariff: ${t['input_usd_per_mtok']:g} per 1M input tokens, cache reads at "
                 f"{t['cache_read_multiplier']:g}x; compute: {rep['compute_ratios']}")
    return "\n".join(lines)
