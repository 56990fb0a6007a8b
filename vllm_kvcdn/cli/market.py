"""``kvcdn usage`` and ``kvcdn economics``: metered reads, priced, and the paper's cost model."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from vllm_kvcdn.cli import side_api
from vllm_kvcdn.defaults import default_ledger_path
from vllm_kvcdn.market import economics, ledger, usage


def _when(value: str) -> float:
    """Unix seconds, or an ISO 8601 date / date and time (local time unless it says)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither unix seconds nor an ISO 8601 date") from None


def _json_file(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvcdn: cannot read {path}: {e}") from None


def _tariff(args) -> economics.Tariff:
    try:
        return economics.Tariff.from_dict(_json_file(args.tariff) if args.tariff else None)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"kvcdn: {e}") from None


def _ratios(args) -> economics.ComputeRatios | None:
    if not args.measured:
        return None
    try:
        return economics.load_measured(args.measured)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"kvcdn: {e}") from None


def _compression(value: str) -> float:
    """A lossless ratio, or benchmarks/compression.py's result: the default codec's ratio on
    the largest model measured."""
    try:
        return float(value)
    except ValueError:
        pass
    from vllm_kvcdn.artifact.codec import DEFAULT

    rows = [r for r in _json_file(value).get("rows", []) if r.get("codec") == DEFAULT]
    if not rows:
        raise SystemExit(f"kvcdn: {value} has no row for codec {DEFAULT} (a benchmarks/compression.py result?)")
    return max(rows, key=lambda r: r["stored_mb"])["ratio"]


def cmd_usage(args) -> None:
    filters = dict(document=args.document, tenant=args.tenant, since=args.since, until=args.until)
    if args.server:
        server = side_api.client(args)
        rep = side_api.call(lambda: server.usage(cache_salt=args.salt, detail=args.detail or None, **filters))
    else:
        path = Path(args.ledger).expanduser()
        if not path.exists():
            raise SystemExit(f"kvcdn: no ledger at {path} (a server writes it: kv_connector_extra_config.ledger_path, "
                             f"$KVCDN_LEDGER); or ask a server: --server URL")
        if args.salt:
            filters["tenant"] = ledger.tenant_of(args.salt)
        f = ledger.Filters(**filters)
        rep = usage.report(path, f, _tariff(args), _ratios(args) or economics.PAPER_RATIOS)
        if args.detail:
            rep["reads"] = [r.__dict__ for r in ledger.reads(path, f)]
    if args.format == "json":
        print(json.dumps(rep, indent=1))
    elif args.format == "csv":
        sys.stdout.write(usage.as_csv(rep))
    else:
        print(usage.as_table(rep))


def _money(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.5f}"


def cmd_economics(args) -> None:
    ratios = _ratios(args)
    ex = economics.worked_example(_tariff(args), ratios, reads=args.reads, tokens=args.tokens,
                                  compression=_compression(args.compression), months=args.months)
    if args.json:
        print(json.dumps({"reads": ex.reads, "tokens": ex.tokens, "artifact_bytes": ex.artifact_bytes,
                          "ratio": ex.ratio, "compression": ex.compression, "months": ex.months, "c_p": ex.c_p,
                          "c_l": ex.c_l, "break_even_reads": ex.n_star, "tariff": ex.tariff.__dict__,
                          "ratios": ex.ratios.source, "lines": [line.__dict__ for line in ex.lines]}, indent=1))
    else:
        print(render(ex, paper=ratios is None))
    if args.plot:
        plot(ex, args.plot)
        print(f"plot: {args.plot}")


