"""Keep the benchmark scripts working: each runs once on the tiny model, one repetition.
(Timings are not checked here; benchmarks/README.md holds the measured figures.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.rigs import REPO

BENCH = REPO / "benchmarks"


def run(script: str, *args: str, timeout: float = 900) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_paper_table_runs_and_every_hit_is_checked(tiny_model, tmp_path):
    run("paper_table.py", "--model", str(tiny_model), "--shape", "tiny", "--lengths", "300", "--reps", "1",
        "--kv-cache-gib", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "paper_table_tiny.json").read_text())
    (row,) = result["rows"]
    assert row["failed"] == "" and row["kvcdn_s"] > 0 and row["cold_s"] > 0 and row["kvcdn_image_s"] > 0
    assert (tmp_path / "paper_table_tiny.png").stat().st_size > 0 and (tmp_path / "paper_table_tiny.md").exists()


def test_serve_harness_runs_with_hits(tiny_model, tmp_path):
    run("serve_harness.py", "--model", str(tiny_model), "--shape", "tiny", "--prefix-len", "300",
        "--num-prefixes", "2", "--num-prompts", "4", "--concurrency", "2", "--variants", "vllm,kvcdn",
        "--kv-cache-gib", "1", "--out", str(tmp_path))
    rows = {r["variant"]: r for r in json.loads((tmp_path / "serve_harness_tiny.json").read_text())["rows"]}
    assert rows["vllm"]["completed"] == 4 and rows["kvcdn"]["completed"] == 4
    assert rows["kvcdn"]["kvcdn_loaded_tokens"] > 0 and rows["kvcdn"]["failed"] == ""


def test_cross_profile_runs(tiny_model, tmp_path):
    run("cross_profile.py", "--model", str(tiny_model), "--docs", "1", "--new-tokens", "8", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "cross_profile.json").read_text())["summary"]
    assert 0.0 <= summary["agree_vllm_artifact"] <= 1.0


def test_exactness_runs_and_a_hit_equals_vllm_computing_the_same_spans(tiny_model, tmp_path):
    run("exactness.py", "--model", str(tiny_model), "--shape", "tiny", "--lengths", "300", "--new-tokens", "4",
        "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "exactness_tiny.json").read_text())["rows"]
    assert row["hit_equals_doc_step"] is True and row["hit_computed"] == 16
    assert (tmp_path / "exactness_kernel.md").exists() and (tmp_path / "exactness_tiny.png").stat().st_size > 0


def test_async_io_runs_both_modes_with_real_loads_and_publishes(tiny_model, tmp_path):
    run("async_io.py", "--model", str(tiny_model), "--shape", "tiny", "--doc-tokens", "300", "--decoders", "2",
        "--repeats", "1", "--ttft-reads", "2", "--ttft-lengths", "255", "--get-delay-s", "0.01", "--kv-cache-gib", "1",
        "--out", str(tmp_path))
    raw = json.loads((tmp_path / "async_io_tiny.json").read_text())["raw"]
    assert set(raw) == {"in-step", "background"}
    for mode in raw.values():
        phases = {r["phase"]: r for r in mode["phases"]}
        assert phases["load"]["loaded"] == phases["hot"]["loaded"] == 300 and phases["publish"]["published"], phases
        assert all(r["gaps"] > 0 for r in mode["phases"])  # the decoders ran through every window
        (files,), (ram,) = mode["files"], mode["ram"]  # one round of each sweep
        assert files[0]["loaded"] == ram[0]["loaded"] == 255
    assert (tmp_path / "async_io_tiny.png").stat().st_size > 0


def test_s3_tiers_runs_and_every_tier_is_checked(tiny_model, tmp_path):
    run("s3_tiers.py", "--model", str(tiny_model), "--shape", "tiny", "--lengths", "300", "--reps", "1",
        "--kv-cache-gib", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "s3_tiers_tiny.json").read_text())
    (row,) = result["rows"]
    assert row["failed checks"] == "" and row["hit, from S3 (cold node)"] > 0 and row["hit, RAM tier"] > 0
    assert {r["variant"] for r in result["raw"]} == {"cold prefill", "hit, from S3 (cold node)", "hit, RAM tier",
                                                     "hit, disk tier: chunks", "hit, disk tier: block images"}
    assert result["throughput"]["kvcdn_gbps"] > 0


def test_s3_get_only_measures_every_client(tmp_path):
    run("s3_tiers.py", "--shape", "tiny", "--get-only", "2", "--reps", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "s3_get_tiny.json").read_text())["rows"]
    assert [r["client"] for r in rows] == ["kvcdn", "kvcdn, whole objects", "raw"]
    assert all(r["gbps"] > 0 and r["cpu_s_per_gb"] > 0 for r in rows)


def test_publish_interference_measures_every_mode(tmp_path):
    run("publish_interference.py", "--tokens", "256", "--documents", "12", "--seconds", "0.2", "--rounds", "1",
        "--out", str(tmp_path))
    rows = json.loads((tmp_path / "publish_interference.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["alone", "thread", "process"] and all(r["median_ms"] > 0 for r in rows)


def test_gpu_load_runs_on_the_cpu_and_loads_exactly(tmp_path):
    """The GPU benchmark's path (vLLM 0.32-shaped caches, one upload per chunk, per-layer scatter)
    on host memory: no GPU in CI, so only the code and the exactness are checked."""
    run("gpu_load.py", "--device", "cpu", "--shapes", "kv-tiny", "--chunks", "2", "--rounds", "1",
        "--out", str(tmp_path))
    rows = json.loads((tmp_path / "gpu_load_cpu.json").read_text())["rows"]
    assert [r["order"] for r in rows] == ["NHD", "HND"] and all(r["exact"] is True for r in rows)


def test_gpu_paper_table_runs_on_the_cpu(tmp_path):
    """The GPU table's script on the tiny shape: the code path and the exactness check only."""
    run("gpu_paper_table.py", "--device", "cpu", "--shape", "tiny", "--lengths", "255", "--reps", "1",
        "--exactness-length", "260", "--new-tokens", "8", "--work", str(tmp_path / "work"), "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu_paper_table_tiny_cpu.json").read_text())
    (row,) = result["rows"]
    assert row["prefill_s"] > 0 and row["reuse_s"] > 0 and row["hit_store_s"] > 0
    assert result["exactness"]["loaded_tokens"] == 260 and 0 <= result["exactness"]["greedy_agree"] <= 8
    # `kvcdn economics` takes this result as its measurements
    out = subprocess.run([sys.executable, "-m", "vllm_kvcdn.cli.main", "economics", "--json", "--tokens", "255",
                          "--measured", str(tmp_path / "gpu_paper_table_tiny_cpu.json")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out)["ratio"] == pytest.approx(row["reuse_s"] / row["prefill_s"])


def test_compression_runs_and_every_codec_is_exact(tmp_path):
    from vllm_kvcdn.artifact.codec import DEFAULT

    run("compression.py", "--models", "tiny", "--tokens", "512", "--reps", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "compression.json").read_text())["rows"]
    assert rows[0]["codec"] == "none (v1)" and DEFAULT in {r["codec"] for r in rows}
    assert all(r["exact"] is True and r["ratio"] > 0 and r["decode_gbps"] > 0 for r in rows)
    assert (tmp_path / "compression.png").stat().st_size > 0


