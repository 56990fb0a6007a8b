"""The level-3 measures: greedy agreement and logprob difference between two answers."""

from vllm_kvcdn.testing.exactness import agreement, identical, max_logprob_diff


def answer(tokens, logprobs):
    return {"token_ids": tokens, "logprobs": logprobs}


def test_agreement_counts_tokens_up_to_the_first_divergence():
    ref = answer([5, 6, 7, 8], [-1.0, -2.0, -1.5, -0.5])
    assert agreement(ref, ref) == 4
    assert agreement(answer([5, 6, 9, 8], ref["logprobs"]), ref) == 2
    assert agreement(answer([1, 6, 7, 8], ref["logprobs"]), ref) == 0


def test_logprob_difference_over_a_prefix_always_includes_the_first_token():
    ref = answer([5, 6, 7], [-1.0, -2.0, -1.5])
    got = answer([5, 6, 7], [-1.01, -2.0, -1.0])
    assert max_logprob_diff(got, ref) == 0.5
    assert abs(max_logprob_diff(got, ref, 2) - 0.01) < 1e-12
    assert abs(max_logprob_diff(got, ref, 0) - 0.01) < 1e-12


def test_identical_means_same_tokens_and_bit_equal_logprobs():
    ref = answer([5, 6], [-1.0, -2.0])
    assert identical(answer([5, 6], [-1.0, -2.0]), ref)
    assert not identical(answer([5, 6], [-1.0, -2.0000001]), ref)
    assert not identical(answer([5, 7], [-1.0, -2.0]), ref)