def render(ex: economics.Example, paper: bool) -> str:
    t = ex.tariff
    gb = ex.artifact_bytes / ex.gb
    what = "The paper's worked example" if paper else "The worked example from our measurements"
    out = [f"{what}: a {ex.tokens:,}-token document read {ex.reads:,.0f} times", "",
           "inputs:",
           f"  input price       ${t.input_usd_per_mtok:g} per 1M tokens -> C_p = {_money(ex.c_p)} per prefill",
           f"  read / prefill    C_l / C_p = 1/{1 / ex.ratio:.3g} ({ex.ratios.source}) -> C_l = {_money(ex.c_l)}",
           f"  artifact          s = {ex.artifact_bytes / 1e6:,.1f} MB = {gb:.3f} GB"
           + (" (the paper's MB / 1024)" if ex.gb == economics.PAPER_GB else "")
           + (f", {ex.compression:.3g}x lossless -> {gb / ex.compression:.3f} GB shipped/stored"
              if ex.compression != 1 else ""),
           f"  egress            beta = ${t.egress_usd_per_gb:g}/GB -> "
           f"{_money(t.egress_usd_per_gb * gb / ex.compression)} per shipped load",
           f"  storage           sigma = ${t.storage_usd_per_gb_month:g}/GB-month, T = {ex.months:g} month",
           f"  cache-read price  {t.cache_read_multiplier:g}x the input price", "",
           f"{'strategy':44} {'cost':>13} {'paper':>13}  how"]
    for line in ex.lines:
        v = line.paper_usd
        # as the paper prints it: exact dollars, or ~$X.YM
        paper_col = "" if v is None else f"~${v / 1e6:.1f}M" if v % 1000 == 0 else f"${v:,.0f}"
        out.append(f"{line.strategy:44} {_money(line.usd):>13} {paper_col:>13}  {line.how}")
    n = ex.n_star
    out += ["", f"break-even (3): N* = C_p / (C_p - C_l) = {n:.4g}: reuse costs less from read "
                f"{int(n) + 1 if n != float('inf') else 'never'} on"]
    if paper:
        out.append("(the paper rounds $30,374 to $30,370; in SI gigabytes the shipped lines are 2.4% higher)")
    return "\n".join(out)


def plot(ex: economics.Example, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reads = [10 ** (i / 4) for i in range(0, 4 * 8 + 1)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, ys in economics.per_call_curves(ex, reads).items():
        ax.plot(reads, ys, label=label)
    ax.axvline(ex.n_star, color="grey", linestyle=":", label=f"break-even N* = {ex.n_star:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("reads N")
    ax.set_ylabel("cost per call ($)")
    ax.set_title(f"{ex.tokens}-token document: cost per call vs reads", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parsers(sub) -> None:
    p = sub.add_parser("usage", help="metered cache reads per document and tenant, priced at a tariff",
                       description="Reads from a server's ledger (--server, with the publisher key or your "
                                   "--salt) or from a ledger file on this machine (--ledger).")
    p.add_argument("--server", default=None, help="a kvcdn server URL (its own tariff applies)")
    p.add_argument("--key", default=None, help="publisher key: every tenant (default: $KVCDN_PUBLISHER_KEY)")
    p.add_argument("--salt", default=None, help="your cache_salt: your own reads only")
    p.add_argument("--ledger", default=default_ledger_path() or None,
                   help=f"a ledger file, without --server (default: $KVCDN_LEDGER or {default_ledger_path()})")
    p.add_argument("--document", default=None, help="a document id (a prefix of 8+ characters is enough)")
    p.add_argument("--tenant", default=None, help="a tenant id (as the report shows it)")
    p.add_argument("--since", type=_when, default=None, help="unix seconds or an ISO date/time (inclusive)")
    p.add_argument("--until", type=_when, default=None, help="unix seconds or an ISO date/time (exclusive)")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.add_argument("--detail", action="store_true", help="with --format json: every read, not only the sums")
    p.add_argument("--tariff", default=None, help="a JSON file of prices (economics.Tariff), without --server")
    p.add_argument("--measured", default=None, help="a benchmark result whose ratios price compute, without --server")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("economics", help="the paper's cost model: its worked example, or ours from measurements",
                       description="With no arguments: the paper's worked example from formulas (1)-(4), every "
                                   "input printed. --measured recomputes it from one of our benchmark results.")
    p.add_argument("--measured", default=None,
                   help="benchmarks/results/*.json of gpu_paper_table.py or paper_table.py: our read/prefill ratios "
                        "and artifact size")
    p.add_argument("--reads", type=float, default=economics.PAPER_READS, help="N, reads of the document (80M)")
    p.add_argument("--tokens", type=int, default=economics.PAPER_TOKENS, help="L, the document's tokens (3774)")
    p.add_argument("--tariff", default=None, help="a JSON file of prices (default: the paper's)")
    p.add_argument("--compression", default="1",
                   help="lossless compression ratio of shipped and stored bytes, or a benchmarks/compression.py "
                        "result (its ratio for the default codec)")
    p.add_argument("--months", type=float, default=1.0, help="T, months the artifact is stored")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot cost per call against N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_economics)