def test_tp_bytes_compares_every_rank_of_a_tp2_engine(tiny_model, tmp_path):
    run("tp_bytes.py", "--model", str(tiny_model), "--shape", "tiny", "--out", str(tmp_path))
    result = json.loads((tmp_path / "tp_bytes_tiny.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert rows["tp1_2threads"]["layers"] == rows["tp2"]["layers"] == layers
    assert len(result["per_layer"]) == 2 * layers and (tmp_path / "tp_bytes_tiny.png").stat().st_size > 0


def test_tp_layout_reads_each_rank_part_three_ways(tmp_path):
    run("tp_layout.py", "--reps", "1", "--stores", "file", "--out", str(tmp_path))
    rows = {(r["tp"], r["layout"]): r for r in json.loads((tmp_path / "tp_layout_kv-0.6b.json").read_text())["rows"]}
    assert len(rows) == 4 * 3 - 1  # no separate parts at TP=1
    whole = rows[1, "whole"]["mb_per_rank"]
    for tp in (2, 4, 8):
        assert rows[tp, "whole"]["mb_per_rank"] == whole  # every rank reads everything
        assert rows[tp, "parts"]["mb_per_rank"] == pytest.approx(whole / tp, rel=0.01)
        assert rows[tp, "parts"]["requests_per_rank"] == 1 and rows[tp, "head_major"]["requests_per_rank"] == 2


def test_tp_ttft_runs_both_sizes_and_checks_every_hit(tiny_model, tmp_path):
    run("tp_ttft.py", "--model", str(tiny_model), "--shape", "tiny", "--lengths", "300", "--reps", "1",
        "--out", str(tmp_path))
    rows = {(r["tp"], r["variant"]): r for r in json.loads((tmp_path / "tp_ttft_tiny.json").read_text())["rows"]}
    first_tp1, first_tp2 = rows[1, "hit, first read"], rows[2, "hit, first read"]
    assert first_tp2["read_mb_per_rank"] == pytest.approx(first_tp1["read_mb_per_rank"] / 2, rel=0.05)
    assert rows[2, "cold prefill"]["ttft_s"] > 0


def test_slow_store_steps_the_delay_and_the_planner_switches_to_recompute_and_back(tiny_model, tmp_path):
    run("slow_store.py", "--model", str(tiny_model), "--shape", "tiny", "--length", "300", "--delays", "0,0.3",
        "--reps", "1", "--policies", "measured", "--out", str(tmp_path))
    result = json.loads((tmp_path / "slow_store_tiny.json").read_text())
    fast, slow = result["rows"]
    assert fast["loaded"] == "1/1 loaded" and slow["loaded"] == "recomputed", result["rows"]
    requests, seconds = result["requests_to_resume"]["measured"]
    assert requests is not None and seconds < 60, result["requests_to_resume"]


def test_provenance_cost_measures_both_modes_and_the_per_gb_steps(tmp_path):
    run("provenance_cost.py", "--shape", "kv-tiny", "--lengths", "300", "--reps", "1", "--hash-mib", "4",
        "--out", str(tmp_path))
    loads = json.loads((tmp_path / "provenance_loads_kv-tiny.json").read_text())["rows"]
    assert sorted((r["read"], r["mode"]) for r in loads) == sorted(
        (read, mode) for read in ("first", "hot") for mode in ("unhashed", "signed", "sealed"))
    assert all(r["gbps"] > 0 for r in loads)
    costs = json.loads((tmp_path / "provenance_costs.json").read_text())["rows"]
    assert len(costs) == 8 and all(r.get("gbps", 0) > 0 or r.get("us", 0) > 0 for r in costs)
