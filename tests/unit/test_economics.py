"""The paper's cost model: its worked example reproduced, its formulas, our measurements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.rigs import REPO
from vllm_kvcdn.market import economics
from vllm_kvcdn.market.economics import Tariff, break_even, from_scratch, kv_reuse, storage_aware, worked_example

RESULTS = REPO / "benchmarks" / "results"


def test_the_papers_worked_example():
    ex = worked_example()
    usd = {line.strategy: line.usd for line in ex.lines}
    assert usd["re-prefill (today)"] == pytest.approx(1_509_600)
    assert usd["host, priced at 0.1x"] == pytest.approx(150_960)
    assert usd["host, physical (measured)"] == pytest.approx(30_370, rel=1e-3)  # the paper rounds 30,374
    assert round(usd["ship the artifact, lossless (raw)"] / 1e5) / 10 == 3.9  # "~$3.9M"
    assert round(usd["ship int8 (lossy, inexact)"] / 1e5) / 10 == 2.0  # "~$2.0M"
    assert ex.c_p == pytest.approx(0.01887)  # "$0.019 of input-priced prefill"
    assert economics.Tariff().egress_usd_per_gb * ex.artifact_bytes / ex.gb == pytest.approx(0.049, abs=5e-4)
    assert 1 < ex.n_star < 2  # "reuse pays off by the second read"


def test_formulas():
    assert from_scratch(10, 2.0) == 20
    assert kv_reuse(10, 2.0, 0.5) == 7
    assert break_even(2.0, 0.5) == pytest.approx(4 / 3)
    assert kv_reuse(4 / 3, 2.0, 0.5) == pytest.approx(from_scratch(4 / 3, 2.0))  # N* is where (1) = (2)
    assert break_even(1.0, 1.0) == float("inf")
    assert storage_aware(10, 2.0, 0.5, s=100, beta=0.01, sigma=0.001, months=2) == pytest.approx(2 + 10 * 1.5 + 0.2)


def test_ratios_interpolate_between_measured_lengths():
    r = economics.PAPER_RATIOS
    assert r.ratio(3774) == pytest.approx(0.296 / 14.71)
    assert r.ratio(255) == pytest.approx(0.078 / 0.67) and r.ratio(10) == r.ratio(255)
    assert r.ratio(3774) < r.ratio(2500) < r.ratio(1888)


def test_measured_results_of_both_benchmarks(tmp_path):
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"title": "t", "gpu": "NVIDIA H100 80GB HBM3", "rows": [
        {"length": 1000, "prefill_s": 0.1, "reuse_s": 0.01, "kv_mb": 147.456},
        {"length": 4000, "prefill_s": 0.4, "reuse_s": 0.01, "kv_mb": 589.824}]}))
    ratios = economics.load_measured(gpu)
    assert ratios.ratio(4000) == pytest.approx(0.025) and ratios.bytes_per_token == pytest.approx(147_456)
    assert "H100" in ratios.source
    vllm_table = economics.load_measured(RESULTS / "paper_table_qwen3-0.6b.json")  # the committed CPU result
    assert vllm_table.bytes_per_token == pytest.approx(114_688, rel=1e-3)  # Qwen3-0.6B shape, bf16
    ex = worked_example(ratios=ratios, tokens=4000)
    assert ex.ratio == pytest.approx(0.025) and ex.gb == economics.GB and ex.artifact_bytes == 4000 * 147_456
    with pytest.raises(ValueError, match="no rows"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"rows": [{"x": 1}]}))
        economics.load_measured(bad)


def test_lossless_compression_shrinks_the_shipped_and_stored_terms():
    plain, packed = worked_example(compression=1.0), worked_example(compression=1.25)
    raw = [line.usd for line in plain.lines if "lossless" in line.strategy][0]
    compressed = [line.usd for line in packed.lines if "lossless" in line.strategy][0]
    assert compressed == pytest.approx(raw / 1.25)


@pytest.mark.parametrize("tariff, message", [
    ({"input_usd_per_mtok": -1}, ">= 0"), ({"cache_read_multiplier": 2}, "<= 1"), ({"price": 1}, "unknown tariff"),
    ({"egress_usd_per_gb": "cheap"}, "number")])
def test_a_bad_tariff_names_the_field(tariff, message):
    with pytest.raises(ValueError, match=message):
        Tariff.from_dict(tariff)


def test_kvcdn_economics_prints_the_papers_figures_and_plots(tmp_path):
    def cli(*args) -> str:
        return subprocess.run([sys.executable, "-m", "vllm_kvcdn.cli.main", "economics", *args], check=True,
                              capture_output=True, text=True, timeout=120).stdout

    out = cli("--plot", str(tmp_path / "econ.png"))
    for figure in ("$1,509,600", "$150,960", "$30,374", "$30,370", "~$3.9M", "~$2.0M", "$5 per 1M tokens",
                   "1/49.7", "0.544 GB", "N* = C_p / (C_p - C_l) = 1.021"):
        assert figure in out, figure
    assert (tmp_path / "econ.png").stat().st_size > 10_000
    compressed = json.loads(cli("--json", "--compression", str(RESULTS / "compression.json")))
    assert 1.2 < compressed["compression"] < 2  # the measured ratio of the default codec
    measured = json.loads(cli("--measured", str(RESULTS / "paper_table_qwen3-0.6b.json"), "--json"))
    assert measured["ratio"] < 0.1 and measured["break_even_reads"] < 2
    assert "paper_table_qwen3-0.6b.json" in measured["ratios"]
