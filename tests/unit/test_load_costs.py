"""The load-or-recompute verdict on its own (``connector/load_costs``); the worker and a
real engine act on it in ``tests/worker/test_chunk_loads.py`` and
``tests/engine/test_load_or_recompute.py``."""

from __future__ import annotations

import random

from vllm_kvcdn.connector.load_costs import MIN_STEP_TOKENS, STEPS_KEPT, LoadCosts


def test_nothing_measured_means_load():
    costs = LoadCosts(parallel_reads=4)
    assert costs.verdict("store", 10, 2560).load
    costs.observe_read("store", 5.0)
    assert costs.verdict("store", 10, 2560).load  # the engine's rate is not known yet


def test_chunks_load_when_they_arrive_before_their_tokens_would_be_computed():
    costs = LoadCosts(parallel_reads=4, margin_s=0.05)
    costs.observe_step(1000, 1.0)  # 1 ms a token: 2560 tokens in 2.56 s
    costs.observe_read("store", 0.5)
    verdict = costs.verdict("store", 10, 2560)  # 3 rounds of 4 reads: 1.5 s
    assert verdict.load and verdict.load_s == 1.5 and verdict.compute_s == 2.56
    costs.observe_read("store", 1.2)
    costs.observe_read("store", 1.2)  # median 1.2: 3.6 s
    verdict = costs.verdict("store", 10, 2560)
    assert not verdict.load and "3.600s" in verdict.why()


def test_the_margin_and_the_policy_keep_loads():
    costs = LoadCosts(parallel_reads=1, margin_s=0.05)
    costs.observe_step(1000, 1.0)
    costs.observe_read("store", 0.14)
    assert costs.verdict("store", 1, 100).load  # 0.14 s against 0.1 s: within the margin
    assert not costs.verdict("store", 1, 80).load
    always = LoadCosts(parallel_reads=1, enabled=False)
    always.observe_step(1000, 1.0)
    always.observe_read("store", 10.0)
    assert always.verdict("store", 1, 80).load


def test_one_outlier_read_does_not_flip_the_verdict():
    costs = LoadCosts(parallel_reads=1)
    costs.observe_step(1000, 1.0)
    for seconds in (0.01, 0.01, 5.0):
        costs.observe_read("store", seconds)
    assert costs.verdict("store", 1, 256).load
    costs.observe_read("store", 5.0)
    assert not costs.verdict("store", 1, 256).load


def test_decode_steps_alone_do_not_set_the_prefill_rate():
    costs = LoadCosts(parallel_reads=1)
    costs.observe_read("store", 1.0)
    costs.observe_step(MIN_STEP_TOKENS - 1, 10.0)
    assert costs.verdict("store", 1, 100).compute_s is None


def test_a_steps_fixed_cost_is_not_taken_for_prefill():
    """Step time = 80 ms + 1 ms a token: question-sized steps alone would say 6 ms a token."""
    costs = LoadCosts(parallel_reads=1)
    for tokens in (16, 17, 1, 2, 16, 271, 1, 16):
        costs.observe_step(tokens, 0.08 + 0.001 * tokens)
    assert abs(costs.prefill_s_per_token() - 0.001) < 1e-9
    costs.observe_read("store", 1.6)
    verdict = costs.verdict("store", 1, 255)
    assert not verdict.load and abs(verdict.compute_s - 0.255) < 1e-6


def test_the_rate_is_fitted_on_the_last_steps_only():
    """The running sums give the exact fit of the last ``STEPS_KEPT`` steps, after
    thousands of adds and removals: a slower engine (2 ms a token, then 5) is seen once
    its steps fill the window."""
    costs, rng = LoadCosts(parallel_reads=1), random.Random(7)
    for per_token in (0.002, 0.005):
        for _ in range(50 * STEPS_KEPT + 3):
            tokens = rng.choice((1, 16, 128, 2048))
            costs.observe_step(tokens, 0.03 + per_token * tokens + rng.uniform(0, 1e-6))
        assert abs(costs.prefill_s_per_token() - per_token) < 1e-8


def test_one_probe_per_source_at_a_time():
    costs = LoadCosts(parallel_reads=1)
    assert costs.start_probe("store") and not costs.start_probe("store") and costs.start_probe("image")
    assert not costs.wait_for_probes(0.01)
    costs.end_probe("store")
    costs.end_probe("image")
    assert costs.wait_for_probes(0.01) and costs.start_probe("store")
